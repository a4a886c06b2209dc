//! A failback's rewind: the fork checked on the node's own copy, what is rewound saved,
//! the source's values fetched in bounded requests and applied in bounded steps.

use super::*;

impl MirrorSession {
    /// The store's chain hash at the fork, read after fencing it.
    pub(super) fn on_fork_read(&mut self, held: Option<ChainHash>) {
        let Some(InFlight::ForkCheck(plan)) = self.in_flight.take() else {
            return;
        };
        // The node's own chain hash at the fork must be the source's: else the
        // histories parted earlier, and nothing it holds can be rewound to it.
        match held {
            Some(hash) if hash == plan.chain_hash => {
                self.in_flight = Some(InFlight::RewindPreparation);
                self.actions.push_back(MirrorAction::PrepareRewind(plan));
            }
            Some(_) | None => self.halt(Divergence::DivergedHistory),
        }
    }

    /// What the rewound entries touched is saved, or the rewind cannot be made.
    pub(super) fn on_rewind_prepared(&mut self, result: Result<Vec<Vec<u8>>, RewindImpossible>) {
        if self.in_flight != Some(InFlight::RewindPreparation) {
            return;
        }
        self.in_flight = None;
        match result {
            Ok(keys) => {
                if let Phase::Rewinding(rewinding) = &mut self.phase {
                    rewinding.remaining = keys.into();
                }
                self.ask_rewind_values();
            }
            Err(_) => self.halt(Divergence::DivergedHistory),
        }
    }

    /// The rewind is applied: the source streams from the fork.
    pub(super) fn on_rewind_applied(&mut self) {
        if self.in_flight.take() != Some(InFlight::RewindApplication) {
            return;
        }
        let Phase::Rewinding(rewinding) = &self.phase else {
            return;
        };
        let to_lsn = rewinding.to_lsn;
        self.phase = Phase::Replicating;
        self.progress.received_lsn = to_lsn;
        self.applied(to_lsn, false);
        // No key left to ask for: the source streams from the fork.
        let done = RewindRequest { keys: Vec::new() };
        self.transmit.push_back(Outgoing::Message(done.into()));
    }

    /// A step of fetched values is durable: ask for the next keys.
    pub(super) fn on_rewind_values_applied(&mut self) {
        if self.in_flight.take() == Some(InFlight::RewindStep) {
            self.ask_rewind_values();
        }
    }

    /// Asks for the next keys' values, or applies the rewind once every key has one.
    pub(super) fn ask_rewind_values(&mut self) {
        let Phase::Rewinding(rewinding) = &mut self.phase else {
            return;
        };
        if rewinding.remaining.is_empty() {
            let Some(target) = rewinding.target else {
                // Nothing to ask for: the fork itself is the target.
                let target = (rewinding.to_lsn, rewinding.chain_hash);
                rewinding.target = Some(target);
                return self.ask_rewind_values();
            };
            let (database_id, epoch) = self
                .source_database
                .expect("a decision comes with the source's database");
            let apply = RewindApply {
                to_lsn: rewinding.to_lsn,
                chain_hash: rewinding.chain_hash,
                values: std::mem::take(&mut rewinding.values),
                target,
                database_id,
                epoch,
                history: self.source_history.clone(),
                record: DecisionKind::Rewind,
            };
            self.in_flight = Some(InFlight::RewindApplication);
            self.actions.push_back(MirrorAction::ApplyRewind(apply));
            return;
        }
        if rewinding.values_bytes >= REWIND_STEP_BYTES {
            let values = std::mem::take(&mut rewinding.values);
            rewinding.values_bytes = 0;
            self.in_flight = Some(InFlight::RewindStep);
            self.actions
                .push_back(MirrorAction::ApplyRewindValues(values));
            return;
        }
        let mut bytes = 0;
        let mut keys = Vec::new();
        while let Some(key) = rewinding.remaining.front() {
            if !keys.is_empty() && bytes + key.len() > REWIND_REQUEST_KEY_BYTES {
                break;
            }
            bytes += key.len();
            keys.extend(rewinding.remaining.pop_front());
        }
        rewinding.asked = keys.clone();
        self.transmit
            .push_back(Outgoing::Message(RewindRequest { keys }.into()));
    }

    /// Values for a prefix of the keys asked: kept, and the rest asked again.
    pub(super) fn on_rewind_values(&mut self, values: RewindValues) {
        let Phase::Rewinding(rewinding) = &mut self.phase else {
            return self.violation(SourceViolation::RewindValuesNotAsked);
        };
        let answered = values.values.len();
        let is_prefix = answered > 0
            && answered <= rewinding.asked.len()
            && values
                .values
                .iter()
                .zip(&rewinding.asked)
                .all(|((key, _), asked)| key == asked);
        if !is_prefix {
            return self.violation(SourceViolation::RewindValuesNotAsked);
        }
        for key in rewinding.asked.drain(answered..).rev() {
            rewinding.remaining.push_front(key);
        }
        rewinding.asked.clear();
        rewinding.values_bytes += values
            .values
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
            .sum::<usize>();
        rewinding.values.extend(values.values);
        if rewinding.target.is_none_or(|(lsn, _)| values.lsn > lsn) {
            rewinding.target = Some((values.lsn, values.chain_hash));
        }
        self.progress.source_lsn = self.progress.source_lsn.max(values.lsn);
        self.ask_rewind_values();
    }
}
