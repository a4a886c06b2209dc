//! The source's send-rate cap (`--max-send-mbit-s`): one budget of bytes per second shared
//! by every mirror session, under which the WAL goes before snapshot chunks.
//!
//! A long link is usually shared with other traffic, and one mirror's snapshot must not
//! take the bandwidth another mirror's live WAL needs. [`Bucket`] is the rule, with no
//! clock of its own (a table test drives it with explicit instants); [`SendPacer`] waits on
//! it for the session drivers.
//!
//! The rule: the budget refills at the cap's rate up to a burst; a *priority* frame (WAL,
//! heartbeats, acks, everything but snapshot chunks) may leave whenever the budget is not
//! in debt, and may put it into debt; a *bulk* frame (a snapshot chunk) leaves only when
//! the budget already holds its bytes and no priority frame is waiting. So a chunk never
//! puts the WAL behind a debt of its own making: the WAL waits at most for other WAL. The
//! burst is at least one ordinary chunk frame, or no chunk could ever be paid for in
//! advance (a chunk larger still, cut around one huge pair, leaves from a full budget and
//! is the one case of bulk debt).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long of the cap's rate the budget may save up while idle, at least.
const BURST_TIME: Duration = Duration::from_millis(50);

/// The smallest burst, so that a low cap still lets a whole WAL batch frame of ordinary
/// size leave in one go.
const MIN_BURST_BYTES: f64 = 64.0 * 1024.0;

/// How long a bulk frame waiting behind priority frames sleeps before it looks again.
const BULK_RECHECK: Duration = Duration::from_millis(1);

/// Which frames go first under the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendClass {
    /// WAL batches and every control frame.
    Priority,
    /// Snapshot chunks.
    Bulk,
}

/// The budget, without a clock.
#[derive(Debug)]
pub struct Bucket {
    bytes_per_second: f64,
    burst: f64,
    /// Bytes that may leave now; negative while in debt.
    balance: f64,
    refilled_at: Instant,
    /// Priority frames waiting for the budget.
    priority_waiting: usize,
}

impl Bucket {
    /// A full budget of `bytes_per_second`, as of `now`, whose burst holds a bulk frame of
    /// `bulk_frame_bytes`.
    pub fn new(bytes_per_second: u64, bulk_frame_bytes: usize, now: Instant) -> Bucket {
        let bytes_per_second = bytes_per_second.max(1) as f64;
        let burst = (bytes_per_second * BURST_TIME.as_secs_f64())
            .max(MIN_BURST_BYTES)
            .max(bulk_frame_bytes as f64);
        Bucket {
            bytes_per_second,
            burst,
            balance: burst,
            refilled_at: now,
            priority_waiting: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64()
            * self.bytes_per_second;
        self.balance = (self.balance + earned).min(self.burst);
        self.refilled_at = self.refilled_at.max(now);
    }

    /// Takes `bytes` of `class` from the budget at `now`, or says how long to wait before
    /// asking again.
    pub fn take(&mut self, now: Instant, bytes: usize, class: SendClass) -> Result<(), Duration> {
        self.refill(now);
        let bytes = bytes as f64;
        let needed = match class {
            SendClass::Priority => 0.0,
            SendClass::Bulk if self.priority_waiting > 0 => return Err(BULK_RECHECK),
            SendClass::Bulk => bytes.min(self.burst),
        };
        if self.balance >= needed {
            self.balance -= bytes;
            Ok(())
        } else {
            let wait = (needed - self.balance) / self.bytes_per_second;
            Err(Duration::from_secs_f64(wait).max(Duration::from_micros(100)))
        }
    }
}

/// The shared cap the session drivers wait on.
#[derive(Debug)]
pub struct SendPacer {
    bucket: Mutex<Bucket>,
}

/// Counts a priority frame as waiting until it leaves, or its sender is dropped.
struct Waiting<'a>(&'a SendPacer);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().priority_waiting -= 1;
    }
}

impl SendPacer {
    /// A cap of `bytes_per_second` for every session that shares it, whose snapshot chunk
    /// frames are at most `bulk_frame_bytes` (but for one cut around a single huge pair).
    pub fn new(bytes_per_second: u64, bulk_frame_bytes: usize) -> SendPacer {
        SendPacer {
            bucket: Mutex::new(Bucket::new(
                bytes_per_second,
                bulk_frame_bytes,
                Instant::now(),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // The bucket is plain numbers: a panic elsewhere leaves it usable.
        self.bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until `bytes` of `class` may leave, and takes them from the budget.
    pub async fn acquire(&self, bytes: usize, class: SendClass) {
        let mut waiting = None;
        loop {
            let wait = {
                let mut bucket = self.lock();
                match bucket.take(Instant::now(), bytes, class) {
                    Ok(()) => None,
                    Err(wait) => {
                        if class == SendClass::Priority && waiting.is_none() {
                            bucket.priority_waiting += 1;
                        }
                        Some(wait)
                    }
                }
            };
            match wait {
                None => return,
                Some(wait) => {
                    if class == SendClass::Priority && waiting.is_none() {
                        waiting = Some(Waiting(self));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: u64 = 1_000_000; // 1 MB/s: a 64 KiB burst, 1 byte per microsecond.

    #[test]
    fn the_budget_refills_at_the_rate_up_to_the_burst() {
        let start = Instant::now();
        let mut bucket = Bucket::new(RATE, 0, start);
        let burst = 64 * 1024;
        // A full burst leaves at once, then the next priority frame waits for the debt.
        assert_eq!(bucket.take(start, burst, SendClass::Priority), Ok(()));
        assert_eq!(bucket.take(start, 1, SendClass::Priority), Ok(()));
        let wait = bucket.take(start, 1, SendClass::Priority).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_micros(100),
            "1 byte of debt: the floor"
        );
        // 10 ms later 10 kB were earned.
        let later = start + Duration::from_millis(10);
        assert_eq!(bucket.take(later, 10_000, SendClass::Priority), Ok(()));
        // An idle minute saves a burst, not a minute's worth.
        let idle = later + Duration::from_secs(60);
        assert_eq!(bucket.take(idle, burst, SendClass::Bulk), Ok(()));
        assert!(bucket.take(idle, 1000, SendClass::Bulk).is_err());
    }

    /// Frames taken before, in order; the frame asked for; `Ok` or how long it waits.
    type Case = (
        Vec<(usize, SendClass)>,
        (usize, SendClass),
        Result<(), Duration>,
    );

    #[test]
    fn bulk_waits_for_its_bytes_and_for_priority_frames() {
        let start = Instant::now();
        let cases: Vec<Case> = vec![
            // A bulk frame needs its bytes in the budget; a priority frame only no debt.
            (
                vec![(60_000, SendClass::Priority)],
                (10_000, SendClass::Bulk),
                Err(Duration::from_micros(10_000 - (65_536 - 60_000))),
            ),
            (
                vec![(60_000, SendClass::Priority)],
                (10_000, SendClass::Priority),
                Ok(()),
            ),
            // A bulk frame larger than the burst leaves from a full budget.
            (vec![], (1_000_000, SendClass::Bulk), Ok(())),
            // After a bulk frame's debt... there is none: it only spent what was there.
            (
                vec![(65_536, SendClass::Bulk)],
                (1, SendClass::Priority),
                Ok(()),
            ),
        ];
        for (before, (bytes, class), expected) in cases {
            let mut bucket = Bucket::new(RATE, 0, start);
            for (taken, taken_class) in &before {
                bucket.take(start, *taken, *taken_class).unwrap();
            }
            assert_eq!(
                bucket.take(start, bytes, class),
                expected,
                "{before:?} then {bytes} {class:?}"
            );
        }
        // With a priority frame waiting, a bulk frame waits even if the budget holds it.
        let mut bucket = Bucket::new(RATE, 0, start);
        bucket.priority_waiting = 1;
        assert_eq!(bucket.take(start, 1, SendClass::Bulk), Err(BULK_RECHECK));
        bucket.priority_waiting = 0;
        assert_eq!(bucket.take(start, 1, SendClass::Bulk), Ok(()));
        // A burst sized for the chunk frames lets one be paid for in advance, and leave
        // the budget at zero, not in debt.
        let mut bucket = Bucket::new(RATE, 1 << 20, start);
        assert_eq!(bucket.take(start, 1 << 20, SendClass::Bulk), Ok(()));
        assert_eq!(bucket.take(start, 1, SendClass::Priority), Ok(()));
    }

    #[tokio::test]
    async fn a_priority_frame_is_counted_waiting_until_it_leaves_or_gives_up() {
        let pacer = std::sync::Arc::new(SendPacer::new(RATE, 0));
        // 100 MB of debt: 100 s to repay, far beyond anything this test waits for.
        pacer.acquire(100_000_000, SendClass::Priority).await;
        let waiter = tokio::spawn({
            let pacer = pacer.clone();
            async move { pacer.acquire(1, SendClass::Priority).await }
        });
        tokio::time::timeout(Duration::from_secs(30), async {
            while pacer.lock().priority_waiting == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the waiter registers");
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(pacer.lock().priority_waiting, 0, "dropped while waiting");
        // A frame that waits (one byte of debt) and then leaves is not counted either.
        let pacer = SendPacer::new(RATE, 0);
        pacer.acquire(65_537, SendClass::Priority).await;
        tokio::time::timeout(
            Duration::from_secs(30),
            pacer.acquire(1, SendClass::Priority),
        )
        .await
        .expect("a 100 us wait ends");
        assert_eq!(pacer.lock().priority_waiting, 0, "left");
    }
}
