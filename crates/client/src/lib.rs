//! The Rust client of xmirror: write to a source, read your writes on a mirror far away.
//!
//! A [`Client`] talks to one node, a source or a mirror, over QUIC with mutual TLS, as an
//! [`Identity`] (a certificate of the `client` role, from a certificates directory or PEM
//! bytes). On a source it writes ([`Client::put`], [`Client::delete`], and
//! [`Client::batch`], several writes applied atomically everywhere); on either it reads
//! ([`Client::get`], [`Client::get_with`] with a minimum LSN or a maximum lag, and
//! [`Client::scan`], a key range or prefix from one consistent state) and reports
//! ([`Client::status`], [`Client::digest`]). Every write returns the LSN it is durable
//! at; a read on a mirror with that LSN as its minimum answers once the mirror has applied
//! it: read-your-writes across regions without polling.
//!
//! Every call has a deadline, so a dead node never hangs a program; refusals carry the
//! node's error code ([`Error::code`]).
//!
//! # Quickstart
//!
//! ```
//! use xmirror_client::{Client, Get, Identity, Scan, Write};
//! # use std::sync::Arc;
//! # use xmirror_proto::{Name, Role};
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // A source and a mirror on loopback, certificates in a temporary directory.
//! # let dir = tempfile::tempdir()?;
//! # let certs = dir.path().join("certs");
//! # let name = |value: &str| Name::new(value).unwrap();
//! # xmirror_tls::pki::issue_cluster(&certs, &name("east"), &[
//! #     (Role::Source, name("src")), (Role::Observer, name("m1")), (Role::Client, name("app")),
//! # ], 30)?;
//! # let source_tls = xmirror_tls::NodeTls::load(&certs, "src")?;
//! # let source = xmirror_source::SourceNode::start(xmirror_source::SourceConfig::new(
//! #     dir.path().join("source"), name("east"), "127.0.0.1:0".parse()?), &source_tls).await?;
//! # let mirror = xmirror_mirror::MirrorNode::start(xmirror_mirror::MirrorConfig::new(
//! #     dir.path().join("mirror"), source.local_addr, name("east"),
//! #     Some("127.0.0.1:0".parse()?)), Arc::new(xmirror_tls::NodeTls::load(&certs, "m1")?)).await?;
//! # let source_address = source.local_addr.to_string();
//! # let mirror_address = mirror.listen_addr.unwrap().to_string();
//! # let certs_dir = certs.to_str().unwrap();
//! // certs/app.crt and certs/app.key: a `client` certificate of the cluster.
//! let identity = Identity::from_dir(certs_dir, "app")?;
//! let source = Client::connect(&source_address, identity.clone()).await?;
//! let mirror = Client::connect(&mirror_address, identity).await?;
//!
//! // Writes return the LSN at which they are durable.
//! source.put("user:1", "ada").await?;
//! let lsn = source
//!     .batch(vec![Write::put("user:2", "grace"), Write::delete("user:1")])
//!     .await?;
//!
//! // Read your write on the mirror: it answers once it has applied `lsn`.
//! let read = mirror.get_with("user:2", Get::new().min_lsn(lsn)).await?;
//! assert_eq!(read.value.as_deref(), Some(&b"grace"[..]));
//!
//! // Scans read every page from one state; the batch is there whole or not at all.
//! let users = mirror.scan_all(Scan::prefix("user:")).await?;
//! assert_eq!(users.pairs, vec![(b"user:2".to_vec(), b"grace".to_vec())]);
//! assert!(users.lsn >= lsn);
//! # Ok(())
//! # }
//! ```
//!
//! A program that runs the source in-process writes and reads through its
//! `SourceNode` (crate `xmirror-source`) the same way, without the network.

#![deny(missing_docs)]

mod client;
mod connection;
mod error;
mod scan;

pub use client::{Client, ClientBuilder, Get, Identity, LoadReport, Read, Written};
pub use connection::Conversation;
pub use error::Error;
pub use scan::{Scan, ScanStream, Scanned};
pub use xmirror_net::Refusal;
pub use xmirror_proto::history::HistoryToken;
pub use xmirror_proto::message::FenceReply;
pub use xmirror_proto::message::Write;
pub use xmirror_proto::status::{MirrorState, MirrorStatus, NodeStatus, SlotStatus, SourceStatus};
pub use xmirror_proto::{Divergence, Epoch, ErrorCode, Lsn, Name, StateDigest};
