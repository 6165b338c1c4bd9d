//! The node's key-value store: one RocksDB for user data and local records.
//!
//! Column families:
//! - `default`: user data, key = raw user key, value = raw user value. A
//!   shard owns the keys of its range; splitting a shard moves nothing.
//! - `meta`: node and shard records, keyed as documented in [`crate::keys`].
//!
//! Writes from the apply path are not synced (the Raft log is the WAL: a
//! crash re-applies from the recorded applied index). Records that are not
//! re-derivable from the Raft log (bootstrap) are written with sync.
//!
//! The RocksDB WAL is buffered in memory (`manual_wal_flush`): it reaches
//! the file when its buffer fills, on a synced write, or on
//! [`KvEngine::sync_wal`], not with every write. A crash can therefore lose
//! a suffix of the unsynced writes, never a middle part, so what survives
//! is the state as of some applied index, data and apply state alike, and
//! the Raft log replays the rest. Two rules keep that true:
//! - raft log entries are deleted only after `sync_wal` (the raft-log GC
//!   worker), so the entries to replay are still there;
//! - writes whose effects leave RocksDB (a split creates a shard's raft
//!   state, a membership change can destroy a replica) are synced before
//!   those effects happen (the apply poller syncs such rounds).
//!
//! Measured on the 256-client put bench: the per-write `write(2)` of the
//! WAL was ~9 % of the apply threads' CPU.

use std::path::Path;
use std::sync::Arc;

use flotilla_proto::local::{ApplyState, NodeIdent, ShardLocalState, ShardState};
use flotilla_proto::meta::ShardDescriptor;
use flotilla_proto::Message;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType,
    IngestExternalFileOptions, Options, ReadOptions, SnapshotWithThreadMode, WriteBatch,
    WriteOptions, DB,
};

use crate::keys;
use crate::{Error, Result, ShardId};

pub const CF_DEFAULT: &str = "default";
pub const CF_META: &str = "meta";
/// The meta shard's data (the cluster's node registry, shard directory and
/// id allocator). A column family of its own, so the meta shard can cover
/// the whole key space of it without overlapping any user shard.
pub const CF_CLUSTER: &str = "cluster";

/// The shard whose data is the cluster metadata (`CF_CLUSTER`). Id 0 is
/// never a user shard's: bootstrap numbers those from 1 and the allocator
/// continues from there.
pub const META_SHARD_ID: ShardId = 0;

/// The column family holding a shard's data.
pub fn data_cf(shard_id: ShardId) -> &'static str {
    if shard_id == META_SHARD_ID {
        CF_CLUSTER
    } else {
        CF_DEFAULT
    }
}

/// RocksDB options exposed in the node configuration.
#[derive(Clone, Debug)]
pub struct KvConfig {
    /// Shared block cache, in bytes.
    pub block_cache_size: usize,
    /// Memtable size per column family, in bytes.
    pub write_buffer_size: usize,
    /// Background flush and compaction threads.
    pub max_background_jobs: i32,
    /// Open file handles RocksDB may keep (-1 = unlimited).
    pub max_open_files: i32,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            block_cache_size: 256 << 20,
            write_buffer_size: 16 << 20,
            max_background_jobs: 2,
            max_open_files: 4096,
        }
    }
}

/// One key-value pair read from user data.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// Shared handle to the node's RocksDB.
#[derive(Clone)]
pub struct KvEngine {
    db: Arc<DB>,
}

impl KvEngine {
    pub fn open(dir: &Path, cfg: &KvConfig) -> Result<Self> {
        let cache = Cache::new_lru_cache(cfg.block_cache_size);
        let mut block = BlockBasedOptions::default();
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);
        block.set_cache_index_and_filter_blocks(true);

        let mut cf_opts = Options::default();
        cf_opts.set_block_based_table_factory(&block);
        cf_opts.set_write_buffer_size(cfg.write_buffer_size);
        cf_opts.set_compression_type(DBCompressionType::Lz4);
        cf_opts.set_bottommost_compression_type(DBCompressionType::Zstd);
        cf_opts.set_level_compaction_dynamic_level_bytes(true);

        let mut db_opts = cf_opts.clone();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(cfg.max_background_jobs);
        db_opts.set_max_open_files(cfg.max_open_files);
        // See the module docs: the WAL is written out in buffer-sized
        // pieces, on synced writes and on `sync_wal`.
        db_opts.set_manual_wal_flush(true);

        let cfs = [CF_DEFAULT, CF_META, CF_CLUSTER]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_opts.clone()));
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs)?;
        Ok(KvEngine { db: Arc::new(db) })
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} exists"))
    }

    /// Writes a batch. `sync` forces the RocksDB WAL to disk.
    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// Writes out the RocksDB write-ahead log's buffer and syncs it. Called
    /// before raft log entries are deleted: entries applied without sync
    /// must be durable first, or a crash could lose them with nothing left
    /// to replay.
    pub fn sync_wal(&self) -> Result<()> {
        Ok(self.db.flush_wal(true)?)
    }

    /// A consistent point-in-time view that keeps the database alive.
    pub fn snapshot(&self) -> KvSnapshot {
        let snap = self.db.snapshot();
        // SAFETY: the snapshot borrows the DB inside `self.db`'s Arc
        // allocation. KvSnapshot keeps a clone of that Arc and declares the
        // snapshot field first, so the snapshot is released before the
        // allocation can be freed.
        let snap = unsafe {
            std::mem::transmute::<SnapshotWithThreadMode<'_, DB>, SnapshotWithThreadMode<'static, DB>>(
                snap,
            )
        };
        KvSnapshot {
            snap,
            _db: self.db.clone(),
        }
    }

    /// Stages the deletion of every key of `cf_name` in `[start, end)`
    /// (empty end = +inf) into `wb`.
    pub fn delete_range(
        &self,
        wb: &mut WriteBatch,
        cf_name: &str,
        start: &[u8],
        end: &[u8],
    ) -> Result<()> {
        let cf = self.cf(cf_name);
        if end.is_empty() {
            // RocksDB needs an upper bound: one past the greatest key present.
            let (last, _) = self.scan(cf_name, start, &[], 1, true)?;
            if let Some((mut upper, _)) = last.into_iter().next() {
                upper.push(0);
                wb.delete_range_cf(cf, start, &upper[..]);
            }
        } else if start < end {
            wb.delete_range_cf(cf, start, end);
        }
        Ok(())
    }

    /// Ingests an SST file into `cf_name`. The file is hard-linked into the
    /// database, so the caller's path stays valid until it deletes it.
    pub fn ingest(&self, cf_name: &str, path: &Path) -> Result<()> {
        let link = path.with_extension("ingest");
        let _ = std::fs::remove_file(&link);
        std::fs::hard_link(path, &link)
            .map_err(|e| Error::Other(format!("linking {}: {e}", path.display())))?;
        let mut opts = IngestExternalFileOptions::default();
        opts.set_move_files(true);
        let r = self
            .db
            .ingest_external_file_cf_opts(self.cf(cf_name), &opts, vec![link.clone()]);
        let _ = std::fs::remove_file(&link);
        Ok(r?)
    }

    /// Reads one key of `cf_name`.
    pub fn get(&self, cf_name: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(cf_name), key)?
            .map(|v| v.to_vec()))
    }

    /// Reads up to `limit` pairs of `cf_name` in `[start, end)` (empty `end`
    /// = +inf), ascending, or descending when `reverse`. Returns the pairs
    /// and whether more pairs remain in the range.
    pub fn scan(
        &self,
        cf_name: &str,
        start: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<(Vec<KvPair>, bool)> {
        let it = self
            .db
            .raw_iterator_cf_opt(self.cf(cf_name), range_opts(start, end));
        collect_range(it, limit, reverse)
    }

    fn get_meta<M: Message + Default>(&self, key: &[u8]) -> Result<Option<M>> {
        match self.db.get_pinned_cf(self.cf(CF_META), key)? {
            Some(v) => Ok(Some(M::decode(&*v)?)),
            None => Ok(None),
        }
    }

    pub fn node_ident(&self) -> Result<Option<NodeIdent>> {
        self.get_meta(keys::NODE_IDENT_KEY)
    }

    pub fn shard_state(&self, shard_id: ShardId) -> Result<Option<ShardLocalState>> {
        self.get_meta(&keys::shard_state_key(shard_id))
    }

    pub fn apply_state(&self, shard_id: ShardId) -> Result<Option<ApplyState>> {
        self.get_meta(&keys::apply_state_key(shard_id))
    }

    pub fn put_node_ident(&self, wb: &mut WriteBatch, ident: &NodeIdent) {
        wb.put_cf(
            self.cf(CF_META),
            keys::NODE_IDENT_KEY,
            ident.encode_to_vec(),
        );
    }

    /// Records (synced) that this data dir belongs to a node of a cluster.
    pub fn write_node_ident(&self, ident: &NodeIdent) -> Result<()> {
        let mut wb = WriteBatch::default();
        self.put_node_ident(&mut wb, ident);
        self.write(wb, true)
    }

    pub fn put_shard_state(&self, wb: &mut WriteBatch, shard_id: ShardId, s: &ShardLocalState) {
        wb.put_cf(
            self.cf(CF_META),
            keys::shard_state_key(shard_id),
            s.encode_to_vec(),
        );
    }

    pub fn put_apply_state(&self, wb: &mut WriteBatch, shard_id: ShardId, s: &ApplyState) {
        wb.put_cf(
            self.cf(CF_META),
            keys::apply_state_key(shard_id),
            s.encode_to_vec(),
        );
    }

    pub fn delete_apply_state(&self, wb: &mut WriteBatch, shard_id: ShardId) {
        wb.delete_cf(self.cf(CF_META), keys::apply_state_key(shard_id));
    }

    pub fn put_directory_entry(&self, wb: &mut WriteBatch, d: &ShardDescriptor) {
        wb.put_cf(
            self.cf(CF_META),
            keys::directory_key(d.id),
            d.encode_to_vec(),
        );
    }

    /// Every replica hosted here, with its apply state, ordered by shard id.
    /// One forward scan over the `0x02` records.
    pub fn load_shards(&self) -> Result<Vec<(ShardLocalState, ApplyState)>> {
        let mut out: Vec<(ShardLocalState, ApplyState)> = Vec::new();
        let mut pending: Option<(ShardId, ShardLocalState)> = None;
        let mut apply: Option<(ShardId, ApplyState)> = None;
        let mut flush = |pending: &mut Option<(ShardId, ShardLocalState)>,
                         apply: &mut Option<(ShardId, ApplyState)>|
         -> Result<()> {
            if let Some((id, state)) = pending.take() {
                let a = match apply.take() {
                    Some((aid, a)) if aid == id => a,
                    // A tombstone keeps no apply state.
                    _ if state.state == ShardState::Tombstone as i32 => ApplyState::default(),
                    _ => {
                        return Err(Error::Corruption {
                            what: format!("shard {id}"),
                            detail: "shard state without apply state".into(),
                        })
                    }
                };
                out.push((state, a));
            }
            Ok(())
        };
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(vec![keys::SHARD_PREFIX]);
        opts.set_iterate_upper_bound(vec![keys::SHARD_PREFIX + 1]);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_META), opts);
        it.seek_to_first();
        while it.valid() {
            let key = it.key().unwrap();
            let (id, suffix) = keys::decode_shard_key(key).ok_or_else(|| Error::Corruption {
                what: "meta key".into(),
                detail: format!("{key:?}"),
            })?;
            if pending.as_ref().is_some_and(|(pid, _)| *pid != id) {
                flush(&mut pending, &mut apply)?;
            }
            match suffix {
                keys::SHARD_STATE_SUFFIX => {
                    pending = Some((id, ShardLocalState::decode(it.value().unwrap())?))
                }
                keys::APPLY_STATE_SUFFIX => {
                    apply = Some((id, ApplyState::decode(it.value().unwrap())?))
                }
                _ => {}
            }
            it.next();
        }
        it.status()?;
        flush(&mut pending, &mut apply)?;
        Ok(out)
    }

    /// The node's view of the shard directory (every shard it knows of).
    pub fn load_directory(&self) -> Result<Vec<ShardDescriptor>> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(vec![keys::DIRECTORY_PREFIX]);
        opts.set_iterate_upper_bound(vec![keys::DIRECTORY_PREFIX + 1]);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_META), opts);
        it.seek_to_first();
        let mut out = Vec::new();
        while it.valid() {
            out.push(ShardDescriptor::decode(it.value().unwrap())?);
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// An integer RocksDB property summed over both column families
    /// (for example `rocksdb.total-sst-files-size`).
    pub fn property_sum(&self, name: &str) -> u64 {
        [CF_DEFAULT, CF_META]
            .iter()
            .filter_map(|cf| {
                self.db
                    .property_int_value_cf(self.cf(cf), name)
                    .ok()
                    .flatten()
            })
            .sum()
    }
}

fn range_opts(start: &[u8], end: &[u8]) -> ReadOptions {
    let mut opts = ReadOptions::default();
    opts.set_iterate_lower_bound(start.to_vec());
    if !end.is_empty() {
        opts.set_iterate_upper_bound(end.to_vec());
    }
    opts
}

/// Up to `limit` pairs from a bounded iterator, ascending or descending,
/// and whether more remain.
fn collect_range<D: rocksdb::DBAccess>(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, D>,
    limit: usize,
    reverse: bool,
) -> Result<(Vec<KvPair>, bool)> {
    if reverse {
        it.seek_to_last();
    } else {
        it.seek_to_first();
    }
    let mut out = Vec::new();
    while it.valid() {
        if out.len() == limit {
            return Ok((out, true));
        }
        out.push((it.key().unwrap().to_vec(), it.value().unwrap().to_vec()));
        if reverse {
            it.prev();
        } else {
            it.next();
        }
    }
    it.status()?;
    Ok((out, false))
}

/// A RocksDB snapshot that owns a handle to its database, so it can move
/// to a worker thread (snapshot generation, hashing) or outlive the moment
/// a read was confirmed (the read then sees exactly that state).
pub struct KvSnapshot {
    // Declared first: dropped (released) before the database handle.
    snap: SnapshotWithThreadMode<'static, DB>,
    _db: Arc<DB>,
}

impl KvSnapshot {
    fn cf(&self, name: &str) -> &ColumnFamily {
        self._db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} exists"))
    }

    /// Reads one key of `cf_name` as of the snapshot.
    pub fn get(&self, cf_name: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.snap.get_cf(self.cf(cf_name), key)?)
    }

    /// `KvEngine::scan` as of the snapshot.
    pub fn scan(
        &self,
        cf_name: &str,
        start: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<(Vec<KvPair>, bool)> {
        let it = self
            .snap
            .raw_iterator_cf_opt(self.cf(cf_name), range_opts(start, end));
        collect_range(it, limit, reverse)
    }

    /// Calls `f` with every pair of `cf_name` in `[start, end)` (empty end =
    /// +inf) in key order; stops early if `f` returns an error.
    pub fn for_each<E: From<Error>>(
        &self,
        cf_name: &str,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut opts = range_opts(start, end);
        opts.fill_cache(false);
        let mut it = self.snap.raw_iterator_cf_opt(self.cf(cf_name), opts);
        it.seek_to_first();
        while it.valid() {
            f(it.key().unwrap(), it.value().unwrap())?;
            it.next();
        }
        it.status().map_err(Error::from)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> (tempfile::TempDir, KvEngine) {
        let dir = tempfile::tempdir().unwrap();
        let e = KvEngine::open(dir.path(), &KvConfig::default()).unwrap();
        (dir, e)
    }

    #[test]
    fn scan_honours_bounds_limit_and_direction() {
        let (_d, e) = engine();
        let mut wb = WriteBatch::default();
        for k in [b"a", b"b", b"c", b"d", b"e"] {
            wb.put_cf(e.cf(CF_DEFAULT), k, k);
        }
        e.write(wb, false).unwrap();
        let keys = |v: Vec<KvPair>| v.into_iter().map(|(k, _)| k[0]).collect::<Vec<_>>();
        let (v, more) = e.scan(CF_DEFAULT, b"b", b"e", 10, false).unwrap();
        assert_eq!((keys(v), more), (b"bcd".to_vec(), false));
        let (v, more) = e.scan(CF_DEFAULT, b"b", b"e", 2, false).unwrap();
        assert_eq!((keys(v), more), (b"bc".to_vec(), true));
        let (v, more) = e.scan(CF_DEFAULT, b"b", b"", 10, true).unwrap();
        assert_eq!((keys(v), more), (b"edcb".to_vec(), false));
        let (v, more) = e.scan(CF_DEFAULT, b"a", b"d", 2, true).unwrap();
        assert_eq!((keys(v), more), (b"cb".to_vec(), true));
    }

    #[test]
    fn shard_records_load_in_id_order() {
        let (_d, e) = engine();
        let mut wb = WriteBatch::default();
        for id in [300u64, 2, 17] {
            let s = ShardLocalState {
                shard: Some(ShardDescriptor {
                    id,
                    ..Default::default()
                }),
                ..Default::default()
            };
            e.put_shard_state(&mut wb, id, &s);
            e.put_apply_state(
                &mut wb,
                id,
                &ApplyState {
                    applied_index: id,
                    ..Default::default()
                },
            );
        }
        e.write(wb, true).unwrap();
        let loaded = e.load_shards().unwrap();
        let ids: Vec<_> = loaded
            .iter()
            .map(|(s, a)| (s.shard.as_ref().unwrap().id, a.applied_index))
            .collect();
        assert_eq!(ids, vec![(2, 2), (17, 17), (300, 300)]);
    }
}
