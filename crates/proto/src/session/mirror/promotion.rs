//! A planned promotion: the source fenced for it, its final LSN applied, then the end.

use super::*;

impl MirrorSession {
    /// Whether a planned promotion is under way (the source was asked to fence itself).
    pub fn is_promoting(&self) -> bool {
        self.promotion.is_some()
    }

    /// The operator asked for a planned promotion: ask the source to fence itself.
    pub(super) fn on_promote(&mut self, epoch: Epoch, epoch_id: EpochId) {
        if self.phase == Phase::Replicating && self.promotion.is_none() {
            self.promotion = Some((epoch, epoch_id, None));
            let fence = FenceRequest {
                epoch: Some(epoch),
                epoch_id: Some(epoch_id),
            };
            self.transmit.push_back(Outgoing::Message(fence.into()));
        }
    }

    /// The source answered the fence: for this very promotion, its final LSN.
    pub(super) fn on_fence_reply(&mut self, reply: &FenceReply) {
        if let Some((epoch, epoch_id, source_last_lsn)) = &mut self.promotion {
            // Fenced for this very promotion: the source answers no other.
            if reply.fenced_by == *epoch && reply.epoch_id == Some(*epoch_id) {
                *source_last_lsn = Some(reply.last_lsn);
                self.progress.fenced_source_lsn = Some(reply.last_lsn);
                self.progress.source_lsn = self.progress.source_lsn.max(reply.last_lsn);
                return self.check_promotion();
            }
        }
        self.violation(SourceViolation::NotForMirror(MessageType::FenceReply))
    }

    /// Ends the session for the promotion once the fenced source's last LSN is applied.
    pub(super) fn check_promotion(&mut self) {
        if let Some((_, _, Some(source_last_lsn))) = self.promotion {
            if self.progress.applied_lsn >= source_last_lsn && self.in_flight.is_none() {
                self.finish(Err(MirrorEnd::Promoting { source_last_lsn }));
            }
        }
    }
}
