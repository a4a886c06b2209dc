//! A deterministic simulation of xmirror's replication.
//!
//! One seed drives a whole world: sources and mirrors, each its real session machines
//! (`xmirror_proto::session`) and its real store (redb, in a directory of its own), doing
//! the real store work (`xmirror_source::work`, `xmirror_mirror::session::perform`), joined
//! by simulated connections that deliver in order, stall, partition and drop, under one
//! simulated clock. Operations drawn from the seed (client writes, crashes and restarts,
//! restores of a directory from an earlier copy, partitions, planned and forced promotion,
//! failback, a mirror pointed at another source, slot drops, operator fences) run between
//! steps; the checkers in [`check`] judge every step and the end against the spec's
//! promises. Nothing reads the wall clock or a thread's timing: the same seed gives the
//! same trace on any machine.
//!
//! What stays outside: the async drivers, QUIC and the operating system (a crash here is a
//! process crash, the page cache survives it), which keep their end-to-end and fault tests.

pub mod check;
pub mod disk;
pub mod world;

pub use check::Violation;
pub use world::{Options, Outcome, World};

/// Runs the world of `seed` to its end and judges it.
pub fn run(seed: u64, options: &Options) -> Outcome {
    World::new(seed, options.clone()).run()
}
