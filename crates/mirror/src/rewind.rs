//! Failback by rewind: the store work around a `Rewind` decision.
//!
//! A node that holds an earlier epoch's history beyond the fork (an old source started as
//! a mirror of the promoted one) first checks its own chain hash at the fork, then saves
//! every write it holds beyond it to `rewound/` under its data directory (durably, before
//! anything changes), and names the keys they touched; the file is written as the WAL is
//! read, a bounded span at a time, so only the keys stay in memory. The session fetches
//! the new source's values of those keys and writes them in bounded steps
//! (`Store::rewind_values`, which marks the store as rewinding: no reads, no WAL); [`apply`]
//! writes the last of them with the fork as the new position. A kill at any step leaves
//! either the old store, or one marked rewinding whose WAL still holds everything: the
//! next hello is decided the same way, the file is written again, whole, and the rewind
//! runs again.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use xmirror_proto::session::mirror::{RewindApply, RewindImpossible, RewindPlan};
use xmirror_proto::Lsn;
use xmirror_store::{DatabaseIdentity, Position, Rewind, Store, StoreError};

/// The directory, under the data directory, that rewound writes are saved to.
pub const REWOUND_DIR: &str = "rewound";

/// WAL entries read per step while saving.
const READ_ENTRIES: usize = 4_096;
/// WAL bytes read per step while saving: with the step's lines, what bounds the memory of
/// saving whatever the divergence (the file is written as the WAL is read).
const READ_BYTES: usize = 4 << 20;

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

/// Saves the entries beyond the fork (which the session checked, `MirrorAction::CheckFork`)
/// to `rewound/` and returns the keys they touch. Changes nothing in the store.
pub fn prepare(
    store: &dyn Store,
    data_dir: &Path,
    plan: &RewindPlan,
) -> Result<Prepared, PrepareError> {
    let applied = store.position().lsn;
    let dir = data_dir.join(REWOUND_DIR);
    let file = dir.join(format!(
        "rewound-{}-to-{}.jsonl",
        plan.to_lsn.next().0,
        applied.0
    ));
    let save_error = |source| PrepareError::Save {
        path: file.clone(),
        source,
    };
    // The file is written as the WAL is read, a bounded span at a time: only the keys
    // (each once) are kept in memory, whatever the size of the values.
    let mut saving = Saving::create(&dir, &file).map_err(save_error)?;
    let mut keys = BTreeSet::new();
    let mut entries = 0u64;
    let mut next = plan.to_lsn.next();
    while next <= applied {
        let Some(span) = store.read_wal(next, READ_ENTRIES, READ_BYTES)? else {
            return Err(RewindImpossible::WalGone(plan.to_lsn).into());
        };
        next = span.last_lsn().next();
        let mut lines = Vec::new();
        for (lsn, entry) in (span.first_lsn.0..).map(Lsn).zip(&span.entries) {
            entries += 1;
            entry.for_each_write(|key, value| {
                if !keys.contains(key) {
                    keys.insert(key.to_vec());
                }
                lines.extend(rewound_line(lsn, key, value).into_bytes());
                lines.push(b'\n');
            });
        }
        saving.append(&lines).map_err(save_error)?;
    }
    saving.finish().map_err(save_error)?;
    Ok(Prepared {
        keys: keys.into_iter().collect(),
        file,
        entries,
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

/// A file written whole or not at all, durably: appended to under a temporary name, then
/// fsync, rename, fsync of the directory.
struct Saving {
    dir: PathBuf,
    file: PathBuf,
    temporary: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl Saving {
    /// The directory and the file are the owner's alone (0700, 0600): they hold writes of
    /// the database, as the data directory does.
    fn create(dir: &Path, file: &Path) -> std::io::Result<Saving> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let temporary = file.with_extension("jsonl.partial");
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        let out = std::io::BufWriter::new(out);
        Ok(Saving {
            dir: dir.to_owned(),
            file: file.to_owned(),
            temporary,
            out,
        })
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)
    }

    fn finish(self) -> std::io::Result<()> {
        let out = self.out.into_inner().map_err(|error| error.into_error())?;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&self.temporary, &self.file)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }
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
