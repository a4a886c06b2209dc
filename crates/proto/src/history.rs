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
use crate::types::{DatabaseId, Epoch, EpochId, Lsn, Name};

/// Where one epoch of a database began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: Epoch,
    /// The random id the promotion that started it chose.
    pub id: EpochId,
    /// Its first LSN: the promoted node's applied LSN plus one.
    pub first_lsn: Lsn,
    /// The chain hash at `first_lsn - 1`, where the new history forks from the old.
    pub chain_hash_before: ChainHash,
}

impl EpochStart {
    /// The first epoch of every database: it starts at LSN 1, on the genesis hash.
    pub const FIRST: EpochStart = EpochStart {
        epoch: Epoch::FIRST,
        id: EpochId::FIRST,
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

/// Whether two histories name one epoch with different ids: two promotions of one epoch
/// number, which are two histories however their chain hashes compare.
pub fn conflicting_epoch(ours: &[EpochStart], theirs: &[EpochStart]) -> Option<Epoch> {
    ours.iter().find_map(|mine| {
        theirs
            .iter()
            .any(|other| other.epoch == mine.epoch && other.id != mine.id)
            .then_some(mine.epoch)
    })
}

/// The promotion a fence is for: the epoch it starts, its id, and the identity (cluster and
/// name) of the node that promotes. A fenced source answers only that successor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Successor {
    /// The epoch the successor starts.
    pub epoch: Epoch,
    /// Its random id.
    pub epoch_id: EpochId,
    /// The successor's cluster, from its certificate.
    pub cluster: Name,
    /// The successor's name, from its certificate.
    pub name: Name,
}

impl std::fmt::Display for Successor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only observers speak the mirror protocol, so a successor is always one.
        write!(
            f,
            "spiffe://{}/observer/{} (epoch {} id {})",
            self.cluster, self.name, self.epoch, self.epoch_id
        )
    }
}

/// What a source is fenced by: a later epoch of its database and, once a promotion claimed
/// it, the one successor it answers. Kept by the store across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The later epoch.
    pub epoch: Epoch,
    /// The promotion it is for, once one claimed it.
    pub successor: Option<Successor>,
    /// Whether a promotion to `epoch` itself may still claim it: yes for an operator's
    /// `xmirror fence` (it reserves the next epoch for whoever promotes first); no for a
    /// fence learned from a node already in that epoch (a hello, an ack: the epoch exists,
    /// promoted elsewhere, and a second promotion to it would make it twice).
    pub open_to_promotion: bool,
}

/// A fence asked of a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceAsk {
    /// A node of a later epoch was met (a hello, an ack): that epoch exists.
    LaterEpoch(Epoch),
    /// An operator's `xmirror fence`: refuse every write from now on; the epoch is for the
    /// first promotion that asks.
    Operator(Epoch),
    /// A promotion: fence for this successor, the only one.
    Promotion(Successor),
}

/// A promotion the fence does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceRefused {
    /// The source is fenced for another successor.
    #[error("this source is already fenced for {holder}; a second promotion of it would make two sources of one database")]
    Held {
        /// The successor the fence is for.
        holder: Successor,
    },
    /// The source knows of a node already in the epoch the promotion would start, or in a
    /// later one: that epoch was promoted elsewhere.
    #[error("this source is fenced by epoch {held}, promoted elsewhere: a promotion to epoch {asked} would make it twice")]
    LaterEpoch {
        /// The epoch the source is fenced by.
        held: Epoch,
        /// The epoch the promotion asked for.
        asked: Epoch,
    },
}

/// The fence to record when `ask` meets the fence `held` (`Ok(held unchanged)` when nothing
/// changes), or why a promotion is refused. One rule, so that two promotions of one source
/// never both succeed: the first promotion to ask claims the fence (one set before by
/// `xmirror fence` included), its retries get the same answer, and any other promotion is
/// refused naming the holder; a fence learned from a node of a later epoch is claimed only
/// by a promotion to a still later one.
pub fn fence_after(held: Option<&Fence>, ask: &FenceAsk) -> Result<Fence, FenceRefused> {
    let unclaimed = |epoch: Epoch, open_to_promotion: bool| Fence {
        epoch,
        successor: None,
        open_to_promotion,
    };
    match (held, ask) {
        (None, FenceAsk::LaterEpoch(epoch)) => Ok(unclaimed(*epoch, false)),
        (None, FenceAsk::Operator(epoch)) => Ok(unclaimed(*epoch, true)),
        (None, FenceAsk::Promotion(successor)) => Ok(Fence {
            epoch: successor.epoch,
            successor: Some(successor.clone()),
            open_to_promotion: false,
        }),
        (Some(held), FenceAsk::LaterEpoch(epoch) | FenceAsk::Operator(epoch))
            if *epoch <= held.epoch =>
        {
            Ok(held.clone())
        }
        (Some(held), FenceAsk::LaterEpoch(epoch)) => Ok(Fence {
            epoch: *epoch,
            successor: held.successor.clone(),
            open_to_promotion: false,
        }),
        (Some(held), FenceAsk::Operator(epoch)) => Ok(Fence {
            epoch: *epoch,
            successor: held.successor.clone(),
            open_to_promotion: held.successor.is_none(),
        }),
        (Some(held), FenceAsk::Promotion(successor)) => match &held.successor {
            Some(holder) if holder == successor => Ok(held.clone()),
            Some(holder) => Err(FenceRefused::Held {
                holder: holder.clone(),
            }),
            None if successor.epoch > held.epoch
                || (successor.epoch == held.epoch && held.open_to_promotion) =>
            {
                Ok(Fence {
                    epoch: successor.epoch,
                    successor: Some(successor.clone()),
                    open_to_promotion: false,
                })
            }
            None => Err(FenceRefused::LaterEpoch {
                held: held.epoch,
                asked: successor.epoch,
            }),
        },
    }
}

/// A point of a database's history, as a write's reply names it: the database, the id of
/// the epoch the write was made in, and its LSN. A read may ask for it (`--after`): only a
/// node whose history holds that point serves it. Written `<database id>.<epoch id>.<lsn>`
/// in hex, hex and decimal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HistoryToken {
    /// The database written to.
    pub database_id: DatabaseId,
    /// The epoch the write was made in.
    pub epoch_id: EpochId,
    /// The write's LSN.
    pub lsn: Lsn,
}

impl std::fmt::Display for HistoryToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.database_id, self.epoch_id, self.lsn)
    }
}

/// Text that is not a history token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a history token (<database id>.<epoch id>.<lsn>, as a write printed it)")]
pub struct BadToken(pub String);

impl std::str::FromStr for HistoryToken {
    type Err = BadToken;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadToken(text.to_owned());
        let mut parts = text.split('.');
        let (Some(database), Some(epoch), Some(lsn), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(HistoryToken {
            database_id: DatabaseId::from_hex(database).ok_or_else(bad)?,
            epoch_id: EpochId(u64::from_str_radix(epoch, 16).map_err(|_| bad())?),
            lsn: Lsn(lsn.parse().map_err(|_| bad())?),
        })
    }
}

/// Why a node's history does not hold a token's point.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotInHistory {
    /// The token is of another database.
    #[error("the token is of database {token}, this node holds {held}")]
    OtherDatabase {
        /// The token's.
        token: DatabaseId,
        /// The node's.
        held: DatabaseId,
    },
    /// The token's epoch is not one this node's history holds.
    #[error("the token's epoch {0} is not in this node's history")]
    UnknownEpoch(EpochId),
    /// The token's epoch ended before its LSN here: the write was on a branch this
    /// history left (lost in a failover).
    #[error(
        "the token's LSN {lsn} is past where its epoch ended in this node's history (LSN {ended})"
    )]
    PastItsEpoch {
        /// The token's LSN.
        lsn: Lsn,
        /// The last LSN of the token's epoch here.
        ended: Lsn,
    },
}

/// Whether the history of a node holding `database_id` with epochs `history` holds the
/// point `token` names: same database, the token's epoch is one of its epochs, and the
/// token's LSN is before the next epoch's fork. (Whether the node has applied that far
/// is for the reader to wait for.)
pub fn holds(
    database_id: DatabaseId,
    history: &[EpochStart],
    token: &HistoryToken,
) -> Result<(), NotInHistory> {
    if token.database_id != database_id {
        return Err(NotInHistory::OtherDatabase {
            token: token.database_id,
            held: database_id,
        });
    }
    let history: &[EpochStart] = if history.is_empty() {
        &[EpochStart::FIRST]
    } else {
        history
    };
    let Some(at) = history.iter().position(|start| start.id == token.epoch_id) else {
        return Err(NotInHistory::UnknownEpoch(token.epoch_id));
    };
    match history.get(at + 1) {
        Some(next) if token.lsn > next.fork_lsn() => Err(NotInHistory::PastItsEpoch {
            lsn: token.lsn,
            ended: next.fork_lsn(),
        }),
        _ => Ok(()),
    }
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
            id: EpochId(epoch * 100),
            first_lsn: Lsn(first_lsn),
            chain_hash_before: ChainHash([epoch as u8; 32]),
        }
    }

    fn successor(name: &str, epoch: u64, id: u64) -> Successor {
        Successor {
            epoch: Epoch(epoch),
            epoch_id: EpochId(id),
            cluster: Name::new("west").unwrap(),
            name: Name::new(name).unwrap(),
        }
    }

    #[test]
    fn a_source_is_fenced_for_one_successor_only() {
        let m1 = successor("m1", 2, 7);
        let m2 = successor("m2", 2, 8);
        let fenced = |epoch: u64, holder: Option<&Successor>| Fence {
            epoch: Epoch(epoch),
            successor: holder.cloned(),
            open_to_promotion: false,
        };
        let reserved = |epoch: u64| Fence {
            open_to_promotion: true,
            ..fenced(epoch, None)
        };
        let promotion = |successor: &Successor| FenceAsk::Promotion(successor.clone());
        #[rustfmt::skip]
        let cases = [
            // (label, held, asked, result)
            ("the first promotion claims the fence", None, promotion(&m1), Ok(fenced(2, Some(&m1)))),
            ("its retry gets the same answer", Some(fenced(2, Some(&m1))), promotion(&m1), Ok(fenced(2, Some(&m1)))),
            ("a second promotion is refused, naming the holder", Some(fenced(2, Some(&m1))), promotion(&m2),
                Err(FenceRefused::Held { holder: m1.clone() })),
            ("the same node with another epoch id is another promotion", Some(fenced(2, Some(&m1))),
                promotion(&successor("m1", 2, 9)), Err(FenceRefused::Held { holder: m1.clone() })),
            ("xmirror fence reserves the epoch for the first promotion", None, FenceAsk::Operator(Epoch(2)), Ok(reserved(2))),
            ("which claims it", Some(reserved(2)), promotion(&m2), Ok(fenced(2, Some(&m2)))),
            // A forced promotion's node met the source (fence on sight): epoch 2 exists.
            ("a fence learned from epoch 2 is not for a promotion to epoch 2", Some(fenced(2, None)), promotion(&m1),
                Err(FenceRefused::LaterEpoch { held: Epoch(2), asked: Epoch(2) })),
            ("but a promotion to a later epoch may claim it", Some(fenced(2, None)), promotion(&successor("m3", 3, 4)),
                Ok(fenced(3, Some(&successor("m3", 3, 4))))),
            ("a promotion to an epoch already passed is refused", Some(reserved(3)), promotion(&m1),
                Err(FenceRefused::LaterEpoch { held: Epoch(3), asked: Epoch(2) })),
            ("a later epoch learned keeps the successor", Some(fenced(2, Some(&m1))), FenceAsk::LaterEpoch(Epoch(3)),
                Ok(fenced(3, Some(&m1)))),
            ("a later epoch learned closes a reservation", Some(reserved(2)), FenceAsk::LaterEpoch(Epoch(3)),
                Ok(fenced(3, None))),
            ("an earlier epoch learned changes nothing", Some(reserved(3)), FenceAsk::LaterEpoch(Epoch(2)),
                Ok(reserved(3))),
            ("a later epoch fences an unfenced source", None, FenceAsk::LaterEpoch(Epoch(2)), Ok(fenced(2, None))),
        ];
        for (label, held, asked, expected) in cases {
            assert_eq!(fence_after(held.as_ref(), &asked), expected, "{label}");
        }
    }

    #[test]
    fn two_promotions_of_one_epoch_number_are_two_histories() {
        let promoted = |id| {
            [
                EpochStart::FIRST,
                EpochStart {
                    id: EpochId(id),
                    ..start(2, 50)
                },
            ]
        };
        assert_eq!(conflicting_epoch(&promoted(1), &promoted(1)), None);
        assert_eq!(
            conflicting_epoch(&promoted(1), &promoted(2)),
            Some(Epoch(2))
        );
        assert_eq!(conflicting_epoch(&promoted(1), &[EpochStart::FIRST]), None);
    }

    #[test]
    fn a_token_is_served_only_by_a_history_that_holds_its_point() {
        let database = DatabaseId([4; 16]);
        let history = [EpochStart::FIRST, start(2, 101)];
        let token = |epoch_id: u64, lsn: u64| HistoryToken {
            database_id: database,
            epoch_id: EpochId(epoch_id),
            lsn: Lsn(lsn),
        };
        #[rustfmt::skip]
        let cases = [
            ("epoch 1 before the fork", token(0, 100), Ok(())),
            ("epoch 1 past the fork: a write the failover lost", token(0, 101),
                Err(NotInHistory::PastItsEpoch { lsn: Lsn(101), ended: Lsn(100) })),
            ("the current epoch, any LSN", token(200, 5_000), Ok(())),
            ("another promotion's epoch 2", token(201, 150), Err(NotInHistory::UnknownEpoch(EpochId(201)))),
            ("another database", HistoryToken { database_id: DatabaseId([5; 16]), ..token(0, 1) },
                Err(NotInHistory::OtherDatabase { token: DatabaseId([5; 16]), held: database })),
        ];
        for (label, token, expected) in cases {
            assert_eq!(holds(database, &history, &token), expected, "{label}");
        }
        // Printed and read back.
        let printed = token(200, 42).to_string();
        assert_eq!(printed.parse(), Ok(token(200, 42)));
        assert!("nope".parse::<HistoryToken>().is_err());
        assert!(format!("{printed}.1").parse::<HistoryToken>().is_err());
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
