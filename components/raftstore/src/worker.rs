//! Background workers of a node, off the poller threads:
//!
//! - [`SnapWorker`]: a small pool that builds snapshot files and hashes
//!   shards from RocksDB snapshots taken by the apply pollers. A slow
//!   snapshot never holds up a poll round.
//! - [`GcWorker`]: one thread that deletes compacted Raft log entries from
//!   raft-engine, in batches, after forcing RocksDB's WAL to disk (entries
//!   applied without sync must be durable before the log that could replay
//!   them goes), and that periodically purges raft-engine files, asking the
//!   shards that keep old files alive to compact, and deletes leftover
//!   snapshot files.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use flotilla_proto::local::ApplyState;
use flotilla_proto::meta::ShardDescriptor;
use flotilla_storage::replica_storage::{conf_state_of, GeneratedSnapshot};
use flotilla_storage::snap::hash_shard;
use flotilla_storage::{KvEngine, KvSnapshot, RaftLogEngine, SnapManager};
use raft_engine::LogBatch;

use crate::meta::StoreMeta;
use crate::msg::ReplicaMsg;
use crate::replica::poller::RaftRouter;
use crate::{metrics, Index, ShardId};

pub enum SnapJob {
    /// Build the snapshot of `shard` at `apply_state` from `snap`.
    Generate {
        shard: ShardDescriptor,
        apply_state: ApplyState,
        snap: KvSnapshot,
    },
    /// Hash the shard's range as of log index `index`.
    Hash {
        shard: ShardDescriptor,
        index: Index,
        snap: KvSnapshot,
    },
}

pub struct SnapWorker {
    tx: Option<Sender<SnapJob>>,
    handles: Vec<JoinHandle<()>>,
}

impl SnapWorker {
    pub fn start(
        threads: usize,
        mgr: Arc<SnapManager>,
        router: RaftRouter,
        meta: Arc<StoreMeta>,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<SnapJob>();
        let handles = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                let mgr = mgr.clone();
                let router = router.clone();
                let meta = meta.clone();
                std::thread::Builder::new()
                    .name(format!("snap-worker-{i}"))
                    .spawn(move || {
                        for job in rx {
                            run_snap_job(job, &mgr, &router, &meta);
                        }
                    })
                    .expect("spawn snapshot worker")
            })
            .collect();
        SnapWorker {
            tx: Some(tx),
            handles,
        }
    }

    pub fn sender(&self) -> Sender<SnapJob> {
        self.tx.clone().expect("worker running")
    }

    pub fn stop(&mut self) {
        self.tx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn run_snap_job(job: SnapJob, mgr: &SnapManager, router: &RaftRouter, meta: &StoreMeta) {
    match job {
        SnapJob::Generate {
            shard,
            apply_state,
            snap,
        } => {
            let started = Instant::now();
            let (index, term) = (apply_state.applied_index, apply_state.applied_term);
            let result = mgr.build(&snap, &shard, term, index);
            drop(snap);
            let generated = match result {
                Ok(data) => {
                    let keep = mgr.gen_path(shard.id, term, index);
                    mgr.remove_others("gen", shard.id, Some(&keep));
                    metrics::SNAPSHOTS.with_label_values(&["generated"]).inc();
                    metrics::SNAPSHOT_DURATION
                        .with_label_values(&["generate"])
                        .observe(started.elapsed().as_secs_f64());
                    tracing::info!(
                        shard_id = shard.id,
                        index,
                        term,
                        keys = data.keys,
                        bytes = data.file_size,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "snapshot generated"
                    );
                    Some(Box::new(GeneratedSnapshot {
                        index,
                        term,
                        conf_state: conf_state_of(&shard),
                        data,
                        generated_at: Instant::now(),
                    }))
                }
                Err(e) => {
                    metrics::SNAPSHOTS
                        .with_label_values(&["generate_failed"])
                        .inc();
                    tracing::error!(shard_id = shard.id, index, error = %e, "building a snapshot failed");
                    None
                }
            };
            let _ = router.force_send(shard.id, ReplicaMsg::SnapshotGenerated(generated));
        }
        SnapJob::Hash { shard, index, snap } => match hash_shard(&snap, &shard) {
            Ok((hash, keys)) => {
                tracing::info!(
                    shard_id = shard.id,
                    index,
                    hash = format!("{hash:016x}"),
                    keys,
                    "shard hashed"
                );
                meta.set_hash(shard.id, index, hash, keys);
            }
            Err(e) => {
                tracing::error!(shard_id = shard.id, index, error = %e, "hashing a shard failed")
            }
        },
    }
}

pub struct GcTask {
    pub shard_id: ShardId,
    /// Entries below this index are deleted.
    pub compact_to: Index,
}

pub struct GcWorker {
    tx: Option<Sender<GcTask>>,
    handle: Option<JoinHandle<()>>,
}

impl GcWorker {
    pub fn start(
        kv: KvEngine,
        raft: Arc<RaftLogEngine>,
        snap_mgr: Arc<SnapManager>,
        router: RaftRouter,
        purge_interval: Duration,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("raftlog-gc".into())
            .spawn(move || gc_loop(rx, kv, raft, snap_mgr, router, purge_interval))
            .expect("spawn raft log gc");
        GcWorker {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn sender(&self) -> Sender<GcTask> {
        self.tx.clone().expect("worker running")
    }

    pub fn stop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Snapshot files older than this are left over (a snapshot the receiver
/// refused, a build that was replaced) and deleted.
const SNAP_FILE_MAX_AGE: Duration = Duration::from_secs(2 * 3600);

fn gc_loop(
    rx: Receiver<GcTask>,
    kv: KvEngine,
    raft: Arc<RaftLogEngine>,
    snap_mgr: Arc<SnapManager>,
    router: RaftRouter,
    purge_interval: Duration,
) {
    let mut next_purge = Instant::now() + purge_interval;
    loop {
        let wait = next_purge.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(first) => {
                let mut tasks = vec![first];
                tasks.extend(rx.try_iter());
                compact(&kv, &raft, tasks);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_purge {
            next_purge = Instant::now() + purge_interval;
            purge(&raft, &router);
            let removed = snap_mgr.gc(SNAP_FILE_MAX_AGE, |_| false);
            if removed > 0 {
                tracing::info!(files = removed, "removed leftover snapshot files");
            }
        }
    }
}

fn compact(kv: &KvEngine, raft: &RaftLogEngine, tasks: Vec<GcTask>) {
    // The entries being deleted were applied to RocksDB without fsync.
    if let Err(e) = kv.sync_wal() {
        tracing::error!(error = %e, "syncing the RocksDB WAL failed; stopping the node");
        panic!("syncing the RocksDB WAL failed: {e}");
    }
    let mut batch = LogBatch::default();
    for t in &tasks {
        RaftLogEngine::compact_to(&mut batch, t.shard_id, t.compact_to);
    }
    if let Err(e) = raft.write(&mut batch, false) {
        tracing::error!(error = %e, "writing raft log compactions failed; stopping the node");
        panic!("raft-engine write failed: {e}");
    }
    metrics::LOG_COMPACTIONS.inc_by(tasks.len() as u64);
}

fn purge(raft: &RaftLogEngine, router: &RaftRouter) {
    let started = Instant::now();
    match raft.purge_expired_files() {
        Ok(groups) => {
            metrics::RAFT_ENGINE_PURGES.inc();
            if !groups.is_empty() {
                tracing::info!(
                    shards = groups.len(),
                    "old raft log files are held by lagging shards; asking them to compact"
                );
            }
            for g in groups {
                let _ = router.force_send(g, ReplicaMsg::CompactLog(None));
            }
        }
        Err(e) => tracing::warn!(error = %e, "raft-engine purge failed"),
    }
    metrics::RAFT_ENGINE_PURGE_DURATION.observe(started.elapsed().as_secs_f64());
}

/// Asks for a split of a shard at a key (the shard's epoch when checked):
/// the server allocates ids and proposes it (`StoreRouter::split`).
pub type SplitObserver =
    Arc<dyn Fn(ShardId, flotilla_proto::meta::Epoch, bytes::Bytes) + Send + Sync>;

/// A leader's request about splitting its shard.
pub enum SplitCheckTask {
    /// Scan the shard against the size and key thresholds.
    Size {
        shard: ShardDescriptor,
        snap: KvSnapshot,
        size: u64,
        keys: u64,
    },
    /// The shard is hot: split it at `key` (the median of its load).
    Load {
        shard: ShardDescriptor,
        key: bytes::Bytes,
        qps: u64,
    },
}

/// One thread that scans shards whose leaders saw enough writes since their
/// last check, and asks for a split of those past a threshold. A scan stops
/// as soon as the threshold is passed, so it reads at most one threshold's
/// worth of data.
pub struct SplitCheckWorker {
    tx: Option<Sender<SplitCheckTask>>,
    handle: Option<JoinHandle<()>>,
}

impl SplitCheckWorker {
    pub fn start(observer: SplitObserver) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<SplitCheckTask>();
        let handle = std::thread::Builder::new()
            .name("split-check".into())
            .spawn(move || {
                for task in rx {
                    let (shard, snap, size, keys) = match task {
                        SplitCheckTask::Load { shard, key, qps } => {
                            metrics::SPLIT_CHECKS
                                .with_label_values(&["split_load"])
                                .inc();
                            tracing::info!(
                                shard_id = shard.id,
                                qps,
                                split_key = %crate::fmt_key(&key),
                                "shard passed the load threshold; asking for a split"
                            );
                            observer(shard.id, shard.epoch(), key);
                            continue;
                        }
                        SplitCheckTask::Size {
                            shard,
                            snap,
                            size,
                            keys,
                        } => (shard, snap, size, keys),
                    };
                    let started = Instant::now();
                    let found = split_key(&snap, &shard, size, keys);
                    drop(snap);
                    metrics::SPLIT_CHECK_DURATION.observe(started.elapsed().as_secs_f64());
                    match found {
                        Ok(Some(key)) => {
                            metrics::SPLIT_CHECKS.with_label_values(&["split"]).inc();
                            tracing::info!(
                                shard_id = shard.id,
                                split_key = %crate::fmt_key(&key),
                                "shard passed a split threshold; asking for a split"
                            );
                            observer(shard.id, shard.epoch(), key);
                        }
                        Ok(None) => metrics::SPLIT_CHECKS.with_label_values(&["below"]).inc(),
                        Err(e) => {
                            metrics::SPLIT_CHECKS.with_label_values(&["failed"]).inc();
                            tracing::warn!(shard_id = shard.id, error = %e, "split check failed");
                        }
                    }
                }
            })
            .expect("spawn split checker");
        SplitCheckWorker {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn sender(&self) -> Sender<SplitCheckTask> {
        self.tx.clone().expect("worker running")
    }

    pub fn stop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

enum ScanStop {
    Passed,
    Storage(flotilla_storage::Error),
}

impl From<flotilla_storage::Error> for ScanStop {
    fn from(e: flotilla_storage::Error) -> Self {
        ScanStop::Storage(e)
    }
}

/// The key to split `shard` at when its data passes `size` bytes or `keys`
/// keys: the first key past half of either threshold (so the left half
/// holds about half a threshold's worth), or None when the shard is below
/// both or a split there would leave the left half empty.
pub fn split_key(
    snap: &KvSnapshot,
    shard: &ShardDescriptor,
    size: u64,
    keys: u64,
) -> flotilla_storage::Result<Option<bytes::Bytes>> {
    let (mut bytes_seen, mut keys_seen) = (0u64, 0u64);
    let mut middle: Option<Vec<u8>> = None;
    let cf = flotilla_storage::data_cf(shard.id);
    let r = snap.for_each::<ScanStop>(cf, &shard.start_key, &shard.end_key, |k, v| {
        if middle.is_none()
            && (bytes_seen >= size / 2 || keys_seen >= keys / 2)
            && k > &shard.start_key[..]
        {
            middle = Some(k.to_vec());
        }
        bytes_seen += (k.len() + v.len()) as u64;
        keys_seen += 1;
        if bytes_seen > size || keys_seen > keys {
            return Err(ScanStop::Passed);
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok(None),
        Err(ScanStop::Passed) => Ok(middle.map(bytes::Bytes::from)),
        Err(ScanStop::Storage(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_storage::{KvConfig, CF_DEFAULT};

    #[test]
    fn split_key_is_the_middle_of_a_shard_past_a_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let kv = KvEngine::open(dir.path(), &KvConfig::default()).unwrap();
        let mut wb = rocksdb::WriteBatch::default();
        for i in 0..100u32 {
            wb.put_cf(kv.cf(CF_DEFAULT), format!("k{i:03}"), [0u8; 96]);
        }
        kv.write(wb, false).unwrap();
        let shard = ShardDescriptor {
            id: 1,
            start_key: bytes::Bytes::from_static(b"k"),
            ..Default::default()
        };
        let snap = kv.snapshot();
        // 100 keys of 100 bytes: 10,000 bytes.
        assert_eq!(split_key(&snap, &shard, 20_000, 1000).unwrap(), None);
        assert_eq!(split_key(&snap, &shard, 10_000, 100).unwrap(), None);
        let by_size = split_key(&snap, &shard, 5_000, 1000).unwrap().unwrap();
        assert_eq!(&by_size[..], b"k025");
        let by_keys = split_key(&snap, &shard, 1 << 30, 60).unwrap().unwrap();
        assert_eq!(&by_keys[..], b"k030");
        // One key past the threshold alone: no key to split at.
        let single = ShardDescriptor {
            id: 1,
            start_key: bytes::Bytes::from_static(b"k000"),
            end_key: bytes::Bytes::from_static(b"k001"),
            ..Default::default()
        };
        assert_eq!(split_key(&snap, &single, 50, 1000).unwrap(), None);
    }
}
