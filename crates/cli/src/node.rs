//! `xmirror source` and `xmirror mirror`: run a node until it is stopped (Ctrl-C or
//! SIGTERM) or, for a mirror, until the source refuses it permanently.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use xmirror_mirror::{MirrorConfig, MirrorNode};

use xmirror_net::TransportLimits;
use xmirror_source::{SourceConfig, SourceNode, Successors};
use xmirror_store::EngineKind;
use xmirror_tls::NodeTls;

use xmirror_proto::{PeerIdentity, Role, SUPPORTED_VERSIONS};

use crate::client::resolve;
use crate::logs::LogFormat;
use crate::settings::{read_file, required, to_commented_toml, MirrorSettings, SourceSettings};

#[derive(Args)]
pub struct SourceArgs {
    /// TOML file with any of the settings below (flags win over it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration (flags, environment, file and defaults) as a
    /// commented config file and exit; without the required settings, a template.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: SourceSettings,
}

#[derive(Args)]
pub struct MirrorArgs {
    /// TOML file with any of the settings below (flags win over it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration (flags, environment, file and defaults) as a
    /// commented config file and exit; without the required settings, a template.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: MirrorSettings,
}

/// What a source needs besides its [`SourceConfig`].
struct SourcePlan {
    config: SourceConfig,
    log_format: LogFormat,
    /// Required settings given nowhere, holding placeholders (`--print-config` only).
    missing: Vec<&'static str>,
    /// Link bandwidth (Mbit/s) and RTT (ms) the windows were sized for, if given.
    link: Option<(u64, u64)>,
    metrics: Option<String>,
    certs: PathBuf,
    name: String,
    listen: String,
}

/// `--print-config` without some required settings prints a template: each missing one
/// holds a placeholder and is listed, so that the template shows it commented out.
struct Template {
    enabled: bool,
    missing: Vec<&'static str>,
}

impl Template {
    fn new(enabled: bool) -> Template {
        Template {
            enabled,
            missing: Vec::new(),
        }
    }

    fn fill<T>(&mut self, key: &'static str, value: &mut Option<T>, example: impl Into<T>) {
        if self.enabled && value.is_none() {
            *value = Some(example.into());
            self.missing.push(key);
        }
    }
}

/// A placeholder name of a template.
fn example_name(name: &str) -> xmirror_proto::Name {
    xmirror_proto::Name::new(name).expect("placeholder names are valid")
}

/// `path` made absolute against the working directory, so that a printed configuration
/// means the same from anywhere.
fn absolute(path: PathBuf) -> anyhow::Result<PathBuf> {
    std::path::absolute(&path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// Overrides a default with a given setting.
fn set<T>(target: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *target = value;
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The engine named by `--engine`, if any.
fn engine(name: Option<&str>) -> anyhow::Result<Option<EngineKind>> {
    Ok(name.map(str::parse).transpose()?)
}

/// The link settings, as one value: both or neither.
fn link(mbit_s: Option<u64>, rtt_ms: Option<u64>) -> anyhow::Result<Option<(u64, u64)>> {
    match (mbit_s, rtt_ms) {
        (Some(mbit_s), Some(rtt_ms)) => Ok(Some((mbit_s, rtt_ms))),
        (None, None) => Ok(None),
        _ => anyhow::bail!("--link-mbit-s and --link-rtt-ms go together: give both or neither"),
    }
}

/// Transport windows for the link, keeping the other limits.
fn size_for_link(limits: &mut TransportLimits, link: Option<(u64, u64)>) {
    if let Some((mbit_s, rtt_ms)) = link {
        let sized = TransportLimits::for_link(mbit_s * 125_000, Duration::from_millis(rtt_ms));
        limits.stream_receive_window = sized.stream_receive_window;
        limits.send_window = sized.send_window;
    }
}

async fn plan_source(
    args: &SourceArgs,
    log_format: Option<LogFormat>,
) -> anyhow::Result<SourcePlan> {
    let file = read_file(args.config.as_deref())?;
    let mut settings = args.settings.clone().or(file.settings);
    let mut template = Template::new(args.print_config);
    template.fill(
        "data_dir",
        &mut settings.data_dir,
        "/var/lib/xmirror/source",
    );
    template.fill(
        "cluster_id",
        &mut settings.cluster_id,
        example_name("CLUSTER"),
    );
    template.fill("listen", &mut settings.listen, "0.0.0.0:7000");
    template.fill("certs", &mut settings.certs, "/etc/xmirror/certs");
    template.fill("name", &mut settings.name, "NAME");
    let listen = required(settings.listen, "listen")?;
    let mut config = SourceConfig::new(
        absolute(required(settings.data_dir, "data_dir")?)?,
        required(settings.cluster_id, "cluster_id")?,
        resolve(&listen).await?,
    );
    set(&mut config.database, settings.database);
    set(&mut config.engine, engine(settings.engine.as_deref())?);
    if let Some(cache_mb) = settings.cache_mb {
        config.store_options.cache_bytes = cache_mb << 20;
    }
    let link = link(settings.link_mbit_s, settings.link_rtt_ms)?;
    size_for_link(&mut config.transport, link);
    set(&mut config.max_wal_entries, settings.max_wal_entries);
    set(&mut config.max_wal_bytes, settings.max_wal_bytes);
    if let Some(seconds) = settings.slot_idle_timeout {
        config.slot_idle_timeout = Some(Duration::from_secs(seconds));
    }
    set(
        &mut config.foreign_slot_idle_timeout,
        settings.foreign_slot_idle_timeout.map(Duration::from_secs),
    );
    set(
        &mut config.unfinished_slot_timeout,
        settings.unfinished_slot_timeout.map(Duration::from_secs),
    );
    set(&mut config.max_slots, settings.max_slots);
    set(
        &mut config.max_slots_per_cluster,
        settings.max_slots_per_cluster,
    );
    set(&mut config.max_connections, settings.max_connections);
    set(&mut config.max_handshakes, settings.max_handshakes);
    if let Some(successors) = &settings.successor {
        config.successors = successors_of(successors)?;
    }
    set(
        &mut config.max_connections_per_peer,
        settings.max_connections_per_peer,
    );
    set(
        &mut config.client.connection_budget,
        settings.max_connection_bytes,
    );
    set(
        &mut config.client.max_waiting_reads,
        settings.max_waiting_reads,
    );
    set(&mut config.transport.max_streams, settings.max_streams);
    set(
        &mut config.frame_limits.handshake,
        settings.max_handshake_frame_bytes,
    );
    set(&mut config.frame_limits.data, settings.max_frame_bytes);
    set(&mut config.max_unacked_bytes, settings.max_unacked_bytes);
    if let Some(compression) = settings.compression.as_deref() {
        config.compression = compression.parse()?;
    }
    if let Some(mbit_s) = settings.max_send_mbit_s {
        anyhow::ensure!(mbit_s > 0, "--max-send-mbit-s must be at least 1");
        config.max_send_bytes_per_s = Some(mbit_s.saturating_mul(1_000_000) / 8);
    }
    set(&mut config.max_key_len, settings.max_key_bytes);
    set(&mut config.max_value_len, settings.max_value_bytes);
    set(
        &mut config.handshake_timeout,
        settings.handshake_timeout_ms.map(Duration::from_millis),
    );
    set(
        &mut config.tls_timeout,
        settings.tls_timeout_ms.map(Duration::from_millis),
    );
    set(
        &mut config.transport.idle_timeout,
        settings.idle_timeout_ms.map(Duration::from_millis),
    );
    Ok(SourcePlan {
        config,
        log_format: log_format.or(file.log_format).unwrap_or_default(),
        missing: template.missing,
        link,
        metrics: settings.metrics,
        certs: absolute(required(settings.certs, "certs")?)?,
        name: required(settings.name, "name")?,
        listen,
    })
}

/// `--successor` as the source takes it: SPIFFE IDs of observers, or of the source
/// certificates those observers will serve with.
fn successors_of(ids: &[String]) -> anyhow::Result<Successors> {
    let listed = ids
        .iter()
        .map(|id| {
            let identity = xmirror_tls::identity::parse_spiffe_id(id)
                .with_context(|| format!("--successor {id}: not a SPIFFE ID"))?;
            anyhow::ensure!(
                matches!(identity.role, Role::Observer | Role::Source),
                "--successor {id}: a successor is an observer (which fences as it mirrors) or a source, not a {}",
                identity.role
            );
            Ok(identity)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Successors::Listed(listed))
}

impl SourcePlan {
    /// Every setting as it will be used, defaults included.
    fn effective(&self) -> SourceSettings {
        let config = &self.config;
        SourceSettings {
            data_dir: Some(config.data_dir.clone()),
            cluster_id: Some(config.cluster_id.clone()),
            listen: Some(self.listen.clone()),
            certs: Some(self.certs.clone()),
            name: Some(self.name.clone()),
            database: Some(config.database.clone()),
            engine: Some(config.engine.to_string()),
            cache_mb: Some(config.store_options.cache_bytes >> 20),
            link_mbit_s: self.link.map(|(mbit_s, _)| mbit_s),
            link_rtt_ms: self.link.map(|(_, rtt_ms)| rtt_ms),
            max_wal_entries: Some(config.max_wal_entries),
            max_wal_bytes: Some(config.max_wal_bytes),
            slot_idle_timeout: config.slot_idle_timeout.map(|timeout| timeout.as_secs()),
            foreign_slot_idle_timeout: Some(config.foreign_slot_idle_timeout.as_secs()),
            unfinished_slot_timeout: Some(config.unfinished_slot_timeout.as_secs()),
            max_slots: Some(config.max_slots),
            max_slots_per_cluster: Some(config.max_slots_per_cluster),
            handshake_timeout_ms: Some(millis(config.handshake_timeout)),
            tls_timeout_ms: Some(millis(config.tls_timeout)),
            idle_timeout_ms: Some(millis(config.transport.idle_timeout)),
            max_connections: Some(config.max_connections),
            max_handshakes: Some(config.max_handshakes),
            max_connections_per_peer: Some(config.max_connections_per_peer),
            max_connection_bytes: Some(config.client.connection_budget),
            max_waiting_reads: Some(config.client.max_waiting_reads),
            max_streams: Some(config.transport.max_streams),
            max_handshake_frame_bytes: Some(config.frame_limits.handshake),
            max_frame_bytes: Some(config.frame_limits.data),
            max_unacked_bytes: Some(config.max_unacked_bytes),
            compression: Some(config.compression.to_string()),
            max_send_mbit_s: config
                .max_send_bytes_per_s
                .map(|bytes_per_s| bytes_per_s * 8 / 1_000_000),
            max_key_bytes: Some(config.max_key_len),
            max_value_bytes: Some(config.max_value_len),
            metrics: self.metrics.clone(),
            successor: match &config.successors {
                Successors::OwnCluster => None,
                Successors::Listed(listed) => {
                    Some(listed.iter().map(PeerIdentity::spiffe_uri).collect())
                }
            },
        }
    }
}

/// What a mirror needs besides its [`MirrorConfig`].
struct MirrorPlan {
    config: MirrorConfig,
    log_format: LogFormat,
    /// Required settings given nowhere, holding placeholders (`--print-config` only).
    missing: Vec<&'static str>,
    /// Link bandwidth (Mbit/s) and RTT (ms) the windows were sized for, if given.
    link: Option<(u64, u64)>,
    metrics: Option<String>,
    certs: PathBuf,
    name: String,
    source: String,
    listen: Option<String>,
    /// The node's own source certificate's name, for after a promotion.
    source_name: Option<String>,
}

async fn plan_mirror(
    args: &MirrorArgs,
    log_format: Option<LogFormat>,
) -> anyhow::Result<MirrorPlan> {
    let file = read_file(args.config.as_deref())?;
    let mut settings = args.settings.clone().or(file.settings);
    let mut template = Template::new(args.print_config);
    template.fill(
        "data_dir",
        &mut settings.data_dir,
        "/var/lib/xmirror/mirror",
    );
    template.fill("source", &mut settings.source, "127.0.0.1:7000");
    template.fill(
        "source_cluster",
        &mut settings.source_cluster,
        example_name("CLUSTER"),
    );
    template.fill("certs", &mut settings.certs, "/etc/xmirror/certs");
    template.fill("name", &mut settings.name, "NAME");
    let source = required(settings.source, "source")?;
    let listen_addr = match &settings.listen {
        Some(listen) => Some(resolve(listen).await?),
        None => None,
    };
    let mut config = MirrorConfig::new(
        absolute(required(settings.data_dir, "data_dir")?)?,
        resolve(&source).await?,
        required(settings.source_cluster, "source_cluster")?,
        listen_addr,
    );
    set(&mut config.database, settings.database);
    set(&mut config.engine, engine(settings.engine.as_deref())?);
    if let Some(cache_mb) = settings.cache_mb {
        config.store_options.cache_bytes = cache_mb << 20;
    }
    let link = link(settings.link_mbit_s, settings.link_rtt_ms)?;
    size_for_link(&mut config.transport, link);
    set(&mut config.versions, settings.protocol_versions);
    set(
        &mut config.source_silence_timeout,
        settings
            .source_silence_timeout_ms
            .map(Duration::from_millis),
    );
    set(
        &mut config.connect_timeout,
        settings.connect_timeout_ms.map(Duration::from_millis),
    );
    set(
        &mut config.backoff_max,
        settings.backoff_max_ms.map(Duration::from_millis),
    );
    set(
        &mut config.promote_timeout,
        settings.promote_timeout_ms.map(Duration::from_millis),
    );
    set(&mut config.on_divergence, settings.on_divergence);
    set(
        &mut config.max_connections_per_peer,
        settings.max_connections_per_peer,
    );
    set(
        &mut config.client.connection_budget,
        settings.max_connection_bytes,
    );
    set(
        &mut config.client.max_waiting_reads,
        settings.max_waiting_reads,
    );
    set(&mut config.max_wal_entries, settings.max_wal_entries);
    set(&mut config.max_wal_bytes, settings.max_wal_bytes);
    config.promotable = settings.source_name.is_some();
    Ok(MirrorPlan {
        config,
        log_format: log_format.or(file.log_format).unwrap_or_default(),
        missing: template.missing,
        link,
        metrics: settings.metrics,
        certs: absolute(required(settings.certs, "certs")?)?,
        name: required(settings.name, "name")?,
        source,
        listen: settings.listen,
        source_name: settings.source_name,
    })
}

impl MirrorPlan {
    /// Every setting as it will be used, defaults included.
    fn effective(&self) -> MirrorSettings {
        let config = &self.config;
        MirrorSettings {
            data_dir: Some(config.data_dir.clone()),
            source: Some(self.source.clone()),
            source_cluster: Some(config.source_cluster.clone()),
            certs: Some(self.certs.clone()),
            name: Some(self.name.clone()),
            listen: self.listen.clone(),
            database: Some(config.database.clone()),
            engine: Some(config.engine.to_string()),
            cache_mb: Some(config.store_options.cache_bytes >> 20),
            link_mbit_s: self.link.map(|(mbit_s, _)| mbit_s),
            link_rtt_ms: self.link.map(|(_, rtt_ms)| rtt_ms),
            source_silence_timeout_ms: Some(millis(config.source_silence_timeout)),
            connect_timeout_ms: Some(millis(config.connect_timeout)),
            backoff_max_ms: Some(millis(config.backoff_max)),
            promote_timeout_ms: Some(millis(config.promote_timeout)),
            max_connections_per_peer: Some(config.max_connections_per_peer),
            max_connection_bytes: Some(config.client.connection_budget),
            max_waiting_reads: Some(config.client.max_waiting_reads),
            on_divergence: Some(config.on_divergence),
            // A test-only setting: shown only when it differs from what this build speaks.
            protocol_versions: (config.versions != SUPPORTED_VERSIONS).then_some(config.versions),
            metrics: self.metrics.clone(),
            source_name: self.source_name.clone(),
            max_wal_entries: Some(config.max_wal_entries),
            max_wal_bytes: Some(config.max_wal_bytes),
        }
    }

    /// What the node serves with as a source once promoted: its own cluster (the source
    /// certificate's), the address it served reads on, and the mirror's settings that a
    /// source shares; the source's other settings keep their defaults.
    fn source_config(&self, cluster_id: xmirror_proto::Name) -> anyhow::Result<SourceConfig> {
        let mirror = &self.config;
        let listen = mirror
            .listen
            .context("a mirror is promoted through its --listen address")?;
        let mut config = SourceConfig::new(mirror.data_dir.clone(), cluster_id, listen);
        config.database = mirror.database.clone();
        config.engine = mirror.engine;
        config.store_options = mirror.store_options;
        config.transport = mirror.transport;
        config.frame_limits = mirror.frame_limits;
        config.handshake_timeout = mirror.handshake_timeout;
        config.client = mirror.client;
        config.max_connections = mirror.max_connections;
        config.max_connections_per_peer = mirror.max_connections_per_peer;
        config.max_handshakes = mirror.max_handshakes;
        config.max_wal_entries = mirror.max_wal_entries;
        config.max_wal_bytes = mirror.max_wal_bytes;
        Ok(config)
    }
}

/// Loads the certificate a mirror serves with once promoted, refusing at start one that
/// is not a `source` certificate of the mirror's own cluster.
fn load_source_tls(
    plan: &MirrorPlan,
    own_cluster: &xmirror_proto::Name,
) -> anyhow::Result<Option<NodeTls>> {
    let Some(source_name) = &plan.source_name else {
        return Ok(None);
    };
    let tls = load_tls(&plan.certs, source_name)?;
    let identity = tls.identity();
    if identity.role != xmirror_proto::Role::Source || &identity.cluster_id != own_cluster {
        anyhow::bail!(
            "--source-name {source_name}: {identity} is not a source certificate of this mirror's cluster {own_cluster}"
        );
    }
    Ok(Some(tls))
}

/// Serves the Prometheus text format on `addr` (path `/metrics`, or any path).
async fn serve_metrics(addr: Option<&str>) -> anyhow::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let addr = resolve(addr).await?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    tracing::info!(addr = %addr, "serving metrics");
    Ok(())
}

async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `shutdown` (after the first SIGTERM or SIGINT) unless a second signal comes first:
/// then the process exits at once, as an operator pressing Ctrl-C twice expects. Nothing is
/// lost by that: every acknowledged write and applied entry is already durable.
async fn shut_down(shutdown: impl std::future::Future<Output = ()>) {
    tracing::info!("stopping");
    tokio::select! {
        () = shutdown => tracing::info!("stopped cleanly"),
        () = stopped() => {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}

fn load_tls(certs: &std::path::Path, name: &str) -> anyhow::Result<NodeTls> {
    let tls = NodeTls::load(certs, name)
        .with_context(|| format!("cannot load the certificates of {name}"))?;
    tls.check_validity(time::OffsetDateTime::now_utc().unix_timestamp())?;
    Ok(tls)
}

/// Certificates closer to expiry than this are warned about.
const EXPIRY_WARNING: i64 = 30 * 86_400;

/// Publishes `xmirror_certificate_expiry_seconds` for the node's own certificate and each
/// trusted CA, every minute, and warns (at start, then daily) about any expiring within 30
/// days or already expired.
async fn watch_expiry(certificates: Vec<(bool, xmirror_tls::inspect::CertificateSummary)>) {
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let warn = warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(86_400));
        for (own, summary) in &certificates {
            let kind = if *own { "node" } else { "ca" };
            let left = summary.seconds_left(now);
            metrics::gauge!(
                "xmirror_certificate_expiry_seconds",
                "certificate" => kind,
                "subject" => summary.subject.clone()
            )
            .set(left as f64);
            if warn && left < EXPIRY_WARNING {
                tracing::warn!(
                    certificate = kind,
                    subject = %summary.subject,
                    not_after = %xmirror_tls::inspect::rfc3339(summary.not_after),
                    days_left = left / 86_400,
                    "certificate expires soon: re-issue it (xmirror certs issue --force)"
                );
                warned_at = Some(tokio::time::Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// How long a source whose store failed keeps its connections open, so that the writes of
/// the failed group are told STORE_FAILED before it stops.
const STORE_FAILURE_GRACE: Duration = Duration::from_secs(1);

pub async fn run_source(args: SourceArgs, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    let plan = plan_source(&args, log_format).await?;
    if args.print_config {
        let effective = plan.effective();
        print!(
            "{}",
            to_commented_toml("source", plan.log_format, &effective, &plan.missing)?
        );
        return Ok(());
    }
    crate::logs::init(plan.log_format, "info");
    let tls = load_tls(&plan.certs, &plan.name)?;
    serve_metrics(plan.metrics.as_deref()).await?;
    tokio::spawn(watch_expiry(tls.certificates()));
    let node = SourceNode::start(plan.config, &tls)
        .await
        .context("cannot start the source")?;
    println!("source {} serving on {}", tls.identity(), node.local_addr);
    serve_source(node).await
}

/// Runs a started source until a signal or a failed store stops it.
async fn serve_source(mut node: SourceNode) -> anyhow::Result<()> {
    let failure = tokio::select! {
        () = stopped() => None,
        failure = node.wait() => Some(failure),
    };
    if let Some(failure) = failure {
        // Crash-only: a failed store write leaves its outcome unknown; the restart that
        // follows recovers, and nothing unflushed was ever visible. The store already
        // refuses everything; the writes of the failed group are answered STORE_FAILED,
        // and those answers get a moment to leave before the connections close.
        tokio::time::sleep(STORE_FAILURE_GRACE).await;
        node.shutdown().await;
        return Err(failure).context("the source stopped");
    }
    shut_down(node.shutdown()).await;
    Ok(())
}

pub async fn run_mirror(args: MirrorArgs, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    let plan = plan_mirror(&args, log_format).await?;
    if args.print_config {
        let effective = plan.effective();
        print!(
            "{}",
            to_commented_toml("mirror", plan.log_format, &effective, &plan.missing)?
        );
        return Ok(());
    }
    crate::logs::init(plan.log_format, "info");
    let tls = Arc::new(load_tls(&plan.certs, &plan.name)?);
    let source_tls = load_source_tls(&plan, &tls.identity().cluster_id)?;
    serve_metrics(plan.metrics.as_deref()).await?;
    tokio::spawn(watch_expiry(tls.certificates()));
    let source = plan.config.source;
    let identity = tls.identity().clone();
    let mut node = MirrorNode::start(plan.config.clone(), tls)
        .await
        .context("cannot start the mirror")?;
    match node.listen_addr {
        Some(addr) => {
            println!("mirror {identity} of {source}: connecting; reads on {addr} once consistent")
        }
        None => println!("mirror {identity} of {source}: connecting"),
    }
    let progress = tokio::spawn(crate::progress::show(node.shared().clone()));
    let outcome = tokio::select! {
        result = node.wait() => Some(result),
        () = stopped() => None,
    };
    // The progress display holds the shared state: it goes first, so that shutdown does not
    // wait for it.
    progress.abort();
    let _ = progress.await;
    let promoted = match outcome {
        Some(result) => result.context("the mirror stopped")?,
        None => {
            shut_down(node.shutdown()).await;
            return Ok(());
        }
    };
    let Some(source_tls) = source_tls else {
        // Only a store promoted before this process started gets here without one.
        anyhow::bail!(
            "this data directory was promoted to a source and its old source is fenced: start it as xmirror source, or as a mirror with --source-name"
        );
    };
    let config = plan.source_config(source_tls.identity().cluster_id.clone())?;
    let handover = node.into_handover().await;
    let node = match handover.endpoint {
        Some(endpoint) => {
            SourceNode::take_over(config, &source_tls, endpoint, handover.store).await
        }
        None => anyhow::bail!("a mirror is promoted through its --listen address"),
    }
    .context("cannot start serving as a source")?;
    if let Some(old_source) = handover.old_source {
        node.watch_old_source(old_source);
    }
    println!(
        "promoted: epoch {} starts at lsn {}; source {} serving on {}",
        promoted.epoch,
        promoted.first_lsn,
        source_tls.identity(),
        node.local_addr
    );
    tracing::warn!(
        restart_as = %format!(
            "xmirror source --data-dir {} --cluster-id {} --listen {} --certs {} --name {}",
            plan.config.data_dir.display(),
            source_tls.identity().cluster_id,
            node.local_addr,
            plan.certs.display(),
            source_tls.identity().name
        ),
        "this node is a source now: restart it as one (started as a mirror again, it follows --source)"
    );
    serve_source(node).await
}
