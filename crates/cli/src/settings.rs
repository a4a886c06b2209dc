//! Node settings from flags, `XMIRROR_*` environment variables and a TOML file
//! (`--config FILE`): a flag wins over the environment, the environment over the file, the
//! file over the built-in default. Paths in a file are relative to the file.
//! `--print-config` shows the effective result as a commented file.
//!
//! Every setting is optional at this level, so that a value can come from any place;
//! the node commands then require what they need and fill in the defaults.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::de::DeserializeOwned;
use xmirror_proto::{DivergencePolicy, Name, VersionRange};

use crate::logs::LogFormat;

/// Declares a settings struct whose every field is an optional `--flag` and an optional
/// TOML key of the same name, with `or` to layer flags over a file.
macro_rules! settings {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$field_meta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(clap::Args, serde::Deserialize, serde::Serialize, Clone, Debug, Default, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                #[arg(long)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        impl $name {
            /// Each setting from `self` (the flags), or else from `file`.
            pub fn or(self, file: $name) -> $name {
                $name { $($field: self.$field.or(file.$field),)* }
            }
        }

        impl Settings for $name {
            fn relative_to(self, dir: &Path) -> $name {
                $name { $($field: self.$field.map(|value| Setting::relative_to(value, dir)),)* }
            }
        }
    };
}

settings! {
    /// Everything `xmirror source` can be told.
    pub struct SourceSettings {
        /// The store's directory (created if missing).
        data_dir: PathBuf,
        /// This source's cluster; mirrors must name it in --source-cluster.
        cluster_id: Name,
        /// UDP address to serve on, for example 0.0.0.0:7000.
        listen: String,
        /// Directory with NAME.crt, NAME.key and the trusted ca*.crt.
        certs: PathBuf,
        /// This node's name (its certificate files' name).
        name: String,
        /// The database mirrors ask for [default: main].
        database: Name,
        /// Most WAL entries kept for slow or absent mirrors; a mirror pushed past it gets a
        /// snapshot when it returns [default: 10000000].
        max_wal_entries: u64,
        /// Most WAL bytes kept whatever the slots want; a slot pushed past it is invalidated
        /// [default: 4294967296].
        max_wal_bytes: u64,
        /// Seconds a mirror may be away before its slot is invalidated and stops holding the
        /// WAL [default: off].
        slot_idle_timeout: u64,
        /// Seconds another cluster's mirror may be away before its slot is invalidated,
        /// whatever --slot-idle-timeout says [default: 86400].
        foreign_slot_idle_timeout: u64,
        /// Seconds a mirror that left in the middle of a snapshot may stay away before its
        /// slot is removed [default: 3600].
        unfinished_slot_timeout: u64,
        /// Most slots in all; a new mirror beyond it is refused BUSY [default: 1024].
        max_slots: usize,
        /// Most slots of any one other cluster; a new mirror beyond it is refused BUSY
        /// [default: 64].
        max_slots_per_cluster: usize,
        /// Milliseconds a peer has for its TLS handshake and hello [default: 10000].
        handshake_timeout_ms: u64,
        /// Milliseconds a peer has for its TLS handshake alone [default: 2000].
        tls_timeout_ms: u64,
        /// Milliseconds without traffic after which a connection is dead [default: 30000].
        idle_timeout_ms: u64,
        /// Connections served at once [default: 1024].
        max_connections: usize,
        /// Connections at once that have not finished their handshake and hello [default: 64].
        max_handshakes: usize,
        /// Connections one identity (certificate) may hold at once [default: 16].
        max_connections_per_peer: usize,
        /// Bytes one client connection may hold: its requests, plus the largest reply each
        /// read may produce [default: 67108864].
        max_connection_bytes: usize,
        /// Reads one client connection may have waiting for a minimum LSN at once; more are
        /// refused BUSY [default: 1024].
        max_waiting_reads: usize,
        /// Streams a peer may have open at once [default: 64].
        max_streams: u32,
        /// Largest frame before the hello is validated, in bytes [default: 65536].
        max_handshake_frame_bytes: usize,
        /// Largest frame after the hello, in bytes [default: 16777216].
        max_frame_bytes: usize,
        /// WAL bytes sent to a mirror and not yet acknowledged before sending pauses
        /// [default: 67108864].
        max_unacked_bytes: usize,
        /// Compression of snapshot chunks and WAL batches, for mirrors that can read it:
        /// zstd or off. Data that does not shrink is sent as it is [default: zstd].
        compression: String,
        /// Most this source sends to all its mirrors together, in Mbit/s (frame bytes);
        /// under the cap the WAL goes before snapshot chunks [default: no cap].
        max_send_mbit_s: u64,
        /// Largest key a client may write, in bytes [default: 4096].
        max_key_bytes: usize,
        /// Largest value a client may write, in bytes [default: 4194304].
        max_value_bytes: usize,
        /// Storage engine of a new store, redb or sled; an existing store keeps its own
        /// [default: redb].
        engine: String,
        /// Memory for the storage engine's page cache, in MiB [default: 64]. The engines'
        /// own default, 1 GiB, is what a node's resident memory grows to after a large
        /// snapshot; more helps only reads of a data set that does not fit.
        cache_mb: u64,
        /// Bandwidth of the path between source and mirror in Mbit/s, with --link-rtt-ms:
        /// sizes the transport windows to twice bandwidth x delay [default: quinn's windows,
        /// enough for 100 Mbit/s at 100 ms].
        link_mbit_s: u64,
        /// Round-trip time of the path between source and mirror in milliseconds, with
        /// --link-mbit-s.
        link_rtt_ms: u64,
        /// Serve Prometheus metrics over HTTP on this address, for example 127.0.0.1:9100.
        metrics: String,
        /// A node allowed to succeed this source: fence it and promote itself in its place,
        /// as its SPIFFE ID (spiffe://CLUSTER/observer/NAME, the certificate it mirrors with;
        /// a source ID names the observer of the same name). Repeatable. Anyone else's
        /// fence is refused NOT_AUTHORIZED [default: this source's cluster's observers].
        successor: Vec<String>,
    }
}

settings! {
    /// Everything `xmirror mirror` can be told.
    pub struct MirrorSettings {
        /// The store's directory (created if missing). One mirror process per directory.
        data_dir: PathBuf,
        /// The source's UDP address.
        source: String,
        /// The cluster the source must belong to.
        source_cluster: Name,
        /// Directory with NAME.crt, NAME.key and the trusted ca*.crt (including the source's CA).
        certs: PathBuf,
        /// This mirror's name (its certificate files' name; keys its slot on the source).
        name: String,
        /// Serve the read-only client API on this UDP address.
        listen: String,
        /// The database to mirror [default: main].
        database: Name,
        /// Milliseconds without a byte from the source before reconnecting [default: 5000].
        source_silence_timeout_ms: u64,
        /// Milliseconds one connection attempt may take [default: 5000].
        connect_timeout_ms: u64,
        /// Client connections one identity (certificate) may hold at once [default: 16].
        max_connections_per_peer: usize,
        /// Bytes one client connection may hold: its requests, plus the largest reply each
        /// read may produce [default: 67108864].
        max_connection_bytes: usize,
        /// Reads one client connection may have waiting for a minimum LSN at once; more are
        /// refused BUSY [default: 1024].
        max_waiting_reads: usize,
        /// Longest reconnect delay in milliseconds [default: 10000].
        backoff_max_ms: u64,
        /// How long `xmirror promote` (planned) waits, in milliseconds, before it answers
        /// that the promotion is still under way (the source's fence not confirmed yet: it
        /// is cancelled; confirmed: it goes on until this mirror has applied the source's
        /// final LSN) [default: 30000].
        promote_timeout_ms: u64,
        /// When this mirror holds data the source cannot vouch for (another database, an
        /// LSN beyond the source's, another history): halt (keep and serve it, apply
        /// nothing, retry every 5 s) or resnapshot (replace it) [default: halt].
        on_divergence: DivergencePolicy,
        /// Storage engine of a new store [default: redb]. A mirror's store must be redb:
        /// sled is refused (it does not reliably report a write that fails on a full disk).
        engine: String,
        /// Memory for the storage engine's page cache, in MiB [default: 64]. The engines'
        /// own default, 1 GiB, is what a node's resident memory grows to after a large
        /// snapshot; more helps only reads of a data set that does not fit.
        cache_mb: u64,
        /// Bandwidth of the path between source and mirror in Mbit/s, with --link-rtt-ms:
        /// sizes the transport windows to twice bandwidth x delay [default: quinn's windows,
        /// enough for 100 Mbit/s at 100 ms].
        link_mbit_s: u64,
        /// Round-trip time of the path between source and mirror in milliseconds, with
        /// --link-mbit-s.
        link_rtt_ms: u64,
        /// Serve Prometheus metrics over HTTP on this address, for example 127.0.0.1:9101.
        metrics: String,
        /// The name of this node's own `source` certificate (DIR/SNAME.crt), of its own
        /// cluster: what it serves with once promoted (`xmirror promote`). Without it the
        /// mirror cannot be promoted.
        source_name: String,
        /// Most WAL entries the mirror keeps (it keeps what it applies, to stream to other
        /// mirrors once promoted) [default: 10000000].
        max_wal_entries: u64,
        /// Most WAL bytes the mirror keeps [default: 4294967296].
        max_wal_bytes: u64,
        /// Protocol versions to offer, MIN..MAX (for testing version negotiation).
        #[arg(hide = true, value_parser = parse_versions)]
        protocol_versions: VersionRange,
    }
}

/// A settings struct of a node command.
pub trait Settings: DeserializeOwned + serde::Serialize + Default + clap::Args {
    /// The settings read from a file in `dir`, with relative paths made relative to it.
    fn relative_to(self, dir: &Path) -> Self;
}

/// A setting's type. Paths read from a file are relative to the file's directory, so that a
/// file means the same whatever the working directory of the process that reads it.
trait Setting: Sized {
    fn relative_to(self, _dir: &Path) -> Self {
        self
    }
}

impl Setting for PathBuf {
    fn relative_to(self, dir: &Path) -> PathBuf {
        dir.join(self)
    }
}

impl Setting for String {}
impl Setting for Vec<String> {}
impl Setting for u64 {}
impl Setting for u32 {}
impl Setting for usize {}
impl Setting for Name {}
impl Setting for DivergencePolicy {}
impl Setting for VersionRange {}

/// Parses `MIN..MAX`.
pub fn parse_versions(text: &str) -> Result<VersionRange, String> {
    let (min, max) = text
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX, got {text:?}"))?;
    let parse = |part: &str| {
        part.parse::<u16>()
            .map_err(|error| format!("{part:?}: {error}"))
    };
    Ok(VersionRange {
        min: parse(min)?,
        max: parse(max)?,
    })
}

/// What a node's config file says: its settings, and how the node logs.
#[derive(Default)]
pub struct ConfigFile<T> {
    pub settings: T,
    pub log_format: Option<LogFormat>,
}

/// The settings in the TOML file at `path`, or none.
pub fn read_file<T: Settings>(path: Option<&Path>) -> anyhow::Result<ConfigFile<T>> {
    let Some(path) = path else {
        return Ok(ConfigFile::default());
    };
    let invalid = || format!("invalid config file {}", path.display());
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let mut table: toml::Table = toml::from_str(&text).with_context(invalid)?;
    // `log_format` is the global `--log-format`, which every command has, not a node flag.
    let log_format = table
        .remove("log_format")
        .map(toml::Value::try_into)
        .transpose()
        .with_context(invalid)?;
    let settings: T = toml::Value::Table(table).try_into().with_context(invalid)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok(ConfigFile {
        settings: settings.relative_to(dir),
        log_format,
    })
}

/// A required setting, or an error naming both ways to give it.
pub fn required<T>(value: Option<T>, key: &str) -> anyhow::Result<T> {
    value.with_context(|| {
        format!(
            "missing --{} (or `{key}` in the config file)",
            key.replace('_', "-")
        )
    })
}

/// `text` as `# ` lines of at most 90 characters.
fn comment(text: &str) -> String {
    let mut lines = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() + 1 + word.len() > 90 && line.len() > 1 {
            lines.push_str(&line);
            lines.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    lines.push_str(&line);
    lines.push('\n');
    lines
}

/// The settings as a TOML file to start from: a header, then each key with its flag's help
/// as a comment. `missing` keys (required, and given nowhere) are commented out with the
/// placeholder value they hold here; keys without a value are listed, commented out.
pub fn to_commented_toml<T: Settings>(
    command: &str,
    log_format: LogFormat,
    settings: &T,
    missing: &[&str],
) -> anyhow::Result<String> {
    let print = |error| anyhow::Error::new(error).context("cannot print the configuration");
    let values = toml::Table::try_from(settings).map_err(print)?;
    let mut file = format!(
        "# xmirror {command}: --config FILE. Keys are the flags' names with underscores;\n\
         # flags and XMIRROR_* environment variables override them. Relative paths are\n\
         # relative to this file.\n\n\
         # How logs are written: text or json.\nlog_format = {}\n",
        toml::Value::try_from(log_format).map_err(print)?
    );
    for arg in T::augment_args(clap::Command::new(command.to_owned())).get_arguments() {
        let key = arg.get_id().as_str();
        let value = values.get(key);
        if arg.is_hide_set() && value.is_none() {
            continue;
        }
        file.push('\n');
        if let Some(help) = arg.get_long_help().or(arg.get_help()) {
            file.push_str(&comment(&help.to_string()));
        }
        match value {
            Some(value) if missing.contains(&key) => {
                file.push_str(&format!("# Required.\n#{key} = {value}\n"));
            }
            Some(value) => file.push_str(&format!("{key} = {value}\n")),
            None => file.push_str(&format!("#{key} =\n")),
        }
    }
    Ok(file)
}
