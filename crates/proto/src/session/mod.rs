//! The replication sessions as state machines with no I/O: the source's session with one
//! mirror ([`source::SourceSession`]) and the mirror's session with its source
//! ([`mirror::MirrorSession`]).
//!
//! Each machine is driven like quinn-proto's `Connection` or raft-rs's `RawNode`: the
//! caller feeds it events (a decoded message, a commit, the result of store work, a timer
//! firing, the peer finishing) and asks it what to do next: a frame to transmit
//! (`poll_transmit`, called only when the stream can take one, which is the machine's
//! backpressure), store work or a timer to arm (`poll_action`), and finally how the session
//! ended (`end`). Nothing here reads a socket, a disk or a clock, so every rule of a session
//! is a plain function call in a table test; `xmirror-source` and `xmirror-mirror` own the
//! async drivers that move the bytes and run the store work off the async threads.
//!
//! They live in `proto` rather than a crate of their own because they are the protocol:
//! which message may come when, and what each obliges the other side to do. They need
//! nothing but the messages and `decide`, exactly as quinn-proto's state machine needs
//! nothing but QUIC's frames.

pub mod mirror;
pub mod source;

use std::sync::Arc;
use std::time::Instant;

use crate::message::{Message, WalBatch};
use crate::types::Lsn;
use crate::Entry;

/// The protocol version that introduced batch entries ([`Entry::Batch`]): a session
/// negotiated at a lower one ends (`BAD_VERSION`) rather than send one.
pub const BATCH_ENTRIES_VERSION: u16 = 2;

/// Key bytes per `RewindRequest` (one key may exceed it alone): far below any frame limit.
/// The mirror asks no more; the source refuses more.
pub const REWIND_REQUEST_KEY_BYTES: usize = 256 << 10;

/// A machine's deadlines, one slot per timer (quinn-proto's `TimerTable`): the machine
/// sets and stops them; the driver sleeps until the earliest ([`TimerTable::next`], which
/// the machines' `poll_timeout` returns) and hands the machine the time once it has
/// passed (`handle_timeout(now)`). Time is only ever given: no machine reads a clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimerTable<const N: usize> {
    deadlines: [Option<Instant>; N],
}

impl<const N: usize> Default for TimerTable<N> {
    fn default() -> Self {
        TimerTable {
            deadlines: [None; N],
        }
    }
}

impl<const N: usize> TimerTable<N> {
    /// Sets timer `timer` to fire at `at`, replacing its deadline.
    pub(crate) fn set(&mut self, timer: usize, at: Instant) {
        self.deadlines[timer] = Some(at);
    }

    /// Stops timer `timer`.
    pub(crate) fn stop(&mut self, timer: usize) {
        self.deadlines[timer] = None;
    }

    /// Whether timer `timer` is set.
    pub(crate) fn is_set(&self, timer: usize) -> bool {
        self.deadlines[timer].is_some()
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Stops and returns the timers due at `now`, in timer order.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        for (timer, deadline) in self.deadlines.iter_mut().enumerate() {
            if deadline.is_some_and(|at| at <= now) {
                *deadline = None;
                due.push(timer);
            }
        }
        due
    }
}

/// A WAL batch ready to transmit, shareable between the sessions of every mirror: the
/// source's writer keeps its recent groups in this form, so that a mirror streaming live
/// is sent the group as committed without the WAL being read back per mirror.
#[derive(Debug, PartialEq, Eq)]
pub struct SharedBatch {
    /// `Message::WalBatch`, encoded straight from here for each mirror.
    pub message: Message,
    /// The batch's first LSN.
    pub first_lsn: Lsn,
    /// The batch's last LSN.
    pub last_lsn: Lsn,
    /// Key and value bytes in the batch: what un-acknowledged WAL is bounded by.
    pub payload_bytes: usize,
    /// The lowest protocol version that can carry it: 2 when it holds a batch entry.
    pub min_version: u16,
}

impl SharedBatch {
    /// Wraps `batch`, noting its bounds and size.
    pub fn new(batch: WalBatch) -> SharedBatch {
        SharedBatch {
            first_lsn: batch.first_lsn,
            last_lsn: batch.last_lsn(),
            payload_bytes: batch.entries.iter().map(Entry::payload_len).sum(),
            min_version: if batch
                .entries
                .iter()
                .any(|entry| matches!(entry, Entry::Batch { .. }))
            {
                BATCH_ENTRIES_VERSION
            } else {
                1
            },
            message: batch.into(),
        }
    }
}

/// A frame a session hands its driver to write.
// Moved once from the machine to the writer: boxing the largest message (a hello) would
// cost an allocation per frame for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// A message of this session alone.
    Message(Message),
    /// A WAL batch that other sessions may be sending too.
    Batch(Arc<SharedBatch>),
}

impl Outgoing {
    /// The message to encode.
    pub fn message(&self) -> &Message {
        match self {
            Outgoing::Message(message) => message,
            Outgoing::Batch(batch) => &batch.message,
        }
    }
}

/// The clock of the machines' table tests: every session starts at one instant, and time
/// passes only as a test says.
#[cfg(test)]
pub(crate) mod test_clock {
    use std::time::{Duration, Instant};

    /// The instant every test session starts at.
    pub(crate) fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// `t0` plus `ms`.
    pub(crate) fn at(ms: u64) -> Instant {
        t0() + Duration::from_millis(ms)
    }
}
