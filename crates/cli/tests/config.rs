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
        "--max-send-mbit-s",
        "200",
        "--print-config",
    ]);
    for line in [
        "max_wal_entries = 7000",       // the flag
        "max_send_mbit_s = 200",        // the flag
        "compression = \"zstd\"",       // the default
        "database = \"orders\"",        // the file
        "max_connections = 10",         // the file
        "max_handshakes = 64",          // the default
        "handshake_timeout_ms = 10000", // the default
        "cache_mb = 64",                // the default
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
        "--cache-mb",
        "16",
        "--print-config",
    ]);
    for line in [
        "cache_mb = 16",
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
        (
            format!("{SOURCE_FILE}compression = \"lz4\"\n"),
            "unknown compression \"lz4\": expected zstd or off",
        ),
        (
            format!("{SOURCE_FILE}max_send_mbit_s = 0\n"),
            "--max-send-mbit-s must be at least 1",
        ),
    ];
    for (text, expected) in cases {
        let file = config_file(&dir, &text);
        let output = xmirror(&["source", "--config", &file]);
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
    // Numbers are numbers, not strings.
    assert_eq!(log["fields"]["last_lsn"], serde_json::json!(0));
}

/// What `xmirror ARGS` prints with `environment` set, asserting it succeeded.
fn printed_with_env(args: &[&str], environment: &[(&str, &str)]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_xmirror"))
        .args(args)
        .envs(environment.iter().copied())
        .output()
        .expect("run xmirror");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn has_line(printed: &str, line: &str) -> bool {
    printed.lines().any(|printed| printed == line)
}

#[test]
fn flags_win_over_the_environment_which_wins_over_the_file() {
    let dir = TempDir::new().unwrap();
    let file = config_file(&dir, &format!("{SOURCE_FILE}log_format = \"json\"\n"));
    let environment = [
        ("XMIRROR_MAX_WAL_ENTRIES", "6000"),
        ("XMIRROR_MAX_CONNECTIONS", "20"),
        ("XMIRROR_LOG_FORMAT", "text"),
    ];
    let base = ["source", "--config", &file, "--print-config"];
    let flag = [&base[..], &["--max-wal-entries", "7000"]].concat();
    let printed = printed_with_env(&flag, &environment);
    assert!(has_line(&printed, "max_wal_entries = 7000"), "{printed}"); // the flag
    assert!(has_line(&printed, "max_connections = 20"), "{printed}"); // the environment
    assert!(has_line(&printed, "log_format = \"text\""), "{printed}"); // the environment
    assert!(has_line(&printed, "database = \"orders\""), "{printed}"); // the file
    assert!(has_line(&printed, "max_handshakes = 64"), "{printed}"); // the default
    let printed = printed_with_env(&base, &environment[..1]);
    assert!(has_line(&printed, "max_wal_entries = 6000"), "{printed}");
    assert!(has_line(&printed, "max_connections = 10"), "{printed}");
    assert!(has_line(&printed, "log_format = \"json\""), "{printed}"); // the file
    let printed = printed_with_env(&base, &[]);
    assert!(has_line(&printed, "max_wal_entries = 5000"), "{printed}");
    // The environment alone can carry what a node needs.
    let printed = printed_with_env(
        &["mirror", "--print-config"],
        &[
            ("XMIRROR_DATA_DIR", "/m"),
            ("XMIRROR_SOURCE", "127.0.0.1:7700"),
            ("XMIRROR_SOURCE_CLUSTER", "east"),
            ("XMIRROR_CERTS", "/c"),
            ("XMIRROR_NAME", "m1"),
        ],
    );
    assert!(has_line(&printed, "name = \"m1\""), "{printed}");
    assert!(!printed.contains("Required."), "{printed}");
}

#[test]
fn paths_in_a_file_are_relative_to_the_file() {
    let dir = TempDir::new().unwrap();
    let file = config_file(
        &dir,
        "data_dir = \"data\"\ncerts = \"../certs\"\ncluster_id = \"east\"\nlisten = \"127.0.0.1:7000\"\nname = \"src\"\n",
    );
    // Run from elsewhere: the file's paths still mean the file's directory.
    let output = Command::new(env!("CARGO_BIN_EXE_xmirror"))
        .args(["source", "--config", &file, "--print-config"])
        .current_dir("/")
        .output()
        .unwrap();
    let printed = String::from_utf8(output.stdout).unwrap();
    let base = dir.path().display();
    assert!(
        has_line(&printed, &format!("data_dir = \"{base}/data\"")),
        "{printed}"
    );
    assert!(
        has_line(&printed, &format!("certs = \"{base}/../certs\"")),
        "{printed}"
    );
    // A relative flag means the working directory, and is printed absolute.
    let output = Command::new(env!("CARGO_BIN_EXE_xmirror"))
        .args([
            "source",
            "--config",
            &file,
            "--print-config",
            "--data-dir",
            "here",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        has_line(&printed, &format!("data_dir = \"{base}/here\"")),
        "{printed}"
    );
}

#[test]
fn print_config_without_settings_prints_a_template_to_start_from() {
    let dir = TempDir::new().unwrap();
    let template = printed_config(&["source", "--print-config"]);
    for line in [
        "# Required.",
        "#data_dir = \"/var/lib/xmirror/source\"",
        "#cluster_id = \"CLUSTER\"",
        "max_wal_entries = 10000000",
        "log_format = \"text\"",
        "#metrics =",
    ] {
        assert!(has_line(&template, line), "{line} missing in:\n{template}");
    }
    assert!(template.contains("# Most WAL entries kept"), "{template}");
    // As it is, the template is a valid file that still lacks the required settings.
    let file = config_file(&dir, &template);
    let output = xmirror(&["source", "--config", &file]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing --"), "{stderr}");
    // Filled in, it is the configuration it names.
    let filled = template
        .replace("#data_dir = ", "data_dir = ")
        .replace("#cluster_id = ", "cluster_id = ")
        .replace("#listen = ", "listen = ")
        .replace("#certs = ", "certs = ")
        .replace("#name = ", "name = ");
    let file = config_file(&dir, &filled);
    let printed = printed_config(&["source", "--config", &file, "--print-config"]);
    assert!(!printed.contains("Required."), "{printed}");
    assert!(has_line(&printed, "cluster_id = \"CLUSTER\""), "{printed}");
}
