//! Failback by rewind: the store work around a `Rewind` decision.
//!
//! A node that holds an earlier epoch's history beyond the fork (an old source started as
//! a mirror of the promoted one) first checks its own chain hash at the fork, then saves
//! every write it holds beyond it to `rewound/` under its data directory (durably, before
//! anything changes), and names the keys they touched. The session fetches the new
//! source's values of those keys; [`apply`] writes them with the fork as the new position
//! in one store write. A kill at any step leaves either the old store (the next hello is
//! decided the same way and the file is written again, whole) or the rewound one.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use xmirror_proto::session::mirror::{RewindApply, RewindImpossible, RewindPlan};
use xmirror_proto::{Entry, Lsn};
use xmirror_store::{DatabaseIdentity, Position, Rewind, Store, StoreError};

/// The directory, under the data directory, that rewound writes are saved to.
pub const REWOUND_DIR: &str = "rewound";

/// WAL entries read per step while saving.
const READ_ENTRIES: usize = 4_096;
/// WAL bytes read per step while saving.
const READ_BYTES: usize = 16 << 20;

/// Why preparing a rewind failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The store cannot rewind to this fork; the mirror follows its divergence policy.
    #[error(transparent)]
    Impossible(#[from] RewindImpossible),
    /// The store failed.
    #[error("the store failed while reading the WAL to rewind")]
    Store(#[from] StoreError),
    /// The rewound writes could not be saved.
    #[error("cannot save the rewound writes to {path}")]
    Save {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What a prepared rewind found.
#[derive(Debug)]
pub struct Prepared {
    /// Each key the rewound entries touched, once, in key order.
    pub keys: Vec<Vec<u8>>,
    /// The file the rewound writes were saved to.
    pub file: PathBuf,
    /// How many entries (LSNs) were rewound.
    pub entries: u64,
}

/// Checks the fork, saves the entries beyond it to `rewound/` and returns the keys they
/// touch. Changes nothing in the store.
pub fn prepare(
    store: &dyn Store,
    data_dir: &Path,
    plan: &RewindPlan,
) -> Result<Prepared, PrepareError> {
    let applied = store.position().lsn;
    // Its database went on in a later epoch: as a source, this store must never take a
    // write again, whatever comes of the rewind.
    store.fence(plan.source_epoch)?;
    match store.chain_hash_at(plan.to_lsn)? {
        Some(hash) if hash == plan.chain_hash => {}
        Some(_) => return Err(RewindImpossible::OtherHistory(plan.to_lsn).into()),
        None => return Err(RewindImpossible::WalGone(plan.to_lsn).into()),
    }
    // Each rewound entry with its LSN, in LSN order.
    let mut rewound: Vec<(Lsn, Entry)> = Vec::new();
    let mut next = plan.to_lsn.next();
    while next <= applied {
        let Some(span) = store.read_wal(next, READ_ENTRIES, READ_BYTES)? else {
            return Err(RewindImpossible::WalGone(plan.to_lsn).into());
        };
        next = span.last_lsn().next();
        rewound.extend((span.first_lsn.0..).map(Lsn).zip(span.entries));
    }
    let dir = data_dir.join(REWOUND_DIR);
    let file = dir.join(format!(
        "rewound-{}-to-{}.jsonl",
        plan.to_lsn.next().0,
        applied.0
    ));
    let mut keys = BTreeSet::new();
    let mut lines = Vec::new();
    for (lsn, entry) in &rewound {
        entry.for_each_write(|key, value| {
            keys.insert(key.to_vec());
            lines.extend(rewound_line(*lsn, key, value).into_bytes());
            lines.push(b'\n');
        });
    }
    save(&dir, &file, &lines).map_err(|source| PrepareError::Save {
        path: file.clone(),
        source,
    })?;
    Ok(Prepared {
        keys: keys.into_iter().collect(),
        file,
        entries: rewound.len() as u64,
    })
}

/// One rewound write as the file holds it: LSN, operation, key and value in base64.
fn rewound_line(lsn: Lsn, key: &[u8], value: Option<&[u8]>) -> String {
    let base64 = base64::engine::general_purpose::STANDARD;
    let (op, value) = match value {
        Some(value) => ("put", format!("\"{}\"", base64.encode(value))),
        None => ("delete", "null".to_owned()),
    };
    format!(
        "{{\"lsn\":{},\"op\":\"{op}\",\"key\":\"{}\",\"value\":{value}}}",
        lsn.0,
        base64.encode(key)
    )
}

/// Writes `contents` to `file` whole or not at all, durably: a temporary file, fsync,
/// rename, fsync of the directory.
fn save(dir: &Path, file: &Path, contents: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temporary = file.with_extension("jsonl.partial");
    let mut out = std::fs::File::create(&temporary)?;
    out.write_all(contents)?;
    out.sync_all()?;
    drop(out);
    std::fs::rename(&temporary, file)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Applies the rewind in one durable store write.
pub fn apply(store: &dyn Store, apply: &RewindApply) -> Result<(), StoreError> {
    store.rewind(Rewind {
        to: Position {
            lsn: apply.to_lsn,
            chain_hash: apply.chain_hash,
        },
        values: &apply.values,
        target: Position {
            lsn: apply.target.0,
            chain_hash: apply.target.1,
        },
        database: DatabaseIdentity {
            id: apply.database_id,
            epoch: apply.epoch,
        },
        history: &apply.history,
    })
}
