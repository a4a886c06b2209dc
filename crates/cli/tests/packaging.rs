//! What a package ships besides the binary: shell completions, man pages, and the systemd
//! units and config files in `deploy/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn xmirror(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xmirror"))
        .args(args)
        .output()
        .expect("run xmirror")
}

fn stdout_of(args: &[&str]) -> String {
    let output = xmirror(args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file)
}

#[test]
fn completions_cover_every_command_in_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&["completions", shell]);
        for command in ["source", "mirror", "scan", "batch", "print-config"] {
            assert!(script.contains(command), "{shell}: no {command}");
        }
    }
    assert!(!xmirror(&["completions", "tcsh"]).status.success());
}

#[test]
fn man_pages_document_every_command_and_its_variables() {
    let page = stdout_of(&["man"]);
    assert!(page.contains(".TH xmirror 1"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    stdout_of(&["man", "--dir", dir.path().to_str().unwrap()]);
    for command in ["source", "mirror", "get", "scan", "certs-issue"] {
        let page = std::fs::read_to_string(dir.path().join(format!("xmirror-{command}.1")))
            .unwrap_or_else(|error| panic!("xmirror-{command}.1: {error}"));
        assert!(page.contains(".TH xmirror-"), "{page}");
    }
    let source = std::fs::read_to_string(dir.path().join("xmirror-source.1")).unwrap();
    assert!(source.contains("XMIRROR_DATA_DIR"), "{source}");
}

#[test]
fn deploy_files_are_configs_the_nodes_accept() {
    let source = deploy("source.toml");
    let printed = stdout_of(&[
        "source",
        "--config",
        source.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(!printed.contains("Required."), "{printed}");
    // The example's source host does not resolve here; everything else is the file's.
    let mirror = deploy("mirror.toml");
    let printed = stdout_of(&[
        "mirror",
        "--config",
        mirror.to_str().unwrap(),
        "--source",
        "127.0.0.1:7000",
        "--print-config",
    ]);
    assert!(
        printed.lines().any(|line| line == "name = \"mirror-1\""),
        "{printed}"
    );
    for (unit, config) in [
        ("xmirror-source.service", "/etc/xmirror/source.toml"),
        ("xmirror-mirror.service", "/etc/xmirror/mirror.toml"),
    ] {
        let text = std::fs::read_to_string(deploy(unit)).unwrap();
        assert!(text.contains(&format!("--config {config}")), "{unit}");
        assert!(text.contains("Restart=on-failure"), "{unit}");
    }
}
