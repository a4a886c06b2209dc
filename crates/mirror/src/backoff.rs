//! Reconnect delays: exponential with jitter, so that many mirrors cut off by the same
//! outage do not reconnect in lockstep.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with "equal jitter": each delay is half the current step plus a
/// random part of the other half.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Delays from `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// Back to the shortest delay (after a session that made progress).
    pub fn reset(&mut self) {
        self.step = self.min;
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let half = self.step / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        let delay = half + Duration::from_millis(jitter);
        self.step = (self.step * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_within_their_jitter_band() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let steps = [100, 200, 400, 800, 800, 800];
        for step in steps {
            let delay = backoff.next_delay();
            assert!(
                delay >= Duration::from_millis(step / 2) && delay <= Duration::from_millis(step),
                "step {step}: {delay:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
