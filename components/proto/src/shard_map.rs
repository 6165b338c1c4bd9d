//! Shards by key range: the index behind a node's directory and a client's
//! route cache. Ranges are disjoint; installing a descriptor drops the
//! older ones it overlaps (a split's or merge's predecessors) unless the
//! map already holds a newer version of the same shard.
//!
//! Every operation is O(log n) plus what it returns: a heartbeat refreshes
//! every shard of the cluster, and a client loads all routes at once, so
//! with 10,000 shards a scan per update (the first version of both) cost
//! 10⁸ comparisons per refresh.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use bytes::Bytes;

use crate::meta::ShardDescriptor;

/// Disjoint shard ranges by start key, each with a value `V`.
#[derive(Clone, Debug)]
pub struct ShardMap<V> {
    by_start: BTreeMap<Bytes, (ShardDescriptor, V)>,
    start_of: HashMap<u64, Bytes>,
}

impl<V> Default for ShardMap<V> {
    fn default() -> Self {
        ShardMap {
            by_start: BTreeMap::new(),
            start_of: HashMap::new(),
        }
    }
}

impl<V> ShardMap<V> {
    /// Installs `desc` with `value` unless a newer version of the same shard
    /// is held (false then); shards it overlaps are removed.
    pub fn insert(&mut self, desc: ShardDescriptor, value: V) -> bool {
        if let Some(start) = self.start_of.get(&desc.id).cloned() {
            if self.by_start[&start].0.is_newer_than(&desc) {
                return false;
            }
            self.remove_start(&start);
        }
        for start in self.overlapping_starts(&desc.start_key, &desc.end_key) {
            self.remove_start(&start);
        }
        self.start_of.insert(desc.id, desc.start_key.clone());
        self.by_start.insert(desc.start_key.clone(), (desc, value));
        true
    }

    pub fn remove(&mut self, shard_id: u64) -> Option<(ShardDescriptor, V)> {
        let start = self.start_of.get(&shard_id)?.clone();
        self.remove_start(&start)
    }

    fn remove_start(&mut self, start: &Bytes) -> Option<(ShardDescriptor, V)> {
        let e = self.by_start.remove(start)?;
        self.start_of.remove(&e.0.id);
        Some(e)
    }

    pub fn get(&self, shard_id: u64) -> Option<&(ShardDescriptor, V)> {
        self.start_of
            .get(&shard_id)
            .and_then(|s| self.by_start.get(s))
    }

    pub fn get_mut(&mut self, shard_id: u64) -> Option<&mut V> {
        let start = self.start_of.get(&shard_id)?;
        self.by_start.get_mut(start).map(|(_, v)| v)
    }

    /// The shard whose range holds `key`.
    pub fn locate(&self, key: &[u8]) -> Option<&(ShardDescriptor, V)> {
        self.by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, e)| e)
            .filter(|(d, _)| d.contains(key))
    }

    /// The shard holding the greatest keys below `end` (empty = +inf).
    pub fn locate_before(&self, end: &[u8]) -> Option<&(ShardDescriptor, V)> {
        let e = if end.is_empty() {
            self.by_start.values().next_back()
        } else {
            self.by_start
                .range::<[u8], _>((Bound::Unbounded, Bound::Excluded(end)))
                .next_back()
                .map(|(_, e)| e)
        }?;
        let reaches = e.0.end_key.is_empty() || (!end.is_empty() && e.0.end_key[..] >= *end);
        reaches.then_some(e)
    }

    /// Shards meeting `[start, end)` (empty end = +inf), by start key.
    pub fn overlapping(
        &self,
        start: &[u8],
        end: &[u8],
    ) -> impl Iterator<Item = &(ShardDescriptor, V)> + '_ {
        self.overlapping_starts(start, end)
            .into_iter()
            .map(|k| &self.by_start[&k])
    }

    /// Start keys of the shards meeting `[start, end)`: the one starting at
    /// or before `start`, if it reaches past it, and those starting inside.
    fn overlapping_starts(&self, start: &[u8], end: &[u8]) -> Vec<Bytes> {
        let mut found = Vec::new();
        if let Some((k, (d, _))) = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(start)))
            .next_back()
        {
            if d.overlaps(start, end) {
                found.push(k.clone());
            }
        }
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        found.extend(
            self.by_start
                .range::<[u8], _>((Bound::Excluded(start), upper))
                .map(|(k, _)| k.clone()),
        );
        found
    }

    /// Every shard, by start key.
    pub fn iter(&self) -> impl Iterator<Item = &(ShardDescriptor, V)> + '_ {
        self.by_start.values()
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Epoch;

    fn shard(id: u64, s: &str, e: &str, version: u64) -> ShardDescriptor {
        ShardDescriptor {
            id,
            start_key: Bytes::copy_from_slice(s.as_bytes()),
            end_key: Bytes::copy_from_slice(e.as_bytes()),
            epoch: Some(Epoch {
                conf_ver: 1,
                version,
            }),
            replicas: vec![],
        }
    }

    fn ids<'a, V: 'a>(it: impl Iterator<Item = &'a (ShardDescriptor, V)>) -> Vec<u64> {
        it.map(|(d, _)| d.id).collect()
    }

    #[test]
    fn locates_keys_and_newer_epochs_win() {
        let mut m = ShardMap::default();
        m.insert(shard(1, "", "m", 1), 0);
        m.insert(shard(2, "m", "", 1), 3);
        assert_eq!(m.locate(b"").unwrap().0.id, 1);
        assert_eq!(m.locate(b"l").unwrap().0.id, 1);
        assert_eq!(m.locate(b"m").unwrap().1, 3);
        assert_eq!(m.locate(b"zzz").unwrap().0.id, 2);
        assert_eq!(m.locate_before(b"").unwrap().0.id, 2);
        assert_eq!(m.locate_before(b"m").unwrap().0.id, 1);
        assert_eq!(m.locate_before(b"n").unwrap().0.id, 2);
        // A split of 2 at "t" replaces the overlapping older descriptor.
        assert!(m.insert(shard(2, "m", "t", 2), 0));
        assert!(m.locate(b"x").is_none());
        m.insert(shard(3, "t", "", 2), 0);
        assert_eq!(m.locate(b"x").unwrap().0.id, 3);
        assert_eq!(m.len(), 3);
        // A stale descriptor is ignored.
        assert!(!m.insert(shard(2, "m", "", 1), 0));
        assert_eq!(m.locate(b"x").unwrap().0.id, 3);
        assert_eq!(ids(m.overlapping(b"a", b"n")), vec![1, 2]);
        assert_eq!(ids(m.overlapping(b"t", b"")), vec![3]);
        assert_eq!(ids(m.overlapping(b"", b"")), vec![1, 2, 3]);
        assert_eq!(m.get(2).unwrap().0.end_key, Bytes::from_static(b"t"));
        *m.get_mut(2).unwrap() = 7;
        assert_eq!(m.locate(b"p").unwrap().1, 7);
        // A merge-like descriptor covering several ranges replaces them all.
        m.insert(shard(4, "a", "z", 3), 0);
        assert_eq!(ids(m.iter()), vec![4]);
        assert!(m.get(1).is_none() && m.get(3).is_none());
        assert_eq!(m.locate(b"b").unwrap().0.id, 4);
        assert!(m.locate(b"").is_none());
        assert_eq!(m.remove(4).unwrap().0.id, 4);
        assert!(m.is_empty());
    }
}
