//! `--config FILE` and `--print-config`: flags win over the file, the file over defaults.

use std::process::{Command, Output};

use tempfile::TempDir;

fn xmirror(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xmirror"))
        .args(args)
        .output()
        .expect("run xmirror")
}

/// What `xmirror ARGS` prints, asserting it succeeded.
fn printed_config(args: &[&str]) -> String {
    let output = xmirror(args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn config_file(dir: &TempDir, text: &str) -> String {
    let path = dir.path().join("node.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const SOURCE_FILE: &str = r#"
data_dir = "/var/lib/xmirror/src"
cluster_id = "east"
listen = "127.0.0.1:7700"
certs = "/etc/xmirror/certs"
name = "src-1"
database = "orders"
max_wal_entries = 5000
max_connections = 10
"#;

#[test]
fn flags_win_over_the_file_and_the_file_over_defaults() {
    let dir = TempDir::new().unwrap();
    let file = config_file(&dir, SOURCE_FILE);
    let printed = printed_config(&[
        "source",
        "--config",
        &file,
        "--max-wal-entries",
        "7000",
        "--print-config",
    ]);
    for line in [
        "max_wal_entries = 7000",       // the flag
        "database = \"orders\"",        // the file
        "max_connections = 10",         // the file
        "max_handshakes = 64",          // the default
        "handshake_timeout_ms = 10000", // the default
        "listen = \"127.0.0.1:7700\"",
    ] {
        assert!(
            printed.lines().any(|printed| printed == line),
            "{line} missing in:\n{printed}"
        );
    }
    // What --print-config prints is itself a valid config file that means the same.
    let again = config_file(&dir, &printed);
    let reprinted = xmirror(&["source", "--config", &again, "--print-config"]);
    assert_eq!(String::from_utf8(reprinted.stdout).unwrap(), printed);
}

#[test]
fn the_mirror_reads_the_same_way() {
    let dir = TempDir::new().unwrap();
    let file = config_file(
        &dir,
        "data_dir = \"/m\"\nsource = \"127.0.0.1:7700\"\nsource_cluster = \"east\"\ncerts = \"/c\"\nname = \"m1\"\nconnect_timeout_ms = 2500\n",
    );
    let printed = printed_config(&[
        "mirror",
        "--config",
        &file,
        "--name",
        "m2",
        "--print-config",
    ]);
    for line in [
        "name = \"m2\"",
        "connect_timeout_ms = 2500",
        "source_silence_timeout_ms = 5000",
    ] {
        assert!(
            printed.lines().any(|printed| printed == line),
            "{line} missing in:\n{printed}"
        );
    }
}

#[test]
fn bad_config_gets_a_one_line_error() {
    let dir = TempDir::new().unwrap();
    let cases = [
        (
            format!("{SOURCE_FILE}\nmax_wal_entriez = 3\n"),
            "unknown field `max_wal_entriez`",
        ),
        ("data_dir = 5\n".to_string(), "invalid type"),
        (
            "cluster_id = \"../etc\"\n".to_string(),
            "name starts with '.'",
        ),
        (
            "data_dir = \"/d\"\n".to_string(),
            "missing --listen (or `listen` in the config file)",
        ),
    ];
    for (text, expected) in cases {
        let file = config_file(&dir, &text);
        let output = xmirror(&["source", "--config", &file, "--print-config"]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
    let output = xmirror(&["source", "--config", "/nonexistent.toml", "--print-config"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read the config file"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new().unwrap();
    let certs = dir.path().join("certs");
    let certs = certs.to_str().unwrap();
    assert!(
        xmirror(&["certs", "init", "--dir", certs, "--cluster-id", "east"])
            .status
            .success()
    );
    let issue = [
        "certs",
        "issue",
        "--dir",
        certs,
        "--cluster-id",
        "east",
        "--role",
        "source",
        "--name",
        "src",
    ];
    assert!(xmirror(&issue).status.success());
    let data = dir.path().join("data");
    let mut source = Command::new(env!("CARGO_BIN_EXE_xmirror"))
        .args([
            "--log-format",
            "json",
            "source",
            "--listen",
            "127.0.0.1:0",
            "--cluster-id",
            "east",
        ])
        .args(["--certs", certs, "--name", "src", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(source.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = source.kill();
    let _ = source.wait();
    let log: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(log["level"], "INFO");
    assert_eq!(log["fields"]["message"], "source serving");
    assert_eq!(log["fields"]["cluster"], "east");
}
