//! Installing a received snapshot, and finishing an install that a crash
//! interrupted.
//!
//! The order makes every crash point recoverable:
//!
//! 1. (raft poller, one synced raft-engine batch) the old log is compacted
//!    away, the raft state moves to the snapshot, and a `PendingSnapshot`
//!    record is written; the received file is already durable;
//! 2. (apply poller) the shard's range is cleared in RocksDB;
//! 3. the file is ingested (hard-linked; the received file stays);
//! 4. the apply state (applied = truncated = snapshot index) and the shard
//!    state (the snapshot's descriptor) are written in one synced batch;
//! 5. the pending record and the received file are removed.
//!
//! A restart that finds a pending record with an index above the applied
//! index repeats 2-5 (each step can be repeated); one at or below it only
//! repeats 5.

use flotilla_proto::local::{ApplyState, ShardLocalState, ShardState, SnapshotData};
use flotilla_storage::{KvEngine, RaftLogEngine, SnapManager};
use raft_engine::LogBatch;
use rocksdb::WriteBatch;

use crate::{Error, Index, ReplicaId, Result, ShardId, Term};

/// Steps 2-4: replaces the shard's data and apply state with the snapshot's.
pub fn install(
    kv: &KvEngine,
    snap_mgr: &SnapManager,
    replica_id: ReplicaId,
    index: Index,
    term: Term,
    data: &SnapshotData,
) -> Result<()> {
    let shard = data
        .shard
        .clone()
        .ok_or_else(|| Error::Storage("snapshot without a shard descriptor".into()))?;
    let path = snap_mgr.recv_path(shard.id, term, index);
    if data.file_size > 0 {
        // Check before anything is deleted.
        snap_mgr.verify(&path, data)?;
    }
    let cf = flotilla_storage::data_cf(shard.id);
    let mut wb = WriteBatch::default();
    kv.delete_range(&mut wb, cf, &shard.start_key, &shard.end_key)?;
    kv.write(wb, false)?;
    fail::fail_point!("snapshot_after_clear");
    if data.file_size > 0 {
        kv.ingest(cf, &path)?;
    }
    fail::fail_point!("snapshot_after_ingest");
    let mut wb = WriteBatch::default();
    kv.put_apply_state(
        &mut wb,
        shard.id,
        &ApplyState {
            applied_index: index,
            applied_term: term,
            truncated_index: index,
            truncated_term: term,
        },
    );
    kv.put_shard_state(
        &mut wb,
        shard.id,
        &ShardLocalState {
            shard: Some(shard.clone()),
            state: ShardState::Normal as i32,
            replica_id,
        },
    );
    kv.write(wb, true)?;
    Ok(())
}

/// Removes a replica that left its shard: a tombstone record (so late
/// messages addressed to it do not recreate it), its data (when it had any)
/// and its raft log.
pub fn destroy_replica(
    kv: &KvEngine,
    raft: &RaftLogEngine,
    shard: &flotilla_proto::meta::ShardDescriptor,
    replica_id: ReplicaId,
    initialized: bool,
) -> Result<()> {
    let mut wb = WriteBatch::default();
    if initialized {
        let cf = flotilla_storage::data_cf(shard.id);
        kv.delete_range(&mut wb, cf, &shard.start_key, &shard.end_key)?;
    }
    kv.put_shard_state(
        &mut wb,
        shard.id,
        &ShardLocalState {
            shard: Some(shard.clone()),
            state: ShardState::Tombstone as i32,
            replica_id,
        },
    );
    kv.delete_apply_state(&mut wb, shard.id);
    kv.write(wb, true)?;
    let mut lb = LogBatch::default();
    lb.add_command(shard.id, raft_engine::Command::Clean);
    raft.write(&mut lb, true)?;
    Ok(())
}

/// Step 5.
pub fn cleanup(
    raft: &RaftLogEngine,
    snap_mgr: &SnapManager,
    shard_id: ShardId,
    index: Index,
    term: Term,
) -> Result<()> {
    let mut lb = LogBatch::default();
    RaftLogEngine::delete_pending_snapshot(&mut lb, shard_id);
    raft.write(&mut lb, false)?;
    let _ = std::fs::remove_file(snap_mgr.recv_path(shard_id, term, index));
    Ok(())
}

/// At start-up: finishes an install a crash interrupted. Returns whether
/// the shard's state on disk changed (reload it).
pub fn recover(
    kv: &KvEngine,
    raft: &RaftLogEngine,
    snap_mgr: &SnapManager,
    shard_id: ShardId,
    replica_id: ReplicaId,
    applied_index: Index,
) -> Result<bool> {
    let Some(p) = raft.pending_snapshot(shard_id)? else {
        return Ok(false);
    };
    let data = p.data.unwrap_or_default();
    let redo = p.index > applied_index;
    if redo {
        tracing::info!(
            shard_id,
            index = p.index,
            applied_index,
            "finishing a snapshot install interrupted by a restart"
        );
        install(kv, snap_mgr, replica_id, p.index, p.term, &data)?;
    }
    cleanup(raft, snap_mgr, shard_id, p.index, p.term)?;
    Ok(redo)
}
