//! A snapshot's chunks: grouped, applied, acknowledged; the scan's end.

use super::*;

impl MirrorSession {
    pub(super) fn apply_chunks(&mut self, first: SnapshotChunk) {
        let snapshot_id = first.snapshot_id;
        if !matches!(self.phase, Phase::Snapshot { snapshot_id: receiving, .. } if receiving == snapshot_id)
        {
            return self.violation(SourceViolation::OutsideSnapshot {
                message_type: MessageType::SnapshotChunk,
                snapshot_id,
            });
        }
        let mut bytes = first.payload_len();
        let mut chunks = vec![first];
        chunks.extend(self.take_run(
            &mut bytes,
            |message| matches!(message, Message::SnapshotChunk(next) if next.snapshot_id == snapshot_id),
            |message| match message {
                Message::SnapshotChunk(chunk) => Some(chunk),
                _ => None,
            },
            SnapshotChunk::payload_len,
        ));
        let keys = chunks.iter().map(|chunk| chunk.pairs.len() as u64).sum();
        self.in_flight = Some(InFlight::Chunks {
            count: chunks.len() as u64,
            keys,
            bytes: bytes as u64,
        });
        self.actions.push_back(MirrorAction::ApplyChunks {
            snapshot_id,
            chunks,
        });
    }

    /// [`MirrorAction::ApplyChunks`] is durable: acknowledge the chunks.
    pub(super) fn on_chunks_applied(&mut self) {
        if let (
            Some(InFlight::Chunks { count, keys, bytes }),
            Phase::Snapshot {
                snapshot_id,
                chunks_applied,
            },
        ) = (self.in_flight.take(), &mut self.phase)
        {
            *chunks_applied += count;
            if let Some(counts) = &mut self.progress.snapshot {
                counts.keys += keys;
                counts.bytes += bytes;
            }
            let ack = SnapshotChunkAck {
                snapshot_id: *snapshot_id,
                chunks_applied: *chunks_applied,
            };
            self.transmit.push_back(Outgoing::Message(ack.into()));
        }
    }

    /// [`MirrorAction::FinishScan`] is durable: the WAL follows.
    pub(super) fn on_scan_finished(&mut self, applied_lsn: Lsn, consistent: bool) {
        if self.in_flight.take() == Some(InFlight::Scan) {
            self.progress.snapshot = None;
            self.phase = Phase::Replicating;
            self.applied(applied_lsn, consistent);
            self.acknowledge();
        }
    }
}
