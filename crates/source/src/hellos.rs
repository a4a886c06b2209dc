//! What a hello may cost the source: accepted hellos are rate-limited per identity and per
//! other cluster, and the store's size (for a snapshot's progress) is measured by one
//! thread at most once a minute, whatever the number of hellos.
//!
//! A hello costs store reads (the decision's view) and, for a new mirror, a snapshot; a
//! fleet of identities minted by one foreign CA, saying hello over and over, would
//! otherwise take the source's blocking threads and its disk from its writers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use xmirror_proto::{Name, PeerIdentity};
use xmirror_store::Store;

/// A token bucket: `burst` at most, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Hellos accepted at once after a quiet while.
    pub burst: f64,
    /// Hellos accepted per second in the long run.
    pub per_second: f64,
}

impl Rate {
    /// One identity: a mirror reconnecting with backoff never comes near it.
    pub const PER_IDENTITY: Rate = Rate {
        burst: 10.0,
        per_second: 1.0,
    };
    /// All the identities of one other cluster together.
    pub const PER_OTHER_CLUSTER: Rate = Rate {
        burst: 50.0,
        per_second: 10.0,
    };
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token at `now` if there is one.
    fn take(&mut self, rate: Rate, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate.per_second;
        self.tokens = (self.tokens + refill).min(rate.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&self, rate: Rate, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate.per_second
            >= rate.burst
    }
}

/// Buckets past this many are pruned of the full ones (which hold no information).
const MAX_BUCKETS: usize = 4_096;

/// The hello rate limits of one source.
#[derive(Debug)]
pub struct HelloRate {
    own_cluster: Name,
    identity: Rate,
    cluster: Rate,
    buckets: Mutex<HashMap<(Name, Option<Name>), Bucket>>,
}

impl HelloRate {
    /// Limits for a source of `own_cluster` (whose cluster is not limited as a whole).
    pub fn new(own_cluster: Name, identity: Rate, cluster: Rate) -> HelloRate {
        HelloRate {
            own_cluster,
            identity,
            cluster,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a hello of `peer` at `now`, or says which limit it passes.
    pub fn take(&self, peer: &PeerIdentity, now: Instant) -> Result<(), String> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > MAX_BUCKETS {
            let (identity, cluster) = (self.identity, self.cluster);
            buckets.retain(|(_, name), bucket| {
                !bucket.full(if name.is_some() { identity } else { cluster }, now)
            });
        }
        let fresh = |rate: Rate| Bucket {
            tokens: rate.burst,
            at: now,
        };
        let identity_key = (peer.cluster_id.clone(), Some(peer.name.clone()));
        let identity_left = buckets
            .get(&identity_key)
            .copied()
            .unwrap_or(fresh(self.identity));
        let mut identity = identity_left;
        if !identity.take(self.identity, now) {
            buckets.insert(identity_key, identity);
            return Err(format!(
                "{peer} said hello more than {} times in a burst or {}/s: it waits",
                self.identity.burst, self.identity.per_second
            ));
        }
        if peer.cluster_id != self.own_cluster {
            let cluster_key = (peer.cluster_id.clone(), None);
            let mut cluster = buckets
                .get(&cluster_key)
                .copied()
                .unwrap_or(fresh(self.cluster));
            let taken = cluster.take(self.cluster, now);
            buckets.insert(cluster_key, cluster);
            if !taken {
                return Err(format!(
                    "the mirrors of cluster {} said hello more than {} times in a burst or {}/s: they wait",
                    peer.cluster_id, self.cluster.burst, self.cluster.per_second
                ));
            }
        }
        buckets.insert(identity_key, identity);
        Ok(())
    }
}

/// How long a measured size is shown before it is measured again.
const SIZE_FRESH_FOR: Duration = Duration::from_secs(60);

/// The store's data size (keys, bytes), measured by one thread at a time.
#[derive(Debug)]
pub struct DataSize {
    latest: watch::Sender<Option<(Instant, u64, u64)>>,
    measuring: AtomicBool,
}

impl Default for DataSize {
    fn default() -> Self {
        DataSize {
            latest: watch::Sender::new(None),
            measuring: AtomicBool::new(false),
        }
    }
}

impl DataSize {
    /// The latest size of `store`'s data; measured anew (once, whoever asks) when older
    /// than a minute. Waits only when nothing was ever measured. `None` when measuring
    /// failed: it is for progress only.
    pub async fn get(self: &Arc<Self>, store: &Arc<dyn Store>) -> Option<(u64, u64)> {
        let mut updates = self.latest.subscribe();
        let latest = *updates.borrow_and_update();
        let fresh = latest.is_some_and(|(at, _, _)| at.elapsed() < SIZE_FRESH_FOR);
        if !fresh && !self.measuring.swap(true, Ordering::AcqRel) {
            let (this, store) = (self.clone(), store.clone());
            tokio::task::spawn_blocking(move || {
                let measured = store.data_size();
                this.measuring.store(false, Ordering::Release);
                match measured {
                    Ok((keys, bytes)) => {
                        this.latest
                            .send_replace(Some((Instant::now(), keys, bytes)));
                    }
                    Err(error) => {
                        tracing::debug!(error = %error, "could not measure the data");
                        // Wakes whoever waits: they go without.
                        this.latest.send_modify(|_| {});
                    }
                }
            });
        }
        match latest {
            Some((_, keys, bytes)) => Some((keys, bytes)),
            None => {
                updates.changed().await.ok()?;
                updates.borrow().map(|(_, keys, bytes)| (keys, bytes))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(cluster: &str, name: &str) -> PeerIdentity {
        PeerIdentity {
            cluster_id: Name::new(cluster).unwrap(),
            role: xmirror_proto::Role::Observer,
            name: Name::new(name).unwrap(),
        }
    }

    #[test]
    fn hellos_are_limited_per_identity_and_per_other_cluster() {
        let rate = HelloRate::new(
            Name::new("east").unwrap(),
            Rate {
                burst: 2.0,
                per_second: 1.0,
            },
            Rate {
                burst: 3.0,
                per_second: 1.0,
            },
        );
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // One identity: a burst of two, then one a second.
        assert!(rate.take(&peer("east", "a"), at(0)).is_ok());
        assert!(rate.take(&peer("east", "a"), at(0)).is_ok());
        assert!(rate.take(&peer("east", "a"), at(0)).is_err());
        assert!(rate.take(&peer("east", "a"), at(999)).is_err());
        assert!(rate.take(&peer("east", "a"), at(2_000)).is_ok());
        // The own cluster is not limited as a whole.
        for name in ["b", "c", "d", "e"] {
            assert!(rate.take(&peer("east", name), at(0)).is_ok());
        }
        // Another cluster is: three in a burst, whoever says them.
        assert!(rate.take(&peer("west", "a"), at(0)).is_ok());
        assert!(rate.take(&peer("west", "b"), at(0)).is_ok());
        assert!(rate.take(&peer("west", "c"), at(0)).is_ok());
        let refused = rate.take(&peer("west", "d"), at(0)).unwrap_err();
        assert!(refused.contains("cluster west"), "{refused}");
        assert!(rate.take(&peer("west", "d"), at(1_000)).is_ok());
        // A refusal by the cluster does not use the identity's token.
        assert!(rate.take(&peer("west", "e"), at(1_000)).is_err());
        assert!(rate.take(&peer("west", "e"), at(2_000)).is_ok());
    }
}
