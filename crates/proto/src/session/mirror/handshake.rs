//! The hello's answer: the ack's checks, divergence and halts, the decision's
//! preparation (with its epoch policy).

use super::*;

impl MirrorSession {
    /// The source accepted the hello: check the ack against what the mirror offered and
    /// holds, then start the decision (or halt).
    pub(super) fn on_ack(&mut self, accepted: Accepted) {
        if accepted.source_cluster != self.config.source_cluster {
            return self.finish(Err(MirrorEnd::WrongCluster {
                expected: self.config.source_cluster.clone(),
                actual: accepted.source_cluster,
            }));
        }
        if accepted.compression != Compression::Off
            && !Compression::READABLE.contains(&accepted.compression)
        {
            return self.violation(SourceViolation::UnofferedCompression(accepted.compression));
        }
        let (epoch, lsn) = accepted.history.iter().fold(
            (accepted.epoch, accepted.source_last_lsn),
            |(epoch, lsn), start| (epoch.max(start.epoch), lsn.max(start.first_lsn)),
        );
        if epoch > Epoch::LIMIT || lsn > Lsn::LIMIT {
            return self.violation(SourceViolation::BeyondAnyHistory { epoch, lsn });
        }
        self.compression = accepted.compression;
        self.progress.source_lsn = accepted.source_last_lsn;
        self.source_database = Some((accepted.database_id, accepted.epoch));
        self.source_history = accepted.history.clone();
        if let Some(reason) = self.divergence(&accepted) {
            return self.halt(reason);
        }
        // A recorded halt ends only when the source vouches for the copy by
        // streaming to it, or when the operator's policy replaces the copy.
        if let Some(reason) = self.recorded_halt {
            let vouched = matches!(accepted.decision, Decision::Stream { .. });
            if !vouched && self.config.on_divergence == DivergencePolicy::Halt {
                return self.halt(reason);
            }
        }
        // The copy replays toward a state past the source's last LSN: the source lost it
        // (restored from an older backup), and the copy can never be made consistent.
        if let Some(end) = self
            .replay_end
            .filter(|end| end.lsn > accepted.source_last_lsn)
        {
            return self.abandon_replay(end.lsn, accepted.source_last_lsn);
        }
        self.progress.halt_reason = None;
        self.on_decision(accepted.decision);
    }

    /// Why the source cannot vouch for the copy this mirror holds, if it cannot. The source
    /// says so itself (`Decision::Diverged`); the mirror checks on its own too, so that no
    /// source, confused or restored from an old backup, makes a halting mirror give up its
    /// data: with a copy held, only a snapshot of the same database, from a source not
    /// behind it, for being behind the retained WAL, may replace it.
    pub(super) fn divergence(&self, accepted: &Accepted) -> Option<Divergence> {
        match accepted.decision {
            Decision::Diverged { reason } => return Some(reason),
            // Nothing is lost to a rewind: what it takes back is saved first, and the mirror
            // checks the fork on its own copy before it changes anything.
            Decision::Rewind { .. } => return None,
            _ => {}
        }
        if self.config.on_divergence == DivergencePolicy::Resnapshot {
            return None;
        }
        let (database_id, applied_lsn) = self.held_copy?;
        if accepted.database_id != database_id {
            return Some(Divergence::DatabaseMismatch);
        }
        // One epoch number promoted twice: two histories, whatever their hashes say.
        if conflicting_epoch(&self.held_history, &accepted.history).is_some() {
            return Some(Divergence::DivergedHistory);
        }
        if accepted.source_last_lsn < applied_lsn {
            return Some(Divergence::SourceBehind);
        }
        match accepted.decision {
            Decision::Snapshot { reason, .. } => match reason {
                SnapshotReason::BehindRetainedWal => None,
                SnapshotReason::AheadOfSource => Some(Divergence::SourceBehind),
                SnapshotReason::DatabaseMismatch => Some(Divergence::DatabaseMismatch),
                SnapshotReason::Unverifiable => Some(Divergence::Unverifiable),
                SnapshotReason::NewMirror
                | SnapshotReason::DivergedHistory
                | SnapshotReason::ResumeExpired => Some(Divergence::DivergedHistory),
            },
            _ => None,
        }
    }

    /// Halts: the copy is kept and served, nothing is applied. The halt is recorded in the
    /// store before the session ends, so that no restart of either side forgets it.
    /// Gives the copy up (durably), then ends the session for a fresh snapshot.
    pub(super) fn abandon_replay(&mut self, end: Lsn, source_lsn: Lsn) {
        self.queue.clear();
        self.transmit.clear();
        self.phase = Phase::Abandoning { end, source_lsn };
        self.in_flight = Some(InFlight::ReplayAbandon);
        self.actions.push_back(MirrorAction::AbandonReplay);
    }

    /// The copy is given up: the session ends, the next one takes a snapshot.
    pub(super) fn on_replay_abandoned(&mut self) {
        if self.in_flight.take() == Some(InFlight::ReplayAbandon) {
            if let Phase::Abandoning { end, source_lsn } = self.phase {
                self.finish(Err(MirrorEnd::ReplayLost { end, source_lsn }));
            }
        }
    }

    pub(super) fn halt(&mut self, reason: Divergence) {
        self.progress.state = MirrorState::Halted;
        self.progress.halt_reason = Some(reason);
        if self.recorded_halt == Some(reason) {
            return self.finish(Err(MirrorEnd::Halted(reason)));
        }
        self.queue.clear();
        self.transmit.clear();
        self.phase = Phase::Halting(reason);
        self.in_flight = Some(InFlight::HaltRecord);
        self.actions.push_back(MirrorAction::RecordHalt(reason));
    }

    pub(super) fn on_decision(&mut self, decision: Decision) {
        let preparation = match &decision {
            Decision::Stream { from_lsn } => {
                let needed = self.progress.applied_lsn.next();
                if *from_lsn != needed {
                    return self.violation(SourceViolation::StreamFromWrongLsn {
                        from: *from_lsn,
                        needed,
                    });
                }
                Preparation {
                    decision: DecisionKind::Stream,
                    log_fields: decision.log_fields(),
                    count_resume: false,
                    begin_snapshot: None,
                    history: self.source_history.clone(),
                    ends_halt: self.recorded_halt.is_some(),
                    fence: None,
                    adopt_as: None,
                }
            }
            Decision::Rewind { to_lsn, chain_hash } => {
                let applied = self.progress.applied_lsn;
                if applied <= *to_lsn || self.held_copy.is_none() {
                    return self.violation(SourceViolation::RewindNotBeyond {
                        to_lsn: *to_lsn,
                        applied,
                    });
                }
                let plan = RewindPlan {
                    to_lsn: *to_lsn,
                    chain_hash: *chain_hash,
                    source_epoch: self
                        .source_database
                        .map_or(Epoch::FIRST, |(_, epoch)| epoch),
                    log_fields: decision.log_fields(),
                };
                // What it holds beyond the fork is not the source's: no reads until rewound.
                self.progress.consistent = false;
                self.progress.state = MirrorState::CatchingUp;
                self.phase = Phase::Rewinding(Rewinding {
                    to_lsn: *to_lsn,
                    chain_hash: *chain_hash,
                    remaining: VecDeque::new(),
                    asked: Vec::new(),
                    values: Vec::new(),
                    values_bytes: 0,
                    target: None,
                });
                self.actions
                    .push_back(MirrorAction::EnterDataPhase(self.compression));
                self.actions.push_back(MirrorAction::CheckFork {
                    fence_by: plan.source_epoch,
                    fork: plan.to_lsn,
                });
                self.in_flight = Some(InFlight::ForkCheck(plan));
                return;
            }
            Decision::Snapshot {
                snapshot_id,
                base_lsn,
                base_chain_hash,
                ..
            } => {
                self.progress.snapshot = Some(SnapshotCounts::default());
                Preparation {
                    decision: DecisionKind::Snapshot,
                    log_fields: decision.log_fields(),
                    count_resume: false,
                    begin_snapshot: Some(self.snapshot_start(
                        *snapshot_id,
                        *base_lsn,
                        *base_chain_hash,
                    )),
                    history: self.source_history.clone(),
                    ends_halt: self.recorded_halt.is_some(),
                    fence: None,
                    adopt_as: None,
                }
            }
            Decision::ResumeSnapshot {
                snapshot_id,
                after_key,
                base_lsn,
                base_chain_hash,
            } => {
                let asked = self.resume.as_ref();
                let same_database = asked.map(|token| token.database_id)
                    == self.source_database.map(|(database_id, _)| database_id);
                if !same_database
                    || asked.map(|token| {
                        (
                            token.snapshot_id,
                            &token.after_key,
                            token.base_lsn,
                            token.base_chain_hash,
                        )
                    }) != Some((*snapshot_id, after_key, *base_lsn, *base_chain_hash))
                {
                    return self.violation(SourceViolation::ResumeMismatch {
                        snapshot_id: *snapshot_id,
                        after_key_len: after_key.as_ref().map_or(0, Vec::len),
                        asked: asked.map(|token| token.snapshot_id),
                    });
                }
                self.progress.snapshot = Some(SnapshotCounts::default());
                Preparation {
                    decision: DecisionKind::ResumeSnapshot,
                    log_fields: decision.log_fields(),
                    count_resume: true,
                    // Nothing applied yet (or a clear was interrupted): clear again.
                    begin_snapshot: after_key
                        .is_none()
                        .then(|| self.snapshot_start(*snapshot_id, *base_lsn, *base_chain_hash)),
                    history: self.source_history.clone(),
                    ends_halt: self.recorded_halt.is_some(),
                    fence: None,
                    adopt_as: None,
                }
            }
            Decision::Diverged { .. } => unreachable!("a divergence halts before this"),
        };
        let preparation = self.with_epoch_policy(preparation);
        if let Decision::Snapshot { base_lsn, .. } | Decision::ResumeSnapshot { base_lsn, .. } =
            &decision
        {
            // After the clear the store stands at the base: nothing beyond it was received.
            self.progress.received_lsn = *base_lsn;
        }
        self.progress.state = match decision {
            Decision::Stream { .. } => MirrorState::Connecting,
            _ => MirrorState::Snapshot,
        };
        self.phase = Phase::Preparing(decision);
        self.in_flight = Some(InFlight::Preparation);
        self.actions
            .push_back(MirrorAction::EnterDataPhase(self.compression));
        self.actions.push_back(MirrorAction::Prepare(preparation));
    }

    /// The store takes on the source's history, and its epoch; a store whose database went
    /// on in a later epoch is fenced by it.
    pub(super) fn with_epoch_policy(&self, mut preparation: Preparation) -> Preparation {
        let held = preparation
            .begin_snapshot
            .map(|start| (start.database_id, start.epoch))
            .or(self.held_database);
        if let (Some((database_id, held_epoch)), Some(last)) = (held, preparation.history.last()) {
            preparation.fence = (held_epoch < last.epoch).then_some(last.epoch);
            preparation.adopt_as = Some((database_id, last.epoch));
        }
        preparation
    }

    pub(super) fn snapshot_start(
        &self,
        snapshot_id: SnapshotId,
        base_lsn: Lsn,
        base_chain_hash: ChainHash,
    ) -> SnapshotStart {
        let (database_id, epoch) = self
            .source_database
            .expect("a decision comes with the source's database");
        SnapshotStart {
            snapshot_id,
            base_lsn,
            base_chain_hash,
            database_id,
            epoch,
        }
    }

    pub(super) fn on_prepared(&mut self) {
        if self.in_flight.take() != Some(InFlight::Preparation) {
            return;
        }
        let Phase::Preparing(decision) = &self.phase else {
            return;
        };
        self.phase = match decision {
            Decision::Stream { .. } | Decision::Diverged { .. } | Decision::Rewind { .. } => {
                Phase::Replicating
            }
            Decision::Snapshot {
                snapshot_id,
                base_lsn,
                ..
            }
            | Decision::ResumeSnapshot {
                snapshot_id,
                base_lsn,
                ..
            } => {
                // The store now holds (part of) the snapshot at its base, not what it held.
                self.progress.applied_lsn = *base_lsn;
                self.progress.consistent = false;
                Phase::Snapshot {
                    snapshot_id: *snapshot_id,
                    chunks_applied: 0,
                }
            }
        };
        if self.phase == Phase::Replicating {
            self.progress.state = self.replicating_state();
        }
    }

    /// The halt is recorded: the session ends with it.
    pub(super) fn on_halt_recorded(&mut self) {
        if self.in_flight.take() == Some(InFlight::HaltRecord) {
            if let Phase::Halting(reason) = self.phase {
                self.recorded_halt = Some(reason);
                self.finish(Err(MirrorEnd::Halted(reason)));
            }
        }
    }
}
