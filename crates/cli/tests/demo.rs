//! `xmirror demo`, the README's first command, runs to the end and exits 0.

use std::process::Command;

#[test]
fn the_demo_shows_snapshot_streaming_resume_and_equal_digests() {
    let output = Command::new(env!("CARGO_BIN_EXE_xmirror"))
        .arg("demo")
        .output()
        .expect("run xmirror demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "hello decision snapshot",
        "live streaming",
        "mirror restarted: decision stream, snapshots started still 1",
        "equal digests at the same LSN",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in:\n{stdout}");
    }
}
