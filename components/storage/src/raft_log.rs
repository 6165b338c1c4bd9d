//! The node's Raft log store: one raft-engine instance for every shard.
//!
//! Each shard is a raft-engine group (group id = shard id) holding
//!
//! - its entries, encoded as raft-rs `eraftpb::Entry` (rust-protobuf), and
//! - one key-value record, key `b"rs"`, the [`RaftLocalState`]:
//!
//! ```text
//! byte 0        format version (1)
//! bytes 1..9    hard state term,   u64 big-endian
//! bytes 9..17   hard state vote,   u64 big-endian
//! bytes 17..25  hard state commit, u64 big-endian
//! bytes 25..33  last index,        u64 big-endian
//! bytes 33..41  term of the entry at the last index, u64 big-endian
//! ```
//!
//! The last index and its term are recorded because raft-engine forgets a
//! group's indexes once every entry is compacted away, and so that a restart
//! reads no entry to recover a replica.
//! - while a snapshot is being installed, key `b"ps"`: a prost
//!   `local.PendingSnapshot` (see `ReplicaStorage::apply_snapshot`).

use std::path::Path;
use std::sync::Arc;

use flotilla_proto::local::PendingSnapshot;
use flotilla_proto::Message as _;
use raft::eraftpb::{Entry, HardState};
use raft_engine::{Engine, LogBatch, MessageExt, ReadableSize};

use crate::{metrics, Error, Index, Result, ShardId};

/// Tells raft-engine how to index raft-rs entries.
#[derive(Clone, Copy, Debug)]
pub struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

pub const RAFT_STATE_KEY: &[u8] = b"rs";
pub const PENDING_SNAPSHOT_KEY: &[u8] = b"ps";
const RAFT_STATE_VERSION: u8 = 1;
const RAFT_STATE_LEN: usize = 41;

/// What a replica must remember of its Raft group across restarts, besides
/// the entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RaftLocalState {
    pub hard_state: HardState,
    pub last_index: Index,
    pub last_term: crate::Term,
}

impl RaftLocalState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(RAFT_STATE_LEN);
        v.push(RAFT_STATE_VERSION);
        v.extend_from_slice(&self.hard_state.term.to_be_bytes());
        v.extend_from_slice(&self.hard_state.vote.to_be_bytes());
        v.extend_from_slice(&self.hard_state.commit.to_be_bytes());
        v.extend_from_slice(&self.last_index.to_be_bytes());
        v.extend_from_slice(&self.last_term.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != RAFT_STATE_LEN || b[0] != RAFT_STATE_VERSION {
            return Err(Error::Corruption {
                what: "raft local state".into(),
                detail: format!("{} bytes, version {:?}", b.len(), b.first()),
            });
        }
        let u = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
        Ok(RaftLocalState {
            hard_state: HardState {
                term: u(1),
                vote: u(9),
                commit: u(17),
                ..Default::default()
            },
            last_index: u(25),
            last_term: u(33),
        })
    }
}

/// raft-engine options exposed in the node configuration.
#[derive(Clone, Debug)]
pub struct RaftLogConfig {
    /// Bytes after which a log file is rotated.
    pub target_file_size: u64,
    /// Total log size past which `purge_expired_files` rewrites old files.
    /// Below it raft-engine purges nothing, not even fully compacted
    /// files, so this is the size the directory grows to: live files up to
    /// it plus recycled files up to 1.5 times it. TiKV's 10 GiB suits large
    /// disks; Flotilla's default of 256 MiB keeps the directory under about
    /// 700 MiB on small machines at the cost of more frequent rewrites of
    /// entries that lagging shards still hold.
    pub purge_threshold: u64,
    /// Batches larger than this are lz4-compressed, in bytes (0 = never).
    pub batch_compression_threshold: u64,
    /// Reuse purged files instead of creating new ones.
    pub enable_log_recycle: bool,
    /// Log files (in bytes of them, 0 = none) written full of zeros when the
    /// engine is first created, for appends to reuse as recycled files.
    /// Appending into a fresh file writes into fallocated, unwritten
    /// extents: every fdatasync then also writes the inode's extent changes
    /// (a second, synchronous I/O). A prefilled file has written extents,
    /// so a sync writes data only; recycled files behave the same once
    /// purging starts, prefilling gives a new node that from the first
    /// write. Needs `enable_log_recycle`; costs the bytes on disk and the
    /// time to write them at first start.
    pub prefill_bytes: u64,
}

impl Default for RaftLogConfig {
    fn default() -> Self {
        RaftLogConfig {
            target_file_size: 32 << 20,
            purge_threshold: 256 << 20,
            batch_compression_threshold: 8 << 10,
            enable_log_recycle: true,
            prefill_bytes: 0,
        }
    }
}

/// The node's raft-engine, shared by every replica and the raft pollers.
pub struct RaftLogEngine {
    engine: Engine,
}

impl RaftLogEngine {
    /// Opens (recovering) or creates the log store in `dir`. Recovery
    /// tolerates a torn tail (a crash in the middle of a write).
    pub fn open(dir: &Path, cfg: &RaftLogConfig) -> Result<Arc<Self>> {
        let prefill = cfg.enable_log_recycle && cfg.prefill_bytes > 0;
        let ecfg = raft_engine::Config {
            dir: dir.to_string_lossy().into_owned(),
            recovery_mode: raft_engine::RecoveryMode::TolerateTailCorruption,
            target_file_size: ReadableSize(cfg.target_file_size),
            purge_threshold: ReadableSize(cfg.purge_threshold),
            batch_compression_threshold: ReadableSize(cfg.batch_compression_threshold),
            enable_log_recycle: cfg.enable_log_recycle,
            prefill_for_recycle: prefill,
            // raft-engine prepares 1.5 times the limit.
            prefill_limit: prefill
                .then(|| ReadableSize((cfg.prefill_bytes * 2 / 3).max(cfg.target_file_size))),
            format_version: raft_engine::Version::V2,
            ..Default::default()
        };
        let engine = Engine::open(ecfg)?;
        Ok(Arc::new(RaftLogEngine { engine }))
    }

    /// Writes a batch; with `sync` it is on disk when this returns. A failed
    /// fsync panics inside raft-engine (the node must not go on).
    pub fn write(&self, batch: &mut LogBatch, sync: bool) -> Result<usize> {
        let start = std::time::Instant::now();
        let bytes = self.engine.write(batch, sync)?;
        if metrics::detailed() {
            metrics::RAFT_LOG_WRITE_DURATION.observe(start.elapsed().as_secs_f64());
            metrics::RAFT_LOG_WRITE_BYTES.observe(bytes as f64);
        }
        metrics::RAFT_LOG_WRITES.inc();
        if sync {
            metrics::RAFT_LOG_SYNCED_WRITES.inc();
        }
        Ok(bytes)
    }

    pub fn raft_state(&self, shard_id: ShardId) -> Result<Option<RaftLocalState>> {
        match self.engine.get(shard_id, RAFT_STATE_KEY) {
            Some(v) => Ok(Some(RaftLocalState::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Stages a raft state record into `batch`.
    pub fn put_raft_state(batch: &mut LogBatch, shard_id: ShardId, state: &RaftLocalState) {
        batch
            .put(shard_id, RAFT_STATE_KEY.to_vec(), state.encode())
            .expect("raft state key is not an internal key");
    }

    pub fn pending_snapshot(&self, shard_id: ShardId) -> Result<Option<PendingSnapshot>> {
        match self.engine.get(shard_id, PENDING_SNAPSHOT_KEY) {
            Some(v) => Ok(Some(PendingSnapshot::decode(&v[..])?)),
            None => Ok(None),
        }
    }

    pub fn put_pending_snapshot(batch: &mut LogBatch, shard_id: ShardId, p: &PendingSnapshot) {
        batch
            .put(shard_id, PENDING_SNAPSHOT_KEY.to_vec(), p.encode_to_vec())
            .expect("pending snapshot key is not an internal key");
    }

    pub fn delete_pending_snapshot(batch: &mut LogBatch, shard_id: ShardId) {
        batch.delete(shard_id, PENDING_SNAPSHOT_KEY.to_vec());
    }

    /// Stages the removal of every entry below `index`.
    pub fn compact_to(batch: &mut LogBatch, shard_id: ShardId, index: Index) {
        batch.add_command(shard_id, raft_engine::Command::Compact { index });
    }

    /// Stages `entries` (contiguous, may overwrite the tail) into `batch`.
    pub fn append_entries(batch: &mut LogBatch, shard_id: ShardId, entries: &[Entry]) {
        batch
            .add_entries::<EntryExt>(shard_id, entries)
            .expect("entries fit in one log batch");
    }

    /// Appends entries `[low, high)` to `out`, stopping once `max_size` bytes
    /// are gathered (always at least one entry). Returns how many were read.
    pub fn fetch_entries(
        &self,
        shard_id: ShardId,
        low: Index,
        high: Index,
        max_size: Option<usize>,
        out: &mut Vec<Entry>,
    ) -> Result<usize> {
        Ok(self
            .engine
            .fetch_entries_to::<EntryExt>(shard_id, low, high, max_size, out)?)
    }

    pub fn entry(&self, shard_id: ShardId, index: Index) -> Result<Option<Entry>> {
        Ok(self.engine.get_entry::<EntryExt>(shard_id, index)?)
    }

    pub fn first_index(&self, shard_id: ShardId) -> Option<Index> {
        self.engine.first_index(shard_id)
    }

    pub fn last_index(&self, shard_id: ShardId) -> Option<Index> {
        self.engine.last_index(shard_id)
    }

    /// Every group with a record in the engine.
    pub fn groups(&self) -> Vec<ShardId> {
        self.engine.raft_groups()
    }

    /// Bytes of log files on disk.
    pub fn used_size(&self) -> usize {
        self.engine.get_used_size()
    }

    /// Rewrites or deletes log files no group needs; returns the groups
    /// whose old entries keep files alive (their logs should be compacted).
    pub fn purge_expired_files(&self) -> Result<Vec<ShardId>> {
        Ok(self.engine.purge_expired_files()?)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_state_round_trips() {
        let s = RaftLocalState {
            hard_state: HardState {
                term: 7,
                vote: 3,
                commit: 42,
                ..Default::default()
            },
            last_index: 99,
            last_term: 6,
        };
        let b = s.encode();
        assert_eq!(b.len(), RAFT_STATE_LEN);
        assert_eq!(RaftLocalState::decode(&b).unwrap(), s);
        assert!(RaftLocalState::decode(&b[..10]).is_err());
    }
}
