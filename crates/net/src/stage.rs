//! Stage marks: where a write is on its way from the source's durable commit to the
//! mirror's durable apply, as `TRACE` events under the target [`TARGET`].
//!
//! Each mark names a stage and the last LSN it covers (a group, a frame), and is emitted on
//! the thread that did the work, at the moment it finished: a subscriber that records the
//! time of each event sees every stage without a clock in the nodes' own code. The
//! benchmarks do exactly that to say where the replication lag goes. Nothing in xmirror
//! reads them; with the usual `info` filter they are disabled at the call site and cost a
//! relaxed atomic load.

use xmirror_proto::Lsn;

/// The `tracing` target of every mark.
pub const TARGET: &str = "xmirror::stage";

/// A stage of the way from commit to durable apply, in the order an entry passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// The source's writer: the group commit that holds the entry is durable.
    Committed,
    /// The source's session: the frame that carries it is written to the QUIC stream.
    Sent,
    /// The mirror's session: the frame that carries it is read and decoded.
    Received,
    /// The mirror's store: the write of the group that holds it begins (the time before
    /// is grouping and the hand-off to a store thread).
    Storing,
    /// The mirror's store: the group that holds it is written and durable.
    Applied,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 5] = [
        Stage::Committed,
        Stage::Sent,
        Stage::Received,
        Stage::Storing,
        Stage::Applied,
    ];

    /// The stage's name in the event's `stage` field.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Committed => "committed",
            Stage::Sent => "sent",
            Stage::Received => "received",
            Stage::Storing => "storing",
            Stage::Applied => "applied",
        }
    }

    /// The stage a `stage` field names.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|stage| stage.name() == name)
    }
}

/// Marks that every entry up to `last_lsn` has passed `stage`.
pub fn mark(stage: Stage, last_lsn: Lsn) {
    tracing::trace!(target: TARGET, stage = stage.name(), lsn = last_lsn.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_is_found_by_its_name() {
        for stage in Stage::ALL {
            assert_eq!(Stage::from_name(stage.name()), Some(stage));
        }
        assert_eq!(Stage::from_name("flushed"), None);
    }
}
