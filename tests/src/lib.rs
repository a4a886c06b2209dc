//! The end-to-end harness: real `xmirror` processes with their own data directories and
//! loopback ports, a certificate authority per test, and polling helpers with deadlines.
//! Every process is killed when its handle drops, so a failing test leaves nothing behind.
//!
//! - [`proxy`]: the UDP impairment proxy (delay, jitter, loss, duplication, bandwidth,
//!   partitions).
//! - [`checker`]: writers that record every acknowledged write, verification that the
//!   source still has them, and a monitor that the mirror's applied LSN never moves back.

pub mod checker;
pub mod proxy;

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::{Direction, Impairment, Proxy};
use tempfile::TempDir;
use xmirror_client::{Client, Identity};
use xmirror_proto::status::{MirrorStatus, NodeStatus, SourceStatus};
use xmirror_proto::{Name, Role};
use xmirror_tls::pki::issue_cluster;

/// The cluster every test source belongs to.
pub const CLUSTER: &str = "east";

/// The `xmirror` binary of this build, built first if it is missing.
pub fn xmirror_bin() -> PathBuf {
    built(Path::new("xmirror"), &["-p", "xmirror", "--bin", "xmirror"])
}

/// The client crate's example `name` of this build, built first if it is missing.
pub fn example_bin(name: &str) -> PathBuf {
    built(
        &Path::new("examples").join(name),
        &["-p", "xmirror-client", "--example", name],
    )
}

/// `path` in this build's target profile directory, built with `cargo build ARGS` when it
/// is missing (a test run alone, without a workspace build before it).
fn built(path: &Path, cargo_build_args: &[&str]) -> PathBuf {
    // Test binaries live in target/<profile>/deps; the profile directory is one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let target = profile_dir.join(path);
    if !target.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .arg("build")
            .args(cargo_build_args)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build {cargo_build_args:?} failed");
    }
    target
}

/// A UDP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range:
/// a node restarted on it must not find it taken by some client's socket meanwhile (every
/// client endpoint binds an ephemeral port, and a node's port inside that range is one of
/// them as soon as the node is down).
pub fn free_port() -> SocketAddr {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 10_000.min(ephemeral_start / 2);
    for _ in 0..1_000 {
        let port = rand::random_range(low..ephemeral_start);
        if let Ok(socket) = UdpSocket::bind(("127.0.0.1", port)) {
            return socket.local_addr().expect("local address");
        }
    }
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
    socket.local_addr().expect("local address")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    listener.local_addr().expect("local address")
}

/// Scrapes a Prometheus endpoint: each sample's `name{labels}` (labels sorted) and value.
pub fn scrape(addr: SocketAddr) -> Option<std::collections::BTreeMap<String, f64>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    let mut samples = std::collections::BTreeMap::new();
    for line in body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ')?;
        let series = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort_unstable();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_owned(),
        };
        samples.insert(series, value.parse().ok()?);
    }
    Some(samples)
}

fn name(value: &str) -> Name {
    Name::new(value).expect("valid test name")
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`: resident now, `VmHWM`: its peak).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A test's world: a temporary directory with the cluster's certificates in `certs/`.
///
/// Certificates: `src` and `src2` (sources), `app` and `ops` (clients), `m1`..`m3` (observers), `v1`
/// (voter). `rogue/` holds a second CA that also calls itself `east`, with an observer
/// `m1`, and trusts the real CA (so only the source's check can refuse it).
pub struct World {
    /// Everything of this test lives here.
    pub dir: TempDir,
    /// The certs directory.
    pub certs: PathBuf,
    /// The rogue certs directory.
    pub rogue_certs: PathBuf,
}

fn issue_all(dir: &Path, nodes: &[(Role, &str)]) {
    let nodes: Vec<(Role, Name)> = nodes
        .iter()
        .map(|(role, node)| (*role, name(node)))
        .collect();
    issue_cluster(dir, &name(CLUSTER), &nodes, 1).expect("issue a cluster's certificates");
}

impl World {
    /// A fresh world.
    pub fn new() -> World {
        let dir = TempDir::new().expect("temporary directory");
        let certs = dir.path().join("certs");
        let rogue_certs = dir.path().join("rogue");
        issue_all(
            &certs,
            &[
                (Role::Source, "src"),
                (Role::Source, "src2"),
                (Role::Client, "app"),
                (Role::Client, "ops"),
                (Role::Observer, "m1"),
                (Role::Observer, "m2"),
                (Role::Observer, "m3"),
                (Role::Voter, "v1"),
            ],
        );
        issue_all(&rogue_certs, &[(Role::Observer, "m1")]);
        std::fs::copy(certs.join("ca.crt"), rogue_certs.join("ca-real.crt")).expect("copy CA");
        World {
            dir,
            certs,
            rogue_certs,
        }
    }

    /// A path inside the world.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `xmirror source` on a free port with data in `data`, and waits until it serves.
    pub async fn start_source(&self, data: &str, extra: &[&str]) -> Node {
        self.start_source_on(free_port(), data, extra).await
    }

    /// Starts `xmirror source` on `addr`.
    pub async fn start_source_on(&self, addr: SocketAddr, data: &str, extra: &[&str]) -> Node {
        let mut args = vec![
            "source".to_string(),
            "--data-dir".into(),
            self.path(data).display().to_string(),
            "--cluster-id".into(),
            CLUSTER.into(),
            "--listen".into(),
            addr.to_string(),
            "--certs".into(),
            self.certs.display().to_string(),
            "--name".into(),
            "src".into(),
        ];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let node = Node::spawn(&format!("source-{data}"), self.dir.path(), &args, addr);
        node.wait_serving(self).await;
        node
    }

    /// Starts `xmirror mirror` named `mirror` with data in `data`, serving reads on a free
    /// port, and waits until its client API answers.
    pub async fn start_mirror(&self, mirror: &str, data: &str, source: SocketAddr) -> Node {
        self.start_mirror_on(free_port(), mirror, data, source)
            .await
    }

    /// Starts `xmirror mirror` serving reads on `listen` (to restart it on the same address).
    pub async fn start_mirror_on(
        &self,
        listen: SocketAddr,
        mirror: &str,
        data: &str,
        source: SocketAddr,
    ) -> Node {
        self.start_mirror_with(listen, mirror, data, source, &[])
            .await
    }

    /// Starts `xmirror mirror` serving reads on `listen`, with `extra` flags.
    pub async fn start_mirror_with(
        &self,
        listen: SocketAddr,
        mirror: &str,
        data: &str,
        source: SocketAddr,
        extra: &[&str],
    ) -> Node {
        let node = self.spawn_mirror_with(listen, mirror, data, source, extra);
        node.wait_serving(self).await;
        node
    }

    /// Starts `xmirror mirror` like [`Self::start_mirror_with`] without waiting for it to
    /// serve (for a mirror expected to stop at once).
    pub fn spawn_mirror_with(
        &self,
        listen: SocketAddr,
        mirror: &str,
        data: &str,
        source: SocketAddr,
        extra: &[&str],
    ) -> Node {
        let data_dir = self.path(data);
        let mut args = mirror_args(
            &data_dir,
            source,
            CLUSTER,
            &self.certs,
            mirror,
            Some(listen),
        );
        args.extend(extra.iter().map(|arg| arg.to_string()));
        Node::spawn(&format!("mirror-{data}"), self.dir.path(), &args, listen)
    }

    /// A client connection to `addr` as `app`.
    pub async fn client(&self, addr: SocketAddr) -> Client {
        self.client_as("app", addr).await
    }

    /// A client connection to `addr` with the certificate `name`.
    pub async fn client_as(&self, name: &str, addr: SocketAddr) -> Client {
        let identity = Identity::from_dir(&self.certs, name).expect("load client certificates");
        Client::builder(identity)
            .connect_addr(addr)
            .await
            .expect("connect to the node")
    }

    /// Runs the `xmirror` command line and returns its output.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(xmirror_bin())
            .args(args)
            .output()
            .expect("run xmirror")
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// The arguments of `xmirror mirror`.
pub fn mirror_args(
    data: &Path,
    source: SocketAddr,
    source_cluster: &str,
    certs: &Path,
    name: &str,
    listen: Option<SocketAddr>,
) -> Vec<String> {
    let mut args = vec![
        "mirror".to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--source".into(),
        source.to_string(),
        "--source-cluster".into(),
        source_cluster.into(),
        "--certs".into(),
        certs.display().to_string(),
        "--name".into(),
        name.into(),
    ];
    if let Some(listen) = listen {
        args.extend(["--listen".into(), listen.to_string()]);
    }
    args
}

/// A running `xmirror` process; killed (SIGKILL) when dropped.
pub struct Node {
    child: Child,
    /// Where it serves its client API.
    pub addr: SocketAddr,
    /// Its stderr (logs).
    pub log: PathBuf,
}

impl Node {
    /// Spawns `xmirror ARGS`, logging to `<dir>/<label>.log`.
    pub fn spawn(label: &str, dir: &Path, args: &[String], addr: SocketAddr) -> Node {
        let log = dir.join(format!("{label}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the log");
        let child = Command::new(xmirror_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn xmirror");
        Node { child, addr, log }
    }

    pub async fn wait_serving(&self, world: &World) {
        let identity = Identity::from_dir(&world.certs, "app").expect("client certificates");
        let addr = self.addr;
        wait_until(&format!("{addr} to serve"), Duration::from_secs(30), || {
            let identity = identity.clone();
            async move {
                Client::builder(identity)
                    .connect_addr(addr)
                    .await
                    .ok()
                    .map(drop)
            }
        })
        .await;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks it to stop (SIGTERM) and waits for it.
    pub fn stop(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.wait_exit(Duration::from_secs(30))
            .expect("the node stops on SIGTERM")
    }

    /// Waits for it to exit by itself, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // A failing test shows what each of its nodes logged last.
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            eprintln!("--- last lines of {} ---", self.log.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`; panics after `limit`.
pub async fn wait_until<T, F: Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A mirror's status.
pub async fn mirror_status(client: &Client) -> MirrorStatus {
    match client.status().await.expect("mirror status") {
        NodeStatus::Mirror(status) => status,
        NodeStatus::Source(_) => panic!("expected a mirror"),
    }
}

/// A source's status.
pub async fn source_status(client: &Client) -> SourceStatus {
    match client.status().await.expect("source status") {
        NodeStatus::Source(status) => status,
        NodeStatus::Mirror(_) => panic!("expected a source"),
    }
}

/// Waits until the mirror is consistent at the source's current last LSN, then checks the
/// two digests are equal at that LSN. Returns the mirror's status.
pub async fn assert_converged(source: &Client, mirror: &Client) -> MirrorStatus {
    let target = source_status(source).await.last_lsn;
    let status = wait_until(
        "the mirror to converge",
        Duration::from_secs(120),
        || async {
            let status = mirror_status(mirror).await;
            (status.consistent && status.applied_lsn >= target).then_some(status)
        },
    )
    .await;
    let source_digest = source.digest().await.expect("source digest");
    let mirror_digest = mirror.digest().await.expect("mirror digest");
    assert_eq!(
        source_digest, mirror_digest,
        "digests differ at the same LSN (source, mirror)"
    );
    status
}

/// Copies a stopped node's data directory (a backup, or its restore).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A proxy to `source` that carries 4 MB/s towards the mirror: a snapshot of tens of MB
/// takes seconds, however fast or loaded this machine is.
pub async fn slow_link(source: std::net::SocketAddr) -> Proxy {
    capped_link(source, 4_000_000).await
}

/// A proxy to `source` that carries `bytes_per_second` towards the mirror.
pub async fn capped_link(source: std::net::SocketAddr, bytes_per_second: u64) -> Proxy {
    let link = Proxy::start(source).await;
    link.set(
        Direction::ToMirror,
        Impairment {
            bandwidth: Some(bytes_per_second),
            ..Impairment::default()
        },
    );
    link
}

/// Source flags for the tests that kill a mirror mid-snapshot: a crawling link lands the
/// kill mid-snapshot only if the snapshot is as large on the wire as in the store, and the
/// test values (a key, then `x` padding) compress twentyfold.
pub const UNCOMPRESSED: &[&str] = &["--compression", "off"];
