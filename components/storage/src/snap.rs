//! Snapshot files: building them from a RocksDB snapshot, naming,
//! verifying and cleaning them up.
//!
//! A shard snapshot is one SST file of the shard's user keys (column family
//! `default`), sorted, written with RocksDB's `SstFileWriter` so the
//! receiver can ingest it without rewriting. Files live in `<data>/snap/`:
//!
//! ```text
//! gen_<shard>_<term>_<index>.sst   built here for sending (leader side)
//! rev_<shard>_<term>_<index>.sst   received here, waiting to be installed
//! *.tmp                            being written; removed at start-up
//! ```
//!
//! (term, index) are those of the snapshot's raft metadata, so both sides
//! name the same snapshot the same way. A file is durable (fsynced, renamed
//! from `.tmp`, directory fsynced) before anything refers to it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use flotilla_proto::local::SnapshotData;
use flotilla_proto::meta::ShardDescriptor;
use rocksdb::{Options, SstFileWriter};

use crate::kv::KvSnapshot;
use crate::{Error, Index, Result, ShardId, Term};

pub struct SnapManager {
    dir: PathBuf,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Other(format!("{what} {}: {e}", path.display()))
}

/// Fsyncs a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing", dir, e))
}

/// CRC32 and size of a file.
pub fn checksum(path: &Path) -> Result<(u64, u32)> {
    let mut f = File::open(path).map_err(|e| io_err("opening", path, e))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize()))
}

/// FNV-1a over length-prefixed keys and values: a stable digest of a range,
/// the same on every replica and every build.
#[derive(Clone, Copy)]
pub struct RangeHasher {
    state: u64,
    pub keys: u64,
}

impl Default for RangeHasher {
    fn default() -> Self {
        RangeHasher {
            state: 0xcbf29ce484222325,
            keys: 0,
        }
    }
}

impl RangeHasher {
    fn bytes(&mut self, b: &[u8]) {
        for x in (b.len() as u64).to_be_bytes().iter().chain(b) {
            self.state ^= *x as u64;
            self.state = self.state.wrapping_mul(0x100000001b3);
        }
    }

    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        self.bytes(key);
        self.bytes(value);
        self.keys += 1;
    }

    pub fn finish(&self) -> u64 {
        self.state
    }
}

/// Hashes a shard's data in a snapshot.
pub fn hash_shard(snap: &KvSnapshot, shard: &ShardDescriptor) -> Result<(u64, u64)> {
    let mut h = RangeHasher::default();
    let cf = crate::kv::data_cf(shard.id);
    snap.for_each::<Error>(cf, &shard.start_key, &shard.end_key, |k, v| {
        h.add(k, v);
        Ok(())
    })?;
    Ok((h.finish(), h.keys))
}

impl SnapManager {
    /// Opens the snapshot directory, removing files left half-written.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        let m = SnapManager {
            dir: dir.to_path_buf(),
        };
        for p in m.files()? {
            if p.extension().is_some_and(|e| e == "tmp" || e == "ingest") {
                let _ = std::fs::remove_file(&p);
            }
        }
        Ok(m)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn name(&self, kind: &str, shard: ShardId, term: Term, index: Index) -> PathBuf {
        self.dir.join(format!("{kind}_{shard}_{term}_{index}.sst"))
    }

    /// Where a snapshot built here for sending lives.
    pub fn gen_path(&self, shard: ShardId, term: Term, index: Index) -> PathBuf {
        self.name("gen", shard, term, index)
    }

    /// Where a received snapshot lives until it is installed.
    pub fn recv_path(&self, shard: ShardId, term: Term, index: Index) -> PathBuf {
        self.name("rev", shard, term, index)
    }

    fn files(&self) -> Result<Vec<PathBuf>> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| io_err("listing", &self.dir, e))?;
        Ok(rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
    }

    /// Writes `[start, end)` of `snap` to the gen file of (shard, term,
    /// index) and describes it. An empty range writes no file.
    pub fn build(
        &self,
        snap: &KvSnapshot,
        shard: &ShardDescriptor,
        term: Term,
        index: Index,
    ) -> Result<SnapshotData> {
        let path = self.gen_path(shard.id, term, index);
        let tmp = path.with_extension("tmp");
        let mut opts = Options::default();
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut writer = SstFileWriter::create(&opts);
        writer.open(&tmp)?;
        let mut keys = 0u64;
        let cf = crate::kv::data_cf(shard.id);
        snap.for_each::<Error>(cf, &shard.start_key, &shard.end_key, |k, v| {
            keys += 1;
            Ok(writer.put(k, v)?)
        })?;
        if keys == 0 {
            drop(writer);
            let _ = std::fs::remove_file(&tmp);
            return Ok(SnapshotData {
                shard: Some(shard.clone()),
                file_size: 0,
                file_crc32: 0,
                keys: 0,
            });
        }
        writer.finish()?;
        drop(writer);
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err("syncing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err("renaming", &tmp, e))?;
        sync_dir(&self.dir)?;
        let (file_size, file_crc32) = checksum(&path)?;
        Ok(SnapshotData {
            shard: Some(shard.clone()),
            file_size,
            file_crc32,
            keys,
        })
    }

    /// Checks a file against the size and checksum its snapshot announced.
    pub fn verify(&self, path: &Path, data: &SnapshotData) -> Result<()> {
        let (size, crc) = checksum(path)?;
        if size != data.file_size || crc != data.file_crc32 {
            return Err(Error::Corruption {
                what: format!("snapshot file {}", path.display()),
                detail: format!(
                    "{size} bytes crc32 {crc:08x}, expected {} bytes crc32 {:08x}",
                    data.file_size, data.file_crc32
                ),
            });
        }
        Ok(())
    }

    /// Deletes snapshot files of `kind` (`gen` or `rev`) of `shard` other
    /// than `keep`.
    pub fn remove_others(&self, kind: &str, shard: ShardId, keep: Option<&Path>) {
        let prefix = format!("{kind}_{shard}_");
        if let Ok(files) = self.files() {
            for p in files {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with(&prefix) && Some(p.as_path()) != keep {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }

    /// Deletes snapshot files older than `age` for which `in_use` is false.
    pub fn gc(&self, age: Duration, in_use: impl Fn(&Path) -> bool) -> usize {
        let now = SystemTime::now();
        let mut removed = 0;
        for p in self.files().unwrap_or_default() {
            let old = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|d| d >= age);
            if old && !in_use(&p) && std::fs::remove_file(&p).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvConfig, KvEngine, CF_DEFAULT};
    use rocksdb::WriteBatch;

    #[test]
    fn snapshot_files_round_trip_into_another_engine() {
        let dir = tempfile::tempdir().unwrap();
        let a = KvEngine::open(&dir.path().join("a"), &KvConfig::default()).unwrap();
        let b = KvEngine::open(&dir.path().join("b"), &KvConfig::default()).unwrap();
        let mut wb = WriteBatch::default();
        for i in 0..1000u32 {
            wb.put_cf(a.cf(CF_DEFAULT), i.to_be_bytes(), format!("v{i}"));
        }
        a.write(wb, false).unwrap();
        let snap = a.snapshot();
        // Writes after the snapshot are not in it.
        let mut wb = WriteBatch::default();
        wb.put_cf(a.cf(CF_DEFAULT), 5u32.to_be_bytes(), "later");
        a.write(wb, false).unwrap();

        let mgr = SnapManager::open(&dir.path().join("snap")).unwrap();
        let shard = ShardDescriptor {
            id: 7,
            start_key: 100u32.to_be_bytes().to_vec().into(),
            end_key: 200u32.to_be_bytes().to_vec().into(),
            ..Default::default()
        };
        let data = mgr.build(&snap, &shard, 6, 42).unwrap();
        assert_eq!(data.keys, 100);
        let path = mgr.gen_path(7, 6, 42);
        mgr.verify(&path, &data).unwrap();

        b.ingest(CF_DEFAULT, &path).unwrap();
        assert!(path.exists(), "ingest leaves the caller's file");
        let (pairs, more) = b.scan(CF_DEFAULT, b"", b"", 1000, false).unwrap();
        assert_eq!((pairs.len(), more), (100, false));
        let (h1, n1) = hash_shard(&b.snapshot(), &shard).unwrap();
        let (h2, n2) = hash_shard(&snap, &shard).unwrap();
        assert_eq!((h1, n1), (h2, n2));

        let mut bad = data.clone();
        bad.file_crc32 ^= 1;
        assert!(mgr.verify(&path, &bad).is_err());

        let empty = ShardDescriptor {
            id: 8,
            start_key: b"zz".to_vec().into(),
            ..Default::default()
        };
        let d = mgr.build(&snap, &empty, 6, 43).unwrap();
        assert_eq!((d.keys, d.file_size), (0, 0));
        assert!(!mgr.gen_path(8, 6, 43).exists());
    }
}
