//! `xmirror certs` as an operator runs it: the real binary, real files.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use tempfile::TempDir;

fn xmirror(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xmirror"))
        .args(args)
        .output()
        .expect("run xmirror")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn init_then_issue_writes_the_spec_layout() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().to_str().unwrap();
    let init = xmirror(&["certs", "init", "--dir", path, "--cluster-id", "east"]);
    assert!(init.status.success(), "{}", stderr(&init));
    for (role, node) in [("source", "src-1"), ("observer", "m1"), ("client", "ops")] {
        let issue = xmirror(&[
            "certs",
            "issue",
            "--dir",
            path,
            "--cluster-id",
            "east",
            "--role",
            role,
            "--name",
            node,
        ]);
        assert!(issue.status.success(), "{}", stderr(&issue));
        assert!(String::from_utf8_lossy(&issue.stdout)
            .contains(&format!("spiffe://east/{role}/{node}")));
        let key_mode = std::fs::metadata(dir.path().join(format!("{node}.key")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        assert!(dir.path().join(format!("{node}.crt")).exists());
    }
    let ca_mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(ca_mode & 0o777, 0o600);
}

#[test]
fn issuing_over_an_existing_certificate_needs_force() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().to_str().unwrap();
    assert!(
        xmirror(&["certs", "init", "--dir", path, "--cluster-id", "east"])
            .status
            .success()
    );
    let issue = |extra: &[&str]| {
        let mut args = vec![
            "certs",
            "issue",
            "--dir",
            path,
            "--cluster-id",
            "east",
            "--role",
            "client",
            "--name",
            "app",
        ];
        args.extend_from_slice(extra);
        xmirror(&args)
    };
    assert!(issue(&[]).status.success());
    let first = std::fs::read(dir.path().join("app.key")).unwrap();
    let again = issue(&[]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("app.crt already exists; refusing to replace it (pass --force"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read(dir.path().join("app.key")).unwrap(),
        first,
        "the key is untouched"
    );
    let forced = issue(&["--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_ne!(
        std::fs::read(dir.path().join("app.key")).unwrap(),
        first,
        "re-issued"
    );
}

#[test]
fn bad_input_gets_a_one_line_error_and_a_non_zero_exit() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().to_str().unwrap();
    assert!(
        xmirror(&["certs", "init", "--dir", path, "--cluster-id", "east"])
            .status
            .success()
    );

    let cases: [(&[&str], &str); 5] = [
        (
            &["certs", "init", "--dir", path, "--cluster-id", "east"],
            "refusing to replace a CA",
        ),
        (
            &[
                "certs",
                "issue",
                "--dir",
                path,
                "--cluster-id",
                "west",
                "--role",
                "client",
                "--name",
                "a",
            ],
            "is for cluster \"east\", not \"west\"",
        ),
        (
            &[
                "certs",
                "issue",
                "--dir",
                path,
                "--cluster-id",
                "east",
                "--role",
                "admin",
                "--name",
                "a",
            ],
            "unknown role \"admin\"",
        ),
        (
            &[
                "certs",
                "issue",
                "--dir",
                path,
                "--cluster-id",
                "east",
                "--role",
                "client",
                "--name",
                "../a",
            ],
            "name starts with '.': a name starts with an ASCII letter or digit",
        ),
        (
            &[
                "certs",
                "issue",
                "--dir",
                "/nonexistent",
                "--cluster-id",
                "east",
                "--role",
                "client",
                "--name",
                "a",
            ],
            "cannot access /nonexistent/ca.crt",
        ),
    ];
    for (args, expected) in cases {
        let output = xmirror(args);
        assert!(!output.status.success(), "{args:?} succeeded");
        let message = stderr(&output);
        assert!(message.contains(expected), "{args:?}: {message}");
    }
}

#[test]
fn show_says_who_until_when_and_the_fingerprint_openssl_gives() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().to_str().unwrap();
    assert!(
        xmirror(&["certs", "init", "--dir", path, "--cluster-id", "east"])
            .status
            .success()
    );
    let issue = xmirror(&[
        "certs",
        "issue",
        "--dir",
        path,
        "--cluster-id",
        "east",
        "--role",
        "observer",
        "--name",
        "m1",
        "--days",
        "30",
    ]);
    assert!(issue.status.success(), "{}", stderr(&issue));
    let file = dir.path().join("m1.crt");
    let shown = xmirror(&["certs", "show", file.to_str().unwrap()]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let text = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(
        text.contains("identity:  spiffe://east/observer/m1"),
        "{text}"
    );
    assert!(text.contains("days left)"), "{text}");
    let openssl = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&file)
        .output()
        .expect("openssl runs (the CI installs it)");
    let fingerprint = String::from_utf8_lossy(&openssl.stdout)
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        text.contains(&format!("sha256:    {fingerprint}")),
        "{text}\n{fingerprint}"
    );
    let ca = xmirror(&["certs", "show", dir.path().join("ca.crt").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&ca.stdout).contains("CA of cluster east"));
}

/// A certificate outside its validity period is refused before anything is dialled, with
/// whose certificate it is and when it expired, instead of a peer's TLS alert.
#[test]
fn an_expired_certificate_says_whose_and_when() {
    use xmirror_proto::{Name, PeerIdentity, Role};
    use xmirror_tls::pki::{load_ca_for, IssueOptions, Validity};

    let dir = TempDir::new().unwrap();
    let path = dir.path().to_str().unwrap();
    assert!(
        xmirror(&["certs", "init", "--dir", path, "--cluster-id", "east"])
            .status
            .success()
    );
    let east = Name::new("east").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let issue = |name: &str, role: Role, not_before, not_after| {
        let who = PeerIdentity {
            cluster_id: east.clone(),
            role,
            name: Name::new(name).unwrap(),
        };
        let options = IssueOptions {
            validity: Validity {
                not_before,
                not_after,
            },
            extra_dns_names: vec![],
        };
        load_ca_for(dir.path(), &east)
            .unwrap()
            .issue(&who, &options)
            .unwrap()
            .write(dir.path(), &who.name, true)
            .unwrap();
    };
    let day = time::Duration::days(1);
    issue("old", Role::Client, now - 10 * day, now - day);
    issue("early", Role::Source, now + day, now + 10 * day);

    let get = xmirror(&[
        "get",
        "--node",
        "127.0.0.1:9",
        "--certs",
        path,
        "--name",
        "old",
        "k",
    ]);
    assert!(!get.status.success());
    let text = stderr(&get);
    assert!(
        text.contains("the certificate of spiffe://east/client/old expired at ")
            && text.contains("xmirror certs issue --force"),
        "{text}"
    );
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");

    let source = xmirror(&[
        "source",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--cluster-id",
        "east",
        "--listen",
        "127.0.0.1:0",
        "--certs",
        path,
        "--name",
        "early",
    ]);
    assert!(!source.status.success());
    let text = stderr(&source);
    assert!(
        text.contains("the certificate of spiffe://east/source/early is not valid before "),
        "{text}"
    );
}
