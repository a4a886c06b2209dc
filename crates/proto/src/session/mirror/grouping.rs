//! Queued frames to store work: runs of chunks or of contiguous WAL batches applied as
//! one bounded group, one at a time, acknowledged once durable.

use super::*;

impl MirrorSession {
    /// Starts the next store work from the queue, handling the frames that need none.
    pub(super) fn pump(&mut self) {
        while self.in_flight.is_none() && self.end.is_none() {
            let Some(message) = self.queue.pop_front() else {
                return;
            };
            match message {
                Message::SnapshotChunk(chunk) => self.apply_chunks(chunk),
                Message::SnapshotSize(size) => match (&self.phase, &mut self.progress.snapshot) {
                    (Phase::Snapshot { snapshot_id, .. }, Some(counts))
                        if *snapshot_id == size.snapshot_id =>
                    {
                        counts.total = Some((size.keys, size.bytes));
                    }
                    _ => self.violation(SourceViolation::OutsideSnapshot {
                        message_type: MessageType::SnapshotSize,
                        snapshot_id: size.snapshot_id,
                    }),
                },
                Message::SnapshotDone(done) => match self.phase {
                    Phase::Snapshot { snapshot_id, .. } if snapshot_id == done.snapshot_id => {
                        self.in_flight = Some(InFlight::Scan);
                        self.actions.push_back(MirrorAction::FinishScan {
                            snapshot_id: done.snapshot_id,
                            end_lsn: done.end_lsn,
                            end_chain_hash: done.end_chain_hash,
                        });
                        self.progress.source_lsn = self.progress.source_lsn.max(done.end_lsn);
                    }
                    _ => self.violation(SourceViolation::OutsideSnapshot {
                        message_type: MessageType::SnapshotDone,
                        snapshot_id: done.snapshot_id,
                    }),
                },
                Message::WalBatch(batch) => self.apply_batches(batch),
                Message::Heartbeat(heartbeat) => {
                    self.progress.source_lsn = self.progress.source_lsn.max(heartbeat.last_lsn);
                    self.progress.source_commit_time = Some(heartbeat.commit_time);
                    if self.phase == Phase::Replicating {
                        self.progress.state = self.replicating_state();
                    }
                    self.acknowledge();
                }
                other => self.violation(SourceViolation::NotForMirror(other.message_type())),
            }
        }
    }

    /// Pops the queued frames that `joins` accepts as continuing a group (as `T`, by
    /// `take`), while the group's payload (`bytes`, counted with `len`) stays under
    /// `max_group_bytes`: the one grouping rule for snapshot chunks and WAL batches alike.
    pub(super) fn take_run<T>(
        &mut self,
        bytes: &mut usize,
        mut joins: impl FnMut(&Message) -> bool,
        take: impl Fn(Message) -> Option<T>,
        len: impl Fn(&T) -> usize,
    ) -> Vec<T> {
        let mut run = Vec::new();
        while *bytes < self.config.max_group_bytes && self.queue.front().is_some_and(&mut joins) {
            let Some(item) = self.queue.pop_front().and_then(&take) else {
                break;
            };
            *bytes += len(&item);
            run.push(item);
        }
        run
    }

    pub(super) fn apply_batches(&mut self, first: WalBatch) {
        if self.phase != Phase::Replicating {
            return self.violation(SourceViolation::WalDuringSnapshot(first.first_lsn));
        }
        let mut bytes = entries_len(&first.entries);
        let mut next_lsn = first.last_lsn().next();
        let mut group = WalGroup {
            first_lsn: first.first_lsn,
            entries: first.entries,
            commit_time: first.commit_time,
            chain_hash: first.chain_hash,
        };
        // Only a batch that continues the group joins it; anything else is applied on its
        // own, where the store refuses a gap.
        let following = self.take_run(
            &mut bytes,
            |message| match message {
                Message::WalBatch(next) if next.first_lsn == next_lsn => {
                    next_lsn = next.last_lsn().next();
                    true
                }
                _ => false,
            },
            |message| match message {
                Message::WalBatch(batch) => Some(batch),
                _ => None,
            },
            |batch| entries_len(&batch.entries),
        );
        for batch in following {
            group.entries.extend(batch.entries);
            group.commit_time = batch.commit_time;
            group.chain_hash = batch.chain_hash;
        }
        self.in_flight = Some(InFlight::Batches {
            last_lsn: group.last_lsn(),
            commit_time: group.commit_time,
        });
        self.actions.push_back(MirrorAction::ApplyBatches(group));
    }

    /// [`MirrorAction::ApplyBatches`] is durable: acknowledge it.
    pub(super) fn on_batches_applied(&mut self, applied_lsn: Lsn, consistent: bool) {
        if let Some(InFlight::Batches {
            last_lsn,
            commit_time,
        }) = self.in_flight.take()
        {
            self.progress.applied_commit_time = Some(commit_time);
            self.progress.source_lsn = self.progress.source_lsn.max(last_lsn);
            self.applied(applied_lsn, consistent);
            self.acknowledge();
            self.check_promotion();
        }
    }

    pub(super) fn applied(&mut self, applied_lsn: Lsn, consistent: bool) {
        self.progress.applied_lsn = applied_lsn;
        self.progress.consistent = consistent;
        self.progress.state = self.replicating_state();
    }

    /// Acknowledges what is durable, never beyond what was received.
    pub(super) fn acknowledge(&mut self) {
        let received = self.progress.received_lsn;
        let durable = self.progress.applied_lsn.min(received);
        let ack = MirrorAck {
            received,
            durable,
            // Everything applied is flushed first, so applied and durable coincide.
            applied: durable,
        };
        self.transmit.push_back(Outgoing::Message(ack.into()));
    }

    /// `streaming` once the applied LSN reaches the source's last known one, `catching_up`
    /// before: the one place that rule is written.
    pub(super) fn replicating_state(&self) -> MirrorState {
        if self.progress.applied_lsn >= self.progress.source_lsn {
            MirrorState::Streaming
        } else {
            MirrorState::CatchingUp
        }
    }
}
