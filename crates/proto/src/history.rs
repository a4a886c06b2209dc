//! A database's epochs: where each began, so that two nodes can tell how far their
//! histories agree after a promotion.
//!
//! Each promotion starts a new epoch at the LSN after the promoted node's last applied one,
//! and records the chain hash there (as PostgreSQL's timeline history file records the
//! switch point). A node of an earlier epoch holds the new history exactly up to that
//! LSN, if its chain hash there is the recorded one; whatever it holds beyond it was never
//! part of the new history and is rewound on failback.

use serde::{Deserialize, Serialize};

use crate::hash::ChainHash;
use crate::types::{Epoch, Lsn};

/// Where one epoch of a database began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: Epoch,
    /// Its first LSN: the promoted node's applied LSN plus one.
    pub first_lsn: Lsn,
    /// The chain hash at `first_lsn - 1`, where the new history forks from the old.
    pub chain_hash_before: ChainHash,
}

impl EpochStart {
    /// The first epoch of every database: it starts at LSN 1, on the genesis hash.
    pub const FIRST: EpochStart = EpochStart {
        epoch: Epoch::FIRST,
        first_lsn: Lsn(1),
        chain_hash_before: ChainHash::GENESIS,
    };

    /// The LSN the epoch forks at: the last one it shares with the epoch before it.
    pub fn fork_lsn(&self) -> Lsn {
        Lsn(self.first_lsn.0.saturating_sub(1))
    }
}

/// Why a history cannot take another epoch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// Epochs must grow, and each must start no earlier than the one before.
    #[error("epoch {next} starting at LSN {first_lsn} cannot follow epoch {last} starting at LSN {last_first_lsn}")]
    OutOfOrder {
        /// The last epoch held.
        last: Epoch,
        /// Where it started.
        last_first_lsn: Lsn,
        /// The epoch offered.
        next: Epoch,
        /// Where it would start.
        first_lsn: Lsn,
    },
}

/// Checks that `history` is a valid record: epochs strictly growing, first LSNs never
/// going back.
pub fn check(history: &[EpochStart]) -> Result<(), HistoryError> {
    for pair in history.windows(2) {
        let (last, next) = (pair[0], pair[1]);
        if next.epoch <= last.epoch || next.first_lsn < last.first_lsn {
            return Err(HistoryError::OutOfOrder {
                last: last.epoch,
                last_first_lsn: last.first_lsn,
                next: next.epoch,
                first_lsn: next.first_lsn,
            });
        }
    }
    Ok(())
}

/// The epoch that ended the history of a node at `epoch`: the first later epoch in
/// `history`, whose fork LSN is the last the node can share with it. The first epoch
/// ended nothing (a node below it holds no database).
pub fn successor_of(history: &[EpochStart], epoch: Epoch) -> Option<EpochStart> {
    history
        .iter()
        .copied()
        .find(|start| start.epoch > epoch && start.epoch > Epoch::FIRST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(epoch: u64, first_lsn: u64) -> EpochStart {
        EpochStart {
            epoch: Epoch(epoch),
            first_lsn: Lsn(first_lsn),
            chain_hash_before: ChainHash([epoch as u8; 32]),
        }
    }

    #[test]
    fn a_history_grows_in_epoch_and_never_goes_back_in_lsn() {
        assert_eq!(
            check(&[EpochStart::FIRST, start(2, 50), start(3, 50)]),
            Ok(())
        );
        assert!(check(&[EpochStart::FIRST, start(3, 50), start(2, 60)]).is_err());
        assert!(check(&[EpochStart::FIRST, start(2, 50), start(3, 40)]).is_err());
        assert!(check(&[EpochStart::FIRST, start(1, 50)]).is_err());
    }

    #[test]
    fn the_successor_of_an_epoch_says_where_its_history_ended() {
        let history = [EpochStart::FIRST, start(2, 101), start(4, 301)];
        assert_eq!(successor_of(&history, Epoch(1)), Some(start(2, 101)));
        assert_eq!(
            successor_of(&history, Epoch(1)).unwrap().fork_lsn(),
            Lsn(100)
        );
        // An epoch the history skipped (promoted elsewhere and lost) ends at the next one.
        assert_eq!(successor_of(&history, Epoch(3)), Some(start(4, 301)));
        assert_eq!(successor_of(&history, Epoch(4)), None);
        assert_eq!(successor_of(&history, Epoch(0)), Some(start(2, 101)));
        assert_eq!(successor_of(&[EpochStart::FIRST], Epoch(0)), None);
    }
}
