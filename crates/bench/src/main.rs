//! `xmirror-bench`: where the time goes, as ratios measured in one run.
//!
//! Every xmirror figure is set beside a baseline measured in the same run on the same
//! machine: the transport ceiling (a raw quinn stream with the nodes' TLS and transport
//! settings), the store ceiling (bare engine batch inserts), and Redis's own replication.
//! Nodes run in this process through the same `SourceNode`/`MirrorNode` the binary runs,
//! on loopback, with real stores on disk; the WAN measures go through the UDP
//! impairment proxy of the fault suite. docs/PERFORMANCE.md explains each measure.
//!
//! - [`cluster`]: certificates and nodes.
//! - [`dataset`]: keys and values, store population, the store ceiling.
//! - [`transport`]: the transport ceiling.
//! - [`load`]: paced writes and per-entry lag.
//! - [`redis`]: the Redis primary and replica.
//! - [`sink`]: a mirror that stores nothing, for the source's own fan-out cost.
//! - [`stages`]: the nodes' stage marks, recorded: where the lag goes.
//! - [`report`]: results.json and the table.

mod cluster;
mod dataset;
mod load;
mod redis;
mod report;
mod sink;
mod stages;
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::{Parser, ValueEnum};
use futures_util::{StreamExt, TryStreamExt};
use xmirror_client::{Scan, Write};
use xmirror_e2e::proxy::{Impairment, Proxy};
use xmirror_mirror::MirrorNode;
use xmirror_net::stage::Stage;
use xmirror_net::TransportLimits;
use xmirror_proto::message::DecisionKind;
use xmirror_proto::{Compression, Entry, Lsn};
use xmirror_source::SourceNode;
use xmirror_store::EngineKind;

use crate::cluster::{wait_consistent, Cluster};
use crate::dataset::{Dataset, Values};
use crate::load::{paced_puts, Percentiles};
use crate::report::Report;
use crate::sink::Sink;
use crate::stages::{Lag, StageRecorder};

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;
/// Flushes of the disk-flush probe.
const FLUSH_PROBES: usize = 2_000;
/// How many times the noisy lag measures run: figures are the median run's.
const LAG_RUNS: usize = 3;
/// Longest any one wait for a mirror may take before the run fails.
const WAIT_LIMIT: Duration = Duration::from_secs(600);

#[derive(Parser)]
#[command(about = "xmirror benchmarks against the transport, the store and Redis")]
struct Args {
    /// Reduced sizes and durations: the whole suite in under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Directory for results.json and results.md.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Run only these measures (comma-separated). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Measure>,
    /// The nodes' storage engine, redb or sled. Default: the nodes' default.
    #[arg(long)]
    engine: Option<EngineKind>,
    /// Where the stores live (a temporary directory is made inside). Default: the system's
    /// temporary directory. A tmpfs such as /dev/shm shows what the disk's flushes cost.
    #[arg(long)]
    scratch: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Measure {
    Transport,
    Store,
    Snapshot,
    Lag,
    Catchup,
    Fanout,
    Redis,
    Wan,
    Client,
    Longlink,
}

/// Sizes and durations of one run.
struct Plan {
    transport_bytes: u64,
    small: Dataset,
    large: Dataset,
    lag_duration: Duration,
    lag_rates: [u64; 2],
    catchup_entries: u64,
    fanout_writes: u64,
    wan: Dataset,
    wan_bandwidth: u64,
    wan_rtt: Duration,
    wan_lag_rate: u64,
    wan_lag_duration: Duration,
    /// The source's send-rate cap in the long-link measure, bytes per second.
    longlink_cap: u64,
    /// How long the live mirror's lag is measured beside the other mirror's snapshot.
    longlink_window: Duration,
    /// Writes of the client measure: single puts, then the same count in batches.
    client_writes: u64,
    client_batch_writes: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let scale = |full: u64, reduced: u64| if quick { reduced } else { full };
        Plan {
            transport_bytes: scale(1 << 30, 256 << 20),
            small: Dataset {
                keys: scale(1_000_000, 200_000),
                value_bytes: 100,
                prefix: "small-",
                values: Values::Random,
            },
            large: Dataset {
                keys: scale(100_000, 20_000),
                value_bytes: 4096,
                prefix: "large-",
                values: Values::Random,
            },
            lag_duration: Duration::from_secs(scale(30, 5)),
            lag_rates: [5_000, 20_000],
            catchup_entries: scale(1_000_000, 200_000),
            fanout_writes: scale(200_000, 50_000),
            wan: Dataset {
                keys: scale(50_000, 12_000),
                value_bytes: 4096,
                prefix: "wan-",
                values: Values::Random,
            },
            // 100 Mbit/s at 100 ms: a cross-region path.
            wan_bandwidth: 12_500_000,
            wan_rtt: Duration::from_millis(100),
            wan_lag_rate: 5_000,
            wan_lag_duration: Duration::from_secs(scale(30, 5)),
            // 80 Mbit/s: below the 100 Mbit/s link, so the cap, not the link, decides.
            longlink_cap: 10_000_000,
            longlink_window: Duration::from_secs(scale(10, 5)),
            client_writes: scale(500_000, 100_000),
            client_batch_writes: 1_000,
        }
    }
}

fn per_second(count: f64, elapsed: Duration) -> f64 {
    count / elapsed.as_secs_f64().max(1e-9)
}

/// The lowest and highest p99 of `runs`.
fn spread(runs: &[Percentiles]) -> (f64, f64) {
    runs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), run| {
            (low.min(run.p99), high.max(run.p99))
        })
}

fn rate_label(rate: u64) -> String {
    format!("{}k", rate / 1_000)
}

struct Bench {
    plan: Plan,
    cluster: Cluster,
    report: Report,
}

impl Bench {
    fn default_limits() -> TransportLimits {
        TransportLimits::default()
    }

    async fn start_source(
        &self,
        data_dir: PathBuf,
        limits: TransportLimits,
    ) -> anyhow::Result<SourceNode> {
        let mut config = self.cluster.source_config(data_dir);
        config.transport = limits;
        self.cluster.start_source(config).await
    }

    /// Measure 1: One raw quinn stream, `transport_bytes` long.
    async fn transport(&mut self) -> anyhow::Result<()> {
        let bytes = self.plan.transport_bytes;
        let cpu_before = load::cpu_seconds();
        let run = transport::raw_stream(&self.cluster, bytes, Self::default_limits(), None).await?;
        let cpu = load::cpu_seconds()
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let mib_s = per_second(bytes as f64 / MIB, run.elapsed);
        self.report.figure("transport_mib_s", mib_s);
        let cpu_per_gib = cpu.map(|cpu| cpu / (run.udp_bytes as f64 / GIB));
        if let Some(cpu_per_gib) = cpu_per_gib {
            self.report.figure("transport_cpu_s_per_gib", cpu_per_gib);
        }
        self.report.row(
            &format!("transport ceiling: one quinn stream, {} MiB", bytes >> 20),
            format!(
                "{mib_s:.0} MiB/s, {} CPU s per GiB (both ends)",
                cpu_per_gib.map_or("?".into(), |cpu| format!("{cpu:.2}"))
            ),
            String::new(),
            String::new(),
        );
        Ok(())
    }

    /// Measure 2: bare engine batch inserts of both datasets (the nodes' engine and the
    /// other one), and the mirror's chunk path on the nodes' engine.
    async fn store(&mut self) -> anyhow::Result<()> {
        let engine = self.cluster.engine;
        for (dataset, label) in [(self.plan.small, "1m"), (self.plan.large, "large")] {
            for bare in [EngineKind::Redb, EngineKind::Sled] {
                settle_disk().await;
                let dir = self.cluster.data_dir("bare");
                let elapsed =
                    tokio::task::spawn_blocking(move || dataset::raw_inserts(&dir, bare, &dataset))
                        .await??;
                let keys_s = per_second(dataset.keys as f64, elapsed);
                let mib_s = per_second(dataset.total_bytes() as f64 / MIB, elapsed);
                let suffix = if bare == engine {
                    String::new()
                } else {
                    format!("_{bare}")
                };
                if label == "1m" {
                    self.report.figure(&format!("store_keys_s{suffix}"), keys_s);
                }
                self.report
                    .figure(&format!("store_{label}_keys_s{suffix}"), keys_s);
                self.report
                    .figure(&format!("store_{label}_mib_s{suffix}"), mib_s);
                self.report.row(
                    &format!(
                        "store ceiling: bare {bare} batch inserts, {}",
                        dataset.describe()
                    ),
                    format!("{keys_s:.0} keys/s, {mib_s:.1} MiB/s"),
                    String::new(),
                    if bare == engine {
                        "(the nodes' engine)".into()
                    } else {
                        String::new()
                    },
                );
            }
            settle_disk().await;
            let dir = self.cluster.data_dir("chunks");
            let path_elapsed = tokio::task::spawn_blocking(move || {
                dataset::store_snapshot_path(&dir, engine, &dataset)
            })
            .await??;
            let path_keys_s = per_second(dataset.keys as f64, path_elapsed);
            let ceiling = self
                .report
                .get(&format!("store_{label}_keys_s"))
                .unwrap_or(f64::NAN);
            self.report
                .figure(&format!("store_chunk_path_{label}_keys_s"), path_keys_s);
            self.report.row(
                &format!(
                    "store: the mirror's chunk apply + flush on {engine}, {}",
                    dataset.describe()
                ),
                format!("{path_keys_s:.0} keys/s"),
                format!("{ceiling:.0} keys/s (bare {engine})"),
                format!("{:.2}", path_keys_s / ceiling),
            );
        }
        Ok(())
    }

    /// A new source data directory holding `dataset` as data only (no WAL: a mirror of it
    /// must take a snapshot), and its last LSN.
    async fn populated_source_dir(&self, dataset: Dataset) -> anyhow::Result<(PathBuf, Lsn)> {
        let source_dir = self.cluster.data_dir("source");
        let populate_dir = source_dir.clone();
        let engine = self.cluster.engine;
        let last = tokio::task::spawn_blocking(move || {
            dataset::populate(&populate_dir, engine, &dataset, false)
        })
        .await??;
        Ok((source_dir, last))
    }

    /// Measure 3: A new mirror until consistent, for each dataset.
    async fn snapshot(&mut self) -> anyhow::Result<()> {
        for (dataset, label) in [(self.plan.small, "1m"), (self.plan.large, "large")] {
            let (source_dir, last) = self.populated_source_dir(dataset).await?;
            // Populating the source is not the snapshot's to pay for.
            settle_disk().await;
            let source = self
                .start_source(source_dir, Self::default_limits())
                .await?;
            let cpu_before = load::cpu_seconds();
            let mirror = self
                .cluster
                .start_mirror(
                    0,
                    source.local_addr,
                    self.cluster.data_dir("mirror"),
                    Self::default_limits(),
                )
                .await?;
            let elapsed = wait_consistent(&mirror, last, WAIT_LIMIT).await?;
            let busy = load::cores_busy(cpu_before, elapsed);
            mirror.shutdown().await;
            source.shutdown().await;

            let seconds = elapsed.as_secs_f64();
            let mib_s = per_second(dataset.total_bytes() as f64 / MIB, elapsed);
            let keys_s = per_second(dataset.keys as f64, elapsed);
            self.report.figure(&format!("snapshot_{label}_s"), seconds);
            self.report
                .figure(&format!("snapshot_{label}_mib_s"), mib_s);
            self.report
                .figure(&format!("snapshot_{label}_keys_s"), keys_s);
            let ceiling = match (
                self.report.get("transport_mib_s"),
                self.report.get(&format!("store_{label}_mib_s")),
            ) {
                (Some(transport), Some(store)) => Some(transport.min(store)),
                _ => None,
            };
            let ratio = ceiling.map(|ceiling| mib_s / ceiling);
            if let Some(ratio) = ratio {
                let key = if label == "1m" {
                    "snapshot_ratio_to_ceiling".to_owned()
                } else {
                    format!("snapshot_{label}_ratio_to_ceiling")
                };
                self.report.figure(&key, ratio);
            }
            self.report.row(
                &format!("snapshot, new mirror to consistent, {}", dataset.describe()),
                format!(
                    "{seconds:.2} s, {mib_s:.1} MiB/s, {keys_s:.0} keys/s, {} cores busy",
                    busy.map_or("?".into(), |busy| format!("{busy:.1}"))
                ),
                ceiling.map_or("(ceilings not measured)".into(), |ceiling| {
                    format!("min(transport, store) {ceiling:.1} MiB/s")
                }),
                ratio.map_or(String::new(), |ratio| format!("{ratio:.2} (target >= 0.8)")),
            );
        }
        Ok(())
    }

    /// Commit-to-applied lag of one mirror at `rate`: per entry, from the source's durable
    /// group commit to the mirror's durable apply, and the time between each pair of stages
    /// on the way, from the nodes' stage marks.
    async fn xmirror_lag(
        &self,
        source: &SourceNode,
        mirror: &MirrorNode,
        rate: u64,
        duration: Duration,
        prefix: &'static str,
    ) -> anyhow::Result<Lag> {
        let client = self.cluster.client(source.local_addr).await?;
        let start = source.shared().store.position().lsn;
        let recorder = StageRecorder::global();
        recorder.start();
        let dataset = Dataset {
            keys: u64::MAX,
            value_bytes: 100,
            prefix,
            values: Values::Random,
        };
        let written = paced_puts(&client, dataset, rate, duration).await;
        let last = source.shared().store.position().lsn;
        let mut progress = mirror.shared().watch_progress();
        let caught_up = tokio::time::timeout(
            WAIT_LIMIT,
            progress.wait_for(|progress| progress.applied_lsn >= last),
        )
        .await
        .map(|waited| waited.map(|_| ()));
        let marks = recorder.finish();
        written?;
        caught_up.context("the mirror did not catch up")??;
        let entries = last.0 - start.0;
        let total = marks.lags(start, Stage::Committed, Stage::Applied);
        ensure!(
            total.len() as u64 == entries,
            "lag measured for {} of {entries} entries (from {start} to {last}; commit marks {}, apply marks {})",
            total.len(),
            marks.of(Stage::Committed).len(),
            marks.of(Stage::Applied).len(),
        );
        let stages = Stage::ALL
            .windows(2)
            .map(|pair| {
                let lags = marks.lags(start, pair[0], pair[1]);
                ensure!(
                    lags.len() as u64 == entries,
                    "{} marks cover {} of {entries} entries",
                    pair[1].name(),
                    lags.len()
                );
                Ok((pair[1], Percentiles::of(lags)))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Lag {
            total: Percentiles::of(total),
            stages,
        })
    }

    /// A source and a mirror streaming from it (through an impairment proxy if given).
    async fn streaming_pair(
        &self,
        limits: TransportLimits,
        proxy: Option<&Impairment>,
    ) -> anyhow::Result<(SourceNode, MirrorNode, Option<Proxy>)> {
        let source = self
            .start_source(self.cluster.data_dir("source"), limits)
            .await?;
        let proxy = match proxy {
            Some(impairment) => {
                let proxy = Proxy::start(source.local_addr).await;
                proxy.set_both(impairment.clone());
                Some(proxy)
            }
            None => None,
        };
        let dial: SocketAddr = proxy.as_ref().map_or(source.local_addr, |proxy| proxy.addr);
        let mirror = self
            .cluster
            .start_mirror(0, dial, self.cluster.data_dir("mirror"), limits)
            .await?;
        wait_consistent(&mirror, Lsn::ZERO, WAIT_LIMIT).await?;
        Ok((source, mirror, proxy))
    }

    /// Measure 4: Streaming lag at each rate, `LAG_RUNS` times: the median run's figures,
    /// the spread of the p99s, and where the time went stage by stage.
    async fn lag(&mut self) -> anyhow::Result<()> {
        let probe_dir = self.cluster.data_dir("flush");
        let flush = Percentiles::of(
            tokio::task::spawn_blocking(move || dataset::flush_latencies(&probe_dir, FLUSH_PROBES))
                .await??,
        );
        self.report.figure("disk_flush_p50_ms", flush.p50);
        self.report.figure("disk_flush_p99_ms", flush.p99);
        self.report.row(
            "disk flush: a 4 KiB overwrite and fdatasync (the floor of a durable apply)",
            format!(
                "p50 {:.3} ms, p99 {:.3} ms, max {:.1} ms",
                flush.p50, flush.p99, flush.max
            ),
            String::new(),
            String::new(),
        );
        let (source, mirror, _) = self.streaming_pair(Self::default_limits(), None).await?;
        for rate in self.plan.lag_rates {
            let mut runs = Vec::with_capacity(LAG_RUNS);
            for _ in 0..LAG_RUNS {
                runs.push(
                    self.xmirror_lag(&source, &mirror, rate, self.plan.lag_duration, "lag-")
                        .await?,
                );
            }
            let label = rate_label(rate);
            let totals: Vec<Percentiles> = runs.iter().map(|run| run.total).collect();
            let lag = Percentiles::median_of(&totals);
            self.report.figure(&format!("lag_p50_ms_{label}"), lag.p50);
            self.report.figure(&format!("lag_p99_ms_{label}"), lag.p99);
            self.report.figure(&format!("lag_max_ms_{label}"), lag.max);
            let (low, high) = spread(&totals);
            self.report.figure(&format!("lag_p99_ms_{label}_low"), low);
            self.report
                .figure(&format!("lag_p99_ms_{label}_high"), high);
            self.report.row(
                &format!(
                    "streaming lag at {rate} writes/s, {LAG_RUNS} runs of {} s (commit to durable apply)",
                    self.plan.lag_duration.as_secs_f64()
                ),
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms (runs {}), max {:.1} ms",
                    lag.p50,
                    lag.p99,
                    Percentiles::p99s_text(&totals),
                    lag.max
                ),
                String::new(),
                "p99 <= Redis's".into(),
            );
            let mut stages = Vec::new();
            for (index, (stage, _)) in runs[0].stages.iter().enumerate() {
                let stage_runs: Vec<Percentiles> =
                    runs.iter().map(|run| run.stages[index].1).collect();
                let Percentiles { p50, p99, .. } = Percentiles::median_of(&stage_runs);
                let name = stage.name();
                self.report
                    .figure(&format!("stage_{name}_p50_ms_{label}"), p50);
                self.report
                    .figure(&format!("stage_{name}_p99_ms_{label}"), p99);
                stages.push(format!("{name} {p50:.2} / {p99:.2}"));
            }
            self.report.row(
                &format!("  where it goes at {rate} writes/s: to each stage from the one before, p50 / p99 ms"),
                stages.join(", "),
                String::new(),
                String::new(),
            );
        }
        mirror.shutdown().await;
        source.shutdown().await;
        Ok(())
    }

    /// Measure 5: A mirror `catchup_entries` behind, until caught up.
    async fn catchup(&mut self) -> anyhow::Result<()> {
        let (source, mirror, _) = self.streaming_pair(Self::default_limits(), None).await?;
        // A mirror at LSN 0 would get a snapshot; one write makes it a streaming mirror.
        let client = self.cluster.client(source.local_addr).await?;
        client.put(b"seed", b"seed").await?;
        wait_consistent(&mirror, Lsn(1), WAIT_LIMIT).await?;
        let mirror_dir = mirror.shared().config.data_dir.clone();
        mirror.shutdown().await;

        let entries = self.plan.catchup_entries;
        let writer = source.shared().writer.clone();
        let dataset = Dataset {
            keys: entries,
            value_bytes: 100,
            prefix: "behind-",
            values: Values::Random,
        };
        futures_util::stream::iter(0..entries)
            .map(|index| {
                writer.write(Entry::Put {
                    key: dataset.key(index),
                    value: dataset.value(index),
                })
            })
            .buffer_unordered(4_096)
            .try_for_each(|_| std::future::ready(Ok(())))
            .await?;
        let last = source.shared().store.position().lsn;
        // The source's writes behind the mirror are not the catch-up's to pay for.
        settle_disk().await;

        let recorder = StageRecorder::global();
        recorder.start();
        let mirror = self
            .cluster
            .start_mirror(0, source.local_addr, mirror_dir, Self::default_limits())
            .await?;
        let elapsed = wait_consistent(&mirror, last, WAIT_LIMIT);
        let (elapsed, marks) = (elapsed.await, recorder.finish());
        let elapsed = elapsed?;
        // How much of the catch-up the mirror's store spent writing: near 1, the store
        // bounds it; well below, something before it does.
        let store_busy = marks.busy(Stage::Storing, Stage::Applied).as_secs_f64()
            / elapsed.as_secs_f64().max(1e-9);
        self.report.figure("catchup_store_busy", store_busy);
        let decision = mirror.shared().status()?.last_decision;
        ensure!(
            decision == Some(DecisionKind::Stream),
            "the catch-up should stream, the source decided {decision:?}"
        );
        mirror.shutdown().await;
        source.shutdown().await;
        let entries_s = per_second(entries as f64, elapsed);
        self.report.figure("catchup_entries_s", entries_s);
        self.report.row(
            &format!("catch-up: a mirror {entries} entries behind"),
            format!(
                "{entries_s:.0} entries/s ({:.2} s; the mirror's store writing {:.0} % of it)",
                elapsed.as_secs_f64(),
                store_busy * 100.0
            ),
            self.report
                .get("store_keys_s")
                .map_or(String::new(), |store| {
                    format!("{store:.0} keys/s (bare {})", self.cluster.engine)
                }),
            self.report
                .get("store_keys_s")
                .map_or(String::new(), |store| format!("{:.2}", entries_s / store)),
        );
        Ok(())
    }

    /// Measure 6: The source's write throughput with 0, 1 and 8 mirrors streaming.
    async fn fanout(&mut self) -> anyhow::Result<()> {
        let mut baseline = None;
        // CPU seconds the writes cost with no mirror, taken from the sink runs' to leave what
        // serving the sinks cost.
        let mut cpu_without_mirrors = None;
        for mirrors in [0usize, 1, 8] {
            let source = self
                .start_source(self.cluster.data_dir("source"), Self::default_limits())
                .await?;
            let mut nodes = Vec::new();
            for index in 0..mirrors {
                let mirror = self
                    .cluster
                    .start_mirror(
                        index,
                        source.local_addr,
                        self.cluster.data_dir("mirror"),
                        Self::default_limits(),
                    )
                    .await?;
                wait_consistent(&mirror, Lsn::ZERO, WAIT_LIMIT).await?;
                nodes.push(mirror);
            }
            let client = self.cluster.client(source.local_addr).await?;
            let cpu_before = load::cpu_seconds();
            let load = client
                .write_keys(self.plan.fanout_writes, 100, "fan-")
                .await?;
            if mirrors == 0 {
                cpu_without_mirrors = load::cpu_seconds()
                    .zip(cpu_before)
                    .map(|(after, before)| after - before);
            }
            let writes_s = per_second(load.written as f64, load.elapsed);
            for mirror in nodes {
                wait_consistent(&mirror, load.last_lsn, WAIT_LIMIT).await?;
                mirror.shutdown().await;
            }
            source.shutdown().await;
            let baseline = *baseline.get_or_insert(writes_s);
            self.report
                .figure(&format!("fanout{mirrors}_writes_s"), writes_s);
            if mirrors > 0 {
                self.report
                    .figure(&format!("fanout{mirrors}_write_ratio"), writes_s / baseline);
            }
            self.report.row(
                &format!("source writes with {mirrors} mirrors streaming"),
                format!("{writes_s:.0} writes/s"),
                format!("{baseline:.0} writes/s (no mirror)"),
                if mirrors == 0 {
                    String::new()
                } else {
                    format!("{:.2} (target >= 0.9 at 8)", writes_s / baseline)
                },
            );
        }
        // The same with sink mirrors: what serving mirrors costs the source itself, without
        // the mirrors' own storage work competing for this machine's two cores.
        for sinks in [1usize, 8] {
            let source = self
                .start_source(self.cluster.data_dir("source"), Self::default_limits())
                .await?;
            let client = self.cluster.client(source.local_addr).await?;
            client.put(b"seed", b"seed").await?;
            let position = source.shared().store.position();
            let mut attached = Vec::new();
            for index in 0..sinks {
                attached.push(
                    sink::attach(
                        &self.cluster,
                        index,
                        source.local_addr,
                        source.shared().database.id,
                        position,
                    )
                    .await?,
                );
            }
            let bytes_before: u64 = attached.iter().map(Sink::udp_bytes_received).sum();
            let cpu_before = load::cpu_seconds();
            let load = client
                .write_keys(self.plan.fanout_writes, 100, "fan-")
                .await?;
            let writes_s = per_second(load.written as f64, load.elapsed);
            for sink in &mut attached {
                tokio::time::timeout(
                    WAIT_LIMIT,
                    sink.acked.wait_for(|acked| *acked >= load.last_lsn),
                )
                .await
                .context("a sink mirror did not catch up")??;
            }
            let cpu = load::cpu_seconds()
                .zip(cpu_before)
                .map(|(after, before)| after - before);
            let bytes_sent =
                attached.iter().map(Sink::udp_bytes_received).sum::<u64>() - bytes_before;
            drop(attached);
            // What serving the sinks cost both ends, per GiB the sinks received: the same
            // accounting as the transport ceiling's, whose both ends run here too.
            let cpu_per_gib = cpu
                .zip(cpu_without_mirrors)
                .map(|(cpu, without)| (cpu - without).max(0.0) / (bytes_sent as f64 / GIB));
            if let Some(cpu_per_gib) = cpu_per_gib {
                self.report
                    .figure(&format!("fanout{sinks}_sink_cpu_s_per_gib"), cpu_per_gib);
                let transport = self.report.get("transport_cpu_s_per_gib");
                if let (8, Some(transport)) = (sinks, transport) {
                    self.report
                        .figure("fanout_cpu_per_gib_vs_transport", cpu_per_gib / transport);
                }
                self.report.row(
                    &format!("serving {sinks} sink mirrors: CPU s per GiB sent (both ends)"),
                    format!("{cpu_per_gib:.2}"),
                    transport.map_or("(transport not measured)".into(), |transport| {
                        format!("{transport:.2} (one raw quinn stream)")
                    }),
                    transport.map_or(String::new(), |transport| {
                        format!("{:.2} (target <= 1.5)", cpu_per_gib / transport)
                    }),
                );
            }
            source.shutdown().await;
            let baseline = baseline.unwrap_or(writes_s);
            self.report.figure(
                &format!("fanout{sinks}_sink_write_ratio"),
                writes_s / baseline,
            );
            self.report.row(
                &format!("source writes with {sinks} sink mirrors (ack, store nothing)"),
                format!("{writes_s:.0} writes/s"),
                format!("{baseline:.0} writes/s (no mirror)"),
                format!("{:.2} (the source's own cost)", writes_s / baseline),
            );
        }
        Ok(())
    }

    /// Measure 9: the client API. Writes: pipelined single puts against the same count
    /// in batches (four in flight). Scans of everything written on the source and on a
    /// consistent mirror, against the same scan of the source's store in-process.
    async fn client(&mut self) -> anyhow::Result<()> {
        const BATCHES_IN_FLIGHT: usize = 4;
        let source = self
            .start_source(self.cluster.data_dir("source"), Self::default_limits())
            .await?;
        let writer = self.cluster.client(source.local_addr).await?;
        let puts = writer
            .write_keys(self.plan.client_writes, 100, "put-")
            .await?;
        let puts_s = per_second(puts.written as f64, puts.elapsed);

        let batch_size = self.plan.client_batch_writes;
        let batches = (self.plan.client_writes as usize).div_ceil(batch_size);
        let next_batch = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..BATCHES_IN_FLIGHT {
            let (writer, next_batch) = (writer.clone(), next_batch.clone());
            tasks.spawn(async move {
                loop {
                    let batch = next_batch.fetch_add(1, Ordering::Relaxed);
                    if batch >= batches {
                        return Ok::<_, xmirror_client::Error>(());
                    }
                    let writes = (0..batch_size)
                        .map(|index| Write::put(format!("batch-{batch:06}-{index:04}"), [7u8; 100]))
                        .collect();
                    writer.batch(writes).await?;
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let batch_writes_s = per_second((batches * batch_size) as f64, started.elapsed());
        self.report.figure("put_writes_s", puts_s);
        self.report.figure("batch_writes_s", batch_writes_s);
        self.report.figure("batch_vs_put", batch_writes_s / puts_s);
        self.report.row(
            &format!("client writes in batches of {batch_size} ({BATCHES_IN_FLIGHT} in flight)"),
            format!("{batch_writes_s:.0} writes/s"),
            format!("{puts_s:.0} writes/s (single puts, pipelined)"),
            format!("{:.2}", batch_writes_s / puts_s),
        );

        let last_lsn = source.shared().store.position().lsn;
        let mirror = self
            .cluster
            .start_mirror(
                0,
                source.local_addr,
                self.cluster.data_dir("mirror"),
                Self::default_limits(),
            )
            .await?;
        wait_consistent(&mirror, last_lsn, WAIT_LIMIT).await?;
        let store = source.shared().store.clone();
        let started = Instant::now();
        let in_store = tokio::task::spawn_blocking(move || {
            let mut pairs = 0u64;
            store.scan_range(b"", None, &mut |_, _, _| {
                pairs += 1;
                Ok(true)
            })?;
            Ok::<_, xmirror_store::StoreError>(pairs)
        })
        .await??;
        let store_pairs_s = per_second(in_store as f64, started.elapsed());
        self.report.figure("scan_store_pairs_s", store_pairs_s);
        let mirror_addr = mirror.listen_addr.context("the mirror serves reads")?;
        for (label, addr) in [("source", source.local_addr), ("mirror", mirror_addr)] {
            let reader = self.cluster.client(addr).await?;
            let started = Instant::now();
            let scanned = reader.scan_all(Scan::all()).await?;
            let pairs_s = per_second(scanned.pairs.len() as f64, started.elapsed());
            ensure!(
                scanned.pairs.len() as u64 == in_store,
                "the {label} scanned {} pairs, its store holds {in_store}",
                scanned.pairs.len()
            );
            self.report
                .figure(&format!("scan_{label}_pairs_s"), pairs_s);
            self.report
                .figure(&format!("scan_{label}_vs_store"), pairs_s / store_pairs_s);
            self.report.row(
                &format!("scan of {in_store} pairs on the {label} (client, one state)"),
                format!("{pairs_s:.0} pairs/s"),
                format!("{store_pairs_s:.0} pairs/s (the source's store, in-process)"),
                format!("{:.2}", pairs_s / store_pairs_s),
            );
        }
        mirror.shutdown().await;
        source.shutdown().await;
        Ok(())
    }

    /// Measure 7: Redis: full sync of the small dataset, replication lag at the same rates.
    async fn redis(&mut self) -> anyhow::Result<()> {
        let scratch = self.cluster.data_dir("redis");
        let elapsed = redis::full_sync(&scratch.join("sync"), &self.plan.small).await?;
        let seconds = elapsed.as_secs_f64();
        self.report.figure("redis_full_sync_1m_s", seconds);
        let ours = self.report.get("snapshot_1m_s");
        if let Some(ours) = ours {
            self.report.figure("snapshot_vs_redis", ours / seconds);
        }
        self.report.row(
            &format!("Redis full sync, {}", self.plan.small.describe()),
            ours.map_or("(snapshot not measured)".into(), |ours| {
                format!("{ours:.2} s (xmirror snapshot)")
            }),
            format!("{seconds:.2} s (Redis)"),
            ours.map_or(String::new(), |ours| {
                format!("{:.2} (target <= 1)", ours / seconds)
            }),
        );
        for rate in self.plan.lag_rates {
            let dataset = Dataset {
                keys: u64::MAX,
                value_bytes: 100,
                prefix: "lag-",
                values: Values::Random,
            };
            let mut runs = Vec::with_capacity(LAG_RUNS);
            for run in 0..LAG_RUNS {
                let dir = scratch.join(format!("lag-{rate}-{run}"));
                runs.push(redis::lag(&dir, dataset, rate, self.plan.lag_duration).await?);
            }
            let lag = Percentiles::median_of(&runs);
            let label = rate_label(rate);
            let (low, high) = spread(&runs);
            self.report
                .figure(&format!("redis_lag_p99_ms_{label}_low"), low);
            self.report
                .figure(&format!("redis_lag_p99_ms_{label}_high"), high);
            self.report
                .figure(&format!("redis_lag_p50_ms_{label}"), lag.p50);
            self.report
                .figure(&format!("redis_lag_p99_ms_{label}"), lag.p99);
            self.report
                .figure(&format!("redis_lag_max_ms_{label}"), lag.max);
            let ours = self.report.get(&format!("lag_p99_ms_{label}"));
            if let Some(ours) = ours {
                self.report.figure(
                    &format!("lag_vs_redis_p99_{label}"),
                    ours / lag.p99.max(1e-3),
                );
            }
            self.report.row(
                &format!("Redis replication lag at {rate} writes/s (p99)"),
                ours.map_or("(lag not measured)".into(), |ours| {
                    format!("{ours:.2} ms (xmirror)")
                }),
                format!(
                    "{:.2} ms (Redis; runs {}; p50 {:.2}, max {:.1})",
                    lag.p99,
                    Percentiles::p99s_text(&runs),
                    lag.p50,
                    lag.max
                ),
                ours.map_or(String::new(), |ours| {
                    format!("{:.2} (target <= 1)", ours / lag.p99.max(1e-3))
                }),
            );
        }
        Ok(())
    }

    /// Measure 8: Through the impairment proxy at `wan_rtt` and `wan_bandwidth`: default and
    /// tuned transport windows.
    async fn wan(&mut self) -> anyhow::Result<()> {
        let impairment = self.wan_impairment();
        let link_mib_s = self.plan.wan_bandwidth as f64 / MIB;
        self.report.figure("wan_bandwidth_mib_s", link_mib_s);
        self.report
            .fact("wan_rtt_ms", self.plan.wan_rtt.as_millis() as u64);
        let tuned = self.wan_limits();
        for (label, limits) in [("default", Self::default_limits()), ("tuned", tuned)] {
            let dataset = self.plan.wan;
            let (source_dir, last) = self.populated_source_dir(dataset).await?;
            let source = self.start_source(source_dir, limits).await?;
            let proxy = Proxy::start(source.local_addr).await;
            proxy.set_both(impairment.clone());
            let started = Instant::now();
            let mirror = self
                .cluster
                .start_mirror(0, proxy.addr, self.cluster.data_dir("mirror"), limits)
                .await?;
            wait_consistent(&mirror, last, WAIT_LIMIT).await?;
            let snapshot_mib_s = per_second(dataset.total_bytes() as f64 / MIB, started.elapsed());
            let lag = self
                .xmirror_lag(
                    &source,
                    &mirror,
                    self.plan.wan_lag_rate,
                    self.plan.wan_lag_duration,
                    "wan-lag-",
                )
                .await?
                .total;
            mirror.shutdown().await;
            source.shutdown().await;
            drop(proxy);

            let (snapshot_key, lag_key) = if label == "tuned" {
                ("wan_snapshot_mib_s".to_owned(), "wan_lag_p99_ms".to_owned())
            } else {
                (
                    format!("wan_{label}_snapshot_mib_s"),
                    format!("wan_{label}_lag_p99_ms"),
                )
            };
            self.report.figure(&snapshot_key, snapshot_mib_s);
            self.report.figure(&lag_key, lag.p99);
            let rtt_ms = self.plan.wan_rtt.as_millis() as f64;
            self.report.row(
                &format!(
                    "{} ms RTT, {:.1} MiB/s link, {label} windows: snapshot of {}",
                    rtt_ms,
                    link_mib_s,
                    dataset.describe()
                ),
                format!("{snapshot_mib_s:.2} MiB/s"),
                format!("{link_mib_s:.1} MiB/s (link)"),
                format!("{:.2} (target >= 0.5)", snapshot_mib_s / link_mib_s),
            );
            self.report.row(
                &format!(
                    "{} ms RTT, {label} windows: lag at {} writes/s",
                    rtt_ms, self.plan.wan_lag_rate
                ),
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    lag.p50, lag.p99, lag.max
                ),
                format!("{:.0} ms (RTT/2 + 20 ms)", rtt_ms / 2.0 + 20.0),
                format!("{:.2} (target <= 1)", lag.p99 / (rtt_ms / 2.0 + 20.0)),
            );
        }
        Ok(())
    }
}

/// Writes back every dirty page of the machine (`sync`), so that a run does not pay for
/// the writes of the runs before it.
async fn settle_disk() {
    // Without `sync` on the path the run goes on unsettled: a noisier figure, not a failure.
    let _ = tokio::process::Command::new("sync").status().await;
}

impl Bench {
    /// The WAN path of measures 8 and 10: `wan_rtt`, `wan_bandwidth` each way.
    fn wan_impairment(&self) -> Impairment {
        Impairment {
            delay: self.plan.wan_rtt / 2,
            bandwidth: Some(self.plan.wan_bandwidth),
            ..Impairment::default()
        }
    }

    /// Transport windows sized for the WAN path (2 × bandwidth × delay).
    fn wan_limits(&self) -> TransportLimits {
        TransportLimits::for_link(self.plan.wan_bandwidth, self.plan.wan_rtt)
    }

    /// Measure 10: the long link. Compression of random and text-like values through the
    /// WAN proxy, then a live mirror's lag while another mirror takes a snapshot under the
    /// source's send-rate cap.
    async fn long_link(&mut self) -> anyhow::Result<()> {
        self.compression_over_wan().await?;
        self.snapshot_beside_live_wal().await
    }

    /// A snapshot of the WAN dataset on loopback and through the WAN proxy, with random and
    /// with text-like values, compression off and zstd: throughput, the ratio, and CPU per
    /// GiB (on loopback the link costs nothing, so the CPU difference is compression's).
    async fn compression_over_wan(&mut self) -> anyhow::Result<()> {
        let wan_limits = self.wan_limits();
        let link_mib_s = self.plan.wan_bandwidth as f64 / MIB;
        let rtt_ms = self.plan.wan_rtt.as_millis();
        for wan in [false, true] {
            let (path, limits, impairment) = if wan {
                ("wan", wan_limits, Some(self.wan_impairment()))
            } else {
                ("loopback", Self::default_limits(), None)
            };
            for values in [Values::Random, Values::Text] {
                let dataset = Dataset {
                    values,
                    ..self.plan.wan
                };
                let mut off = None;
                for compression in [Compression::Off, Compression::Zstd] {
                    let (source_dir, last) = self.populated_source_dir(dataset).await?;
                    // The runs before left dirty pages of their stores: written back
                    // during this run, they would be counted against it.
                    settle_disk().await;
                    let mut config = self.cluster.source_config(source_dir);
                    config.transport = limits;
                    config.compression = compression;
                    let source = self.cluster.start_source(config).await?;
                    let proxy = match &impairment {
                        Some(impairment) => {
                            let proxy = Proxy::start(source.local_addr).await;
                            proxy.set_both(impairment.clone());
                            Some(proxy)
                        }
                        None => None,
                    };
                    let dial = proxy.as_ref().map_or(source.local_addr, |proxy| proxy.addr);
                    let cpu_before = load::cpu_seconds();
                    let started = Instant::now();
                    let mirror = self
                        .cluster
                        .start_mirror(0, dial, self.cluster.data_dir("mirror"), limits)
                        .await?;
                    wait_consistent(&mirror, last, WAIT_LIMIT).await?;
                    let elapsed = started.elapsed();
                    let cpu = load::cpu_seconds()
                        .zip(cpu_before)
                        .map(|(after, before)| after - before);
                    let counters = &source.shared().compression;
                    let raw = counters.raw_bytes.load(Ordering::Relaxed) as f64;
                    let sent = counters.sent_bytes.load(Ordering::Relaxed) as f64;
                    mirror.shutdown().await;
                    source.shutdown().await;
                    drop(proxy);

                    let label = format!("{path}_{}_{}", values.name(), compression.name());
                    let gib = dataset.total_bytes() as f64 / GIB;
                    let mib_s = per_second(dataset.total_bytes() as f64 / MIB, elapsed);
                    let cpu_per_gib = cpu.map(|cpu| cpu / gib);
                    self.report
                        .figure(&format!("longlink_{label}_snapshot_mib_s"), mib_s);
                    if let Some(cpu_per_gib) = cpu_per_gib {
                        self.report
                            .figure(&format!("longlink_{label}_cpu_s_per_gib"), cpu_per_gib);
                    }
                    let shrunk = if compression == Compression::Zstd && sent > 0.0 {
                        if !wan {
                            self.report.figure(
                                &format!("longlink_{}_compression_ratio", values.name()),
                                raw / sent,
                            );
                        }
                        format!(", sent {:.2}x smaller", raw / sent)
                    } else {
                        String::new()
                    };
                    let where_ = if wan {
                        format!("{rtt_ms} ms RTT, {link_mib_s:.1} MiB/s link")
                    } else {
                        "loopback".to_owned()
                    };
                    self.report.row(
                        &format!(
                            "{where_}: snapshot of {} {} values, compression {}",
                            dataset.describe(),
                            values.name(),
                            compression.name()
                        ),
                        format!(
                            "{mib_s:.2} MiB/s of data{shrunk}; {} CPU s/GiB (both nodes{})",
                            cpu_per_gib.map_or("?".into(), |cpu| format!("{cpu:.1}")),
                            if wan { ", proxy" } else { "" }
                        ),
                        match off {
                            Some((off_mib_s, off_cpu)) => format!(
                                "{off_mib_s:.2} MiB/s, {} CPU s/GiB (off)",
                                Option::<f64>::map_or(off_cpu, "?".into(), |cpu| format!(
                                    "{cpu:.1}"
                                ))
                            ),
                            None if wan => format!("{link_mib_s:.1} MiB/s (link)"),
                            None => String::new(),
                        },
                        match off {
                            Some((off_mib_s, _)) => format!("{:.2}", mib_s / off_mib_s),
                            None if wan => format!("{:.2}", mib_s / link_mib_s),
                            None => String::new(),
                        },
                    );
                    off.get_or_insert((mib_s, cpu_per_gib));
                }
            }
        }
        Ok(())
    }

    /// A live mirror's lag through the WAN proxy under the source's send-rate cap, alone
    /// and while a second mirror (through its own proxy) takes a snapshot that outlasts
    /// the measured window.
    async fn snapshot_beside_live_wal(&mut self) -> anyhow::Result<()> {
        let cap = self.plan.longlink_cap;
        let window = self.plan.longlink_window;
        let rate = self.plan.wan_lag_rate;
        // Enough data for the snapshot to take twice the window at the whole cap.
        let dataset = Dataset {
            keys: (cap as f64 * window.as_secs_f64() * 2.0 / 4096.0) as u64,
            value_bytes: 4096,
            prefix: "cap-",
            values: Values::Random,
        };
        let impairment = self.wan_impairment();
        let limits = self.wan_limits();
        let (source_dir, last) = self.populated_source_dir(dataset).await?;
        let mut config = self.cluster.source_config(source_dir);
        config.transport = limits;
        config.max_send_bytes_per_s = Some(cap);
        let source = self.cluster.start_source(config).await?;
        let live_proxy = Proxy::start(source.local_addr).await;
        live_proxy.set_both(impairment.clone());
        let live = self
            .cluster
            .start_mirror(0, live_proxy.addr, self.cluster.data_dir("mirror"), limits)
            .await?;
        wait_consistent(&live, last, WAIT_LIMIT).await?;
        let alone = self
            .xmirror_lag(&source, &live, rate, window, "cap-alone-")
            .await?
            .total;

        let snapshot_proxy = Proxy::start(source.local_addr).await;
        snapshot_proxy.set_both(impairment);
        let sent_before = source.shared().snapshot_bytes_sent.load(Ordering::Relaxed);
        let bulk_before = source
            .shared()
            .compression
            .sent_bytes
            .load(Ordering::Relaxed);
        let written_before = source.shared().store.position().lsn;
        let started = Instant::now();
        let snapshotting = self
            .cluster
            .start_mirror(
                1,
                snapshot_proxy.addr,
                self.cluster.data_dir("mirror"),
                limits,
            )
            .await?;
        let beside = self
            .xmirror_lag(&source, &live, rate, window, "cap-beside-")
            .await?
            .total;
        let snapshot_mib_s = per_second(
            (source.shared().snapshot_bytes_sent.load(Ordering::Relaxed) - sent_before) as f64
                / MIB,
            started.elapsed(),
        );
        let outlasted = !snapshotting.shared().is_consistent();
        // How long the snapshotting mirror stays behind once its snapshot is done, and
        // whether the link is what it waits for: every bulk byte the cap let out from the
        // snapshot's start until that mirror is current (its chunks, the WAL it then
        // needed, the live mirror's WAL), against the time that took. Near 1, the cap was
        // busy throughout, and no order of the same bytes makes the mirror current sooner.
        let written = source.shared().store.position().lsn;
        wait_consistent(&snapshotting, Lsn(1), WAIT_LIMIT).await?;
        let consistent_at = started.elapsed();
        wait_consistent(&snapshotting, written, WAIT_LIMIT).await?;
        let current_at = started.elapsed();
        let bulk_sent = source
            .shared()
            .compression
            .sent_bytes
            .load(Ordering::Relaxed)
            - bulk_before;
        let link_busy = bulk_sent as f64 / cap as f64 / current_at.as_secs_f64();
        snapshotting.shutdown().await;
        live.shutdown().await;
        source.shutdown().await;
        drop((live_proxy, snapshot_proxy));

        let cap_mib_s = cap as f64 / MIB;
        self.report
            .figure("longlink_cap_lag_p99_ms_alone", alone.p99);
        self.report
            .figure("longlink_cap_lag_p99_ms_beside_snapshot", beside.p99);
        self.report.figure(
            "longlink_cap_snapshot_lag_ratio",
            beside.p99 / alone.p99.max(1e-3),
        );
        self.report
            .figure("longlink_cap_snapshot_mib_s", snapshot_mib_s);
        self.report
            .fact("longlink_cap_snapshot_outlasted_window", outlasted);
        self.report.figure(
            "longlink_cap_snapshot_tail_s",
            (current_at - consistent_at).as_secs_f64(),
        );
        self.report
            .figure("longlink_cap_snapshot_current_s", current_at.as_secs_f64());
        self.report
            .figure("longlink_cap_busy_until_current", link_busy);
        let rtt_ms = self.plan.wan_rtt.as_millis();
        self.report.row(
            &format!(
                "{rtt_ms} ms RTT, {cap_mib_s:.1} MiB/s send cap: live mirror's lag at {rate} writes/s beside another mirror's snapshot"
            ),
            format!(
                "p50 {:.1} ms, p99 {:.1} ms (snapshot at {snapshot_mib_s:.1} MiB/s{})",
                beside.p50,
                beside.p99,
                if outlasted { ", still running" } else { ", finished early" }
            ),
            format!("p50 {:.1} ms, p99 {:.1} ms (alone)", alone.p50, alone.p99),
            format!("{:.2} (target <= 1.2)", beside.p99 / alone.p99.max(1e-3)),
        );
        self.report.row(
            &format!(
                "{rtt_ms} ms RTT, {cap_mib_s:.1} MiB/s send cap: the snapshotting mirror, from its start to current ({} entries written meanwhile)",
                written.0 - written_before.0
            ),
            format!(
                "consistent after {:.1} s, current after {:.1} s ({:.2} s behind once consistent)",
                consistent_at.as_secs_f64(),
                current_at.as_secs_f64(),
                (current_at - consistent_at).as_secs_f64()
            ),
            format!("{:.1} MiB of bulk frames at the cap", bulk_sent as f64 / MIB),
            format!("{link_busy:.2} of the cap busy"),
        );
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan::new(args.quick);
    let engine = args.engine.unwrap_or(EngineKind::DEFAULT);
    let mut bench = Bench {
        plan,
        cluster: Cluster::new(engine, args.scratch.as_deref())?,
        report: Report::default(),
    };
    bench.report.fact("quick", args.quick);
    bench.report.fact("engine", engine.name());
    if let Some(scratch) = &args.scratch {
        bench.report.fact("scratch", scratch.display().to_string());
    }
    bench
        .report
        .fact("small_dataset", bench.plan.small.describe());
    bench
        .report
        .fact("large_dataset", bench.plan.large.describe());
    let wanted = |measure: Measure| args.only.is_empty() || args.only.contains(&measure);
    if wanted(Measure::Redis) {
        // Checked first, so a missing Redis does not cost a whole run.
        redis::check_installed()?;
    }
    let started = Instant::now();
    let steps: [(Measure, &str); 10] = [
        (Measure::Transport, "transport ceiling"),
        (Measure::Store, "store ceiling"),
        (Measure::Snapshot, "snapshot"),
        (Measure::Lag, "streaming lag"),
        (Measure::Catchup, "catch-up"),
        (Measure::Fanout, "fan-out"),
        (Measure::Redis, "Redis"),
        (Measure::Wan, "WAN"),
        (Measure::Client, "client API"),
        (Measure::Longlink, "long link"),
    ];
    for (measure, title) in steps {
        if !wanted(measure) {
            continue;
        }
        println!("[{:>5.1} s] {title}", started.elapsed().as_secs_f64());
        // Each measure starts on a settled disk, not paying for the writes of the last.
        bench.cluster.clear_data_dirs()?;
        settle_disk().await;
        let outcome = match measure {
            Measure::Transport => bench.transport().await,
            Measure::Store => bench.store().await,
            Measure::Snapshot => bench.snapshot().await,
            Measure::Lag => bench.lag().await,
            Measure::Catchup => bench.catchup().await,
            Measure::Fanout => bench.fanout().await,
            Measure::Redis => bench.redis().await,
            Measure::Wan => bench.wan().await,
            Measure::Client => bench.client().await,
            Measure::Longlink => bench.long_link().await,
        };
        outcome.with_context(|| format!("the {title} measure failed"))?;
    }
    bench
        .report
        .figure("run_seconds", started.elapsed().as_secs_f64());
    bench.report.write(&args.out)?;
    println!("\n{}", bench.report.table());
    println!(
        "wrote {} and results.md in {:.0} s",
        args.out.join("results.json").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every measure except Redis's (which needs the Debian package) on sizes small enough
    /// for a debug build, so that the suite cannot rot between the hand-run benchmarks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_measure_but_redis_runs_on_a_tiny_plan() {
        let dataset = |keys, value_bytes, prefix| Dataset {
            keys,
            value_bytes,
            prefix,
            values: Values::Random,
        };
        let plan = Plan {
            transport_bytes: 4 << 20,
            small: dataset(3_000, 100, "small-"),
            large: dataset(300, 4096, "large-"),
            lag_duration: Duration::from_millis(500),
            lag_rates: [1_000, 2_000],
            catchup_entries: 2_000,
            fanout_writes: 1_000,
            wan: dataset(300, 4096, "wan-"),
            wan_bandwidth: 12_500_000,
            wan_rtt: Duration::from_millis(20),
            wan_lag_rate: 1_000,
            wan_lag_duration: Duration::from_millis(500),
            longlink_cap: 10_000_000,
            longlink_window: Duration::from_millis(500),
            client_writes: 2_000,
            client_batch_writes: 100,
        };
        let mut bench = Bench {
            plan,
            cluster: Cluster::new(EngineKind::DEFAULT, None).unwrap(),
            report: Report::default(),
        };
        bench.transport().await.unwrap();
        bench.store().await.unwrap();
        bench.snapshot().await.unwrap();
        bench.lag().await.unwrap();
        bench.catchup().await.unwrap();
        bench.fanout().await.unwrap();
        bench.wan().await.unwrap();
        bench.client().await.unwrap();
        bench.long_link().await.unwrap();
        for key in [
            "transport_mib_s",
            "store_keys_s",
            "store_keys_s_sled",
            "snapshot_1m_s",
            "snapshot_ratio_to_ceiling",
            "lag_p99_ms_1k",
            "lag_p99_ms_2k",
            "catchup_entries_s",
            "fanout8_write_ratio",
            "fanout8_sink_write_ratio",
            "wan_snapshot_mib_s",
            "wan_lag_p99_ms",
            "batch_vs_put",
            "scan_source_pairs_s",
            "scan_mirror_pairs_s",
            "longlink_wan_text_zstd_snapshot_mib_s",
            "longlink_loopback_random_zstd_snapshot_mib_s",
            "longlink_cap_lag_p99_ms_beside_snapshot",
            "longlink_cap_snapshot_mib_s",
            "longlink_cap_snapshot_current_s",
            "longlink_cap_busy_until_current",
        ] {
            let value = bench
                .report
                .get(key)
                .unwrap_or_else(|| panic!("{key} missing"));
            assert!(value.is_finite() && value > 0.0, "{key} = {value}");
        }
        // Through a 10 ms + 10 ms proxy no entry can arrive in less than one way's delay.
        assert!(bench.report.get("wan_lag_p99_ms").unwrap() >= 10.0);
        // Text-like values shrink; random ones do not (and are mostly not even tried).
        let text = bench.report.get("longlink_text_compression_ratio").unwrap();
        assert!(text > 2.0, "text compresses {text:.2}x");
        let random = bench
            .report
            .get("longlink_random_compression_ratio")
            .unwrap();
        assert!(
            (0.95..1.05).contains(&random),
            "random compresses {random:.2}x"
        );
    }
}
