//! The checkers: each of the spec's promises, judged on every step and at the end.
//!
//! The model they keep is small: the digest of every state a source ever committed (by LSN
//! and chain hash, which names a history), every acknowledged write with the epoch id it
//! was written in, which node wrote in which epoch id, and the data a halted mirror held
//! when it halted.

use std::collections::BTreeMap;

use xmirror_proto::hash::StateDigester;
use xmirror_proto::{ChainHash, Entry, EpochId, EpochStart, ErrorCode, Lsn, Position, StateDigest};
use xmirror_store::{Store, SyncState};

/// A broken promise, with when and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The promise, as RELIABILITY.md names it.
    pub rule: Rule,
    /// What was seen.
    pub detail: String,
    /// Simulated milliseconds since the start.
    pub at_ms: u64,
}

/// The promises checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// A mirror that serves reads holds a state some source had at that position.
    ServesOnlyTheSources,
    /// A halted mirror keeps its data until an operator acts.
    HaltKeepsData,
    /// An acknowledged write is on the final source, unless a forced promotion left it out.
    AcknowledgedWritesKept,
    /// At most one node accepts writes in an epoch id.
    OneWriterPerEpoch,
    /// After the faults stop, every mirror reaches the source's state.
    Converges,
    /// No session or store work ends `INTERNAL`.
    NoInternalError,
    /// After a forced promotion, the old source takes no write once it has been up and
    /// reachable from the promoted node for a while (the promoted node fences it on sight).
    OldSourceFenced,
    /// A kill -9 loses nothing a node made durable: it restarts where it stood.
    CrashLosesNothing,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} ms] {:?}: {}", self.at_ms, self.rule, self.detail)
    }
}

/// A write a source acknowledged.
#[derive(Clone, Debug)]
struct Acknowledged {
    node: String,
    epoch_id: EpochId,
    lsn: Lsn,
}

/// The copy a mirror held when it halted.
#[derive(Clone, Copy, Debug)]
struct Halt {
    position: Position,
    digest: StateDigest,
}

/// What the checkers remember of the run.
#[derive(Default)]
pub struct Model {
    /// Every state a source committed: (LSN, chain hash) -> digest.
    source_states: BTreeMap<(Lsn, [u8; 32]), StateDigest>,
    acknowledged: Vec<Acknowledged>,
    /// Which node wrote in each epoch id.
    writers: BTreeMap<u64, String>,
    /// A halted mirror's copy when its halt was first seen.
    halts: BTreeMap<String, Halt>,
    /// Forced promotions so far: only they may leave an acknowledged write out.
    pub forced_promotions: u32,
    /// Fenced sources an operator restored from a backup taken before the fence: they take
    /// writes on the old history again, which the new source never sees (an operator's
    /// fork, as a forced promotion is).
    pub operator_forks: u32,
    /// What was found.
    pub violations: Vec<Violation>,
    /// Where each crashed node's store stood when it was killed.
    crashed_at: BTreeMap<String, Position>,
    /// Where each node's store stood after its last durable work.
    durable_at: BTreeMap<String, Position>,
    /// Nodes whose power was cut and that have not restarted since.
    power_cuts: Vec<String>,
    /// Nodes stopped by a failed write, not restarted since: whether it survives is for
    /// recovery to decide.
    failed_writes: Vec<String>,
}

fn key(lsn: Lsn, chain_hash: ChainHash) -> (Lsn, [u8; 32]) {
    (lsn, chain_hash.0)
}

impl Model {
    fn violate(&mut self, rule: Rule, at_ms: u64, detail: String) {
        self.violations.push(Violation {
            rule,
            detail,
            at_ms,
        });
    }

    /// A source's store stands at a new state (a commit, a promotion): remember it.
    pub fn source_state(&mut self, store: &dyn Store) {
        if let Ok((lsn, digest)) = store.digest() {
            let position = store.position();
            debug_assert_eq!(lsn, position.lsn);
            self.source_states
                .insert(key(position.lsn, position.chain_hash), digest);
        }
    }

    /// A source is about to commit `entries` from where `store` stands: every state the
    /// group passes through (one per LSN: a mirror may stop between two of its entries) is
    /// computed from the data before it, apart from the store.
    pub fn committing(&mut self, store: &dyn Store, entries: &[Entry]) {
        let Ok(chunk) = store.scan(None, usize::MAX) else {
            return;
        };
        let mut data: BTreeMap<Vec<u8>, Vec<u8>> = chunk.pairs.into_iter().collect();
        let mut position = store.position();
        for entry in entries {
            position = Position {
                lsn: position.lsn.next(),
                chain_hash: position.chain_hash.next(position.lsn.next(), entry),
            };
            apply(&mut data, entry);
            let mut digester = StateDigester::new();
            for (key, value) in &data {
                digester.update(key, value);
            }
            self.source_states
                .insert(key(position.lsn, position.chain_hash), digester.finish());
        }
    }

    /// `node` acknowledged a write at `lsn` in the epoch `history` ends with.
    pub fn acknowledged(&mut self, at_ms: u64, node: &str, history: &[EpochStart], lsn: Lsn) {
        let epoch_id = history.last().map_or(EpochId::FIRST, |start| start.id);
        match self.writers.get(&epoch_id.0) {
            Some(writer) if writer != node => {
                let detail = format!(
                    "{node} acknowledged LSN {lsn} in epoch id {epoch_id:?}, which {writer} writes in"
                );
                self.violate(Rule::OneWriterPerEpoch, at_ms, detail);
            }
            Some(_) => {}
            None => {
                self.writers.insert(epoch_id.0, node.to_owned());
            }
        }
        self.acknowledged.push(Acknowledged {
            node: node.to_owned(),
            epoch_id,
            lsn,
        });
    }

    /// `node` was restored from a backup that ends at `lsn`: the operator gave up the writes
    /// it acknowledged beyond it, and the data it halted with.
    /// When it is the primary, every write beyond the backup is given up, whoever wrote it
    /// (it held them all).
    pub fn restored(&mut self, node: &str, lsn: Lsn, primary: bool) {
        // Restoring a halted mirror is the operator acting on it.
        self.halts.remove(node);
        self.crashed_at.remove(node);
        self.power_cuts.retain(|cut| cut != node);
        self.durable_at.remove(node);
        self.acknowledged
            .retain(|write| (write.node != node && !primary) || write.lsn <= lsn);
    }

    /// A mirror's store after store work (`halted`: the store records a halt): if it
    /// serves reads, its data must be a state a source had at that position; if it was
    /// halted, its copy is kept until a source vouches for it by streaming to it (the
    /// copy goes on from where it halted) or an operator acts.
    pub fn mirror_state(&mut self, at_ms: u64, node: &str, store: &dyn Store, halted: bool) {
        let position = store.position();
        let serves = store.sync_state() == SyncState::Consistent;
        let Ok((_, digest)) = store.digest() else {
            return;
        };
        if serves {
            match self
                .source_states
                .get(&key(position.lsn, position.chain_hash))
            {
                Some(expected) if *expected == digest => {}
                Some(_) => self.violate(
                    Rule::ServesOnlyTheSources,
                    at_ms,
                    format!(
                        "{node} serves at LSN {} data that differs from the source's there",
                        position.lsn
                    ),
                ),
                None => self.violate(
                    Rule::ServesOnlyTheSources,
                    at_ms,
                    format!(
                        "{node} serves at LSN {} (chain {}) a state no source ever had",
                        position.lsn,
                        short(position.chain_hash)
                    ),
                ),
            }
        }
        let Some(kept) = self.halts.get(node).cloned() else {
            if halted {
                self.halts
                    .insert(node.to_owned(), Halt { position, digest });
            }
            return;
        };
        let same_copy = position == kept.position && digest == kept.digest;
        // Streamed on from the halted copy: the chain passes through it (or the WAL that
        // would show it is gone, which streaming alone does not do this fast).
        let streamed_on = serves
            && position.lsn > kept.position.lsn
            && store
                .chain_hash_at(kept.position.lsn)
                .ok()
                .flatten()
                .is_none_or(|hash| hash == kept.position.chain_hash);
        if !same_copy && !streamed_on {
            let detail = format!(
                "{node} halted holding LSN {}, and now holds other data at LSN {} ({:?}) with no operator acting",
                kept.position.lsn,
                position.lsn,
                store.sync_state()
            );
            self.violate(Rule::HaltKeepsData, at_ms, detail);
            self.halts.remove(node);
        } else if streamed_on && !halted {
            self.halts.remove(node);
        }
    }

    /// A session or store work ended with `code`.
    pub fn ended(&mut self, at_ms: u64, who: &str, code: ErrorCode, detail: &str) {
        if code == ErrorCode::Internal {
            self.violate(
                Rule::NoInternalError,
                at_ms,
                format!("{who} ended INTERNAL: {detail}"),
            );
        }
    }

    /// Something that should never fail in the simulated world did.
    pub fn internal(&mut self, at_ms: u64, detail: String) {
        self.violate(Rule::NoInternalError, at_ms, detail);
    }

    /// At the end: every acknowledged write is in the final source's history (its epoch
    /// is one of the history's, and the write is below the next epoch's start), unless a
    /// forced promotion may have left it out.
    pub fn final_source(&mut self, at_ms: u64, history: &[EpochStart]) {
        if self.forced_promotions > 0 || self.operator_forks > 0 {
            return;
        }
        let lost: Vec<String> = self
            .acknowledged
            .iter()
            .filter(|write| !in_history(history, write.epoch_id, write.lsn))
            .map(|write| format!("{}@{}", write.node, write.lsn))
            .collect();
        if !lost.is_empty() {
            let detail = format!(
                "{} acknowledged writes are not on the final source, with no forced promotion: {}",
                lost.len(),
                lost.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            );
            self.violate(Rule::AcknowledgedWritesKept, at_ms, detail);
        }
    }

    /// `node` was killed standing at `position`.
    pub fn crashed(&mut self, node: &str, position: Position) {
        self.crashed_at.insert(node.to_owned(), position);
    }

    /// The node is stopped by a store write that failed (its outcome unknown).
    pub fn write_failed(&mut self, node: &str) {
        self.failed_writes.push(node.to_owned());
    }

    /// The node killed last lost its power too: only what it made durable is kept.
    pub fn power_cut(&mut self, node: &str) {
        self.power_cuts.push(node.to_owned());
    }

    /// `node` finished durable work (a commit, a piece of a mirror's store work): its store
    /// stands at `position` whatever happens next.
    pub fn durable(&mut self, node: &str, position: Position) {
        self.durable_at.insert(node.to_owned(), position);
    }

    /// `node` restarted (not from a backup) standing at `position`: where it stood when
    /// killed (a process crash keeps what the engine wrote), or at least past its last
    /// durable work (a power cut keeps only that).
    pub fn restarted(&mut self, at_ms: u64, node: &str, position: Position) {
        let powered_off = self.power_cuts.iter().any(|cut| cut == node);
        self.power_cuts.retain(|cut| cut != node);
        if self.failed_writes.iter().any(|failed| failed == node) {
            // The failed write may have survived: no exact position to expect.
            self.failed_writes.retain(|failed| failed != node);
            self.crashed_at.remove(node);
        }
        let durable = self.durable_at.get(node).copied();
        if let (true, Some(durable)) = (powered_off, durable) {
            self.crashed_at.remove(node);
            if position.lsn < durable.lsn {
                let detail = format!(
                    "{node} lost power after LSN {} was durable, and restarted at LSN {}",
                    durable.lsn, position.lsn
                );
                self.violate(Rule::CrashLosesNothing, at_ms, detail);
            }
        }
        self.durable(node, position);
        if let Some(before) = self.crashed_at.remove(node) {
            if position != before {
                let detail = format!(
                    "{node} was killed at LSN {} (chain {}) and restarted at LSN {} (chain {})",
                    before.lsn,
                    short(before.chain_hash),
                    position.lsn,
                    short(position.chain_hash)
                );
                self.violate(Rule::CrashLosesNothing, at_ms, detail);
            }
        }
    }

    /// `node`, the old source of a forced promotion, acknowledged a write after being in
    /// reach of the promoted node since `since_ms`.
    pub fn unfenced_write(&mut self, at_ms: u64, node: &str, promoted: &str, since_ms: u64) {
        let detail = format!(
            "{node} acknowledged a write though {promoted}, promoted by force, has reached it since {since_ms} ms"
        );
        self.violate(Rule::OldSourceFenced, at_ms, detail);
    }

    /// At the end: `node` did not reach the final source's state.
    pub fn not_converged(&mut self, at_ms: u64, detail: String) {
        self.violate(Rule::Converges, at_ms, detail);
    }
}

/// `entry` applied to `data`, as every store applies it.
fn apply(data: &mut BTreeMap<Vec<u8>, Vec<u8>>, entry: &Entry) {
    match entry {
        Entry::Put { key, value } => {
            data.insert(key.clone(), value.clone());
        }
        Entry::Delete { key } => {
            data.remove(key);
        }
        Entry::Batch { writes } => {
            for write in writes {
                match &write.value {
                    Some(value) => data.insert(write.key.clone(), value.clone()),
                    None => data.remove(&write.key),
                };
            }
        }
    }
}

/// Whether the write at `lsn` in epoch `epoch_id` is part of `history`.
fn in_history(history: &[EpochStart], epoch_id: EpochId, lsn: Lsn) -> bool {
    history.iter().enumerate().any(|(index, start)| {
        start.id == epoch_id
            && lsn >= start.first_lsn
            && history
                .get(index + 1)
                .is_none_or(|next| lsn < next.first_lsn)
    })
}

/// The first bytes of a chain hash, for a trace.
pub fn short(hash: ChainHash) -> String {
    hash.0[..4]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmirror_proto::Epoch;

    fn start(epoch: u64, id: u64, first_lsn: u64) -> EpochStart {
        EpochStart {
            epoch: Epoch(epoch),
            id: EpochId(id),
            first_lsn: Lsn(first_lsn),
            chain_hash_before: ChainHash::GENESIS,
        }
    }

    #[test]
    fn a_write_is_in_a_history_when_its_epoch_is_and_it_precedes_the_next_epoch() {
        let history = [start(1, 1, 1), start(2, 7, 10)];
        let cases = [
            (1, 5, true),   // first epoch, before the fork
            (1, 9, true),   // the fork's last shared LSN
            (1, 10, false), // the old epoch went on past the fork: another history
            (7, 10, true),  // the new epoch's first write
            (7, 99, true),  // the last epoch has no end
            (8, 12, false), // an epoch id the history does not have
        ];
        for (epoch_id, lsn, expected) in cases {
            assert_eq!(
                in_history(&history, EpochId(epoch_id), Lsn(lsn)),
                expected,
                "epoch id {epoch_id}, LSN {lsn}"
            );
        }
    }
}
