//! Recently appended entries of one replica, kept in memory so the hot path
//! (handing committed entries to apply, sending appends to followers that
//! keep up) does not read raft-engine files.
//!
//! The cache holds a contiguous run `[first, last]` of the log's tail. An
//! append that overwrites part of it truncates the conflicting suffix; an
//! append that leaves a gap restarts it. It is bounded by bytes and trimmed
//! to the applied index; anything older is read from raft-engine.

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::eraftpb::Entry;

use crate::Index;

pub struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
    max_bytes: usize,
}

fn entry_bytes(e: &Entry) -> usize {
    e.compute_size() as usize
}

impl EntryCache {
    pub fn new(max_bytes: usize) -> Self {
        EntryCache {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn first_index(&self) -> Option<Index> {
        self.entries.front().map(|e| e.index)
    }

    pub fn last_index(&self) -> Option<Index> {
        self.entries.back().map(|e| e.index)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        match (self.first_index(), self.last_index()) {
            (Some(f), Some(l)) if first.index >= f && first.index <= l + 1 => {
                // Drop a conflicting suffix, if any.
                while self.last_index().is_some_and(|l| l >= first.index) {
                    let e = self.entries.pop_back().unwrap();
                    self.bytes -= entry_bytes(&e);
                }
            }
            _ => self.clear(),
        }
        for e in ents {
            self.bytes += entry_bytes(e);
            self.entries.push_back(e.clone());
        }
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            let e = self.entries.pop_front().unwrap();
            self.bytes -= entry_bytes(&e);
        }
    }

    /// Drops entries below `index`.
    pub fn compact_to(&mut self, index: Index) {
        while self.first_index().is_some_and(|f| f < index) {
            let e = self.entries.pop_front().unwrap();
            self.bytes -= entry_bytes(&e);
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    pub fn term(&self, index: Index) -> Option<u64> {
        let first = self.first_index()?;
        if index < first {
            return None;
        }
        self.entries.get((index - first) as usize).map(|e| e.term)
    }

    /// Appends the cached part of `[low, high)` to `out`; `low` must be at or
    /// after the first cached index.
    pub fn fetch(&self, low: Index, high: Index, out: &mut Vec<Entry>) {
        let Some(first) = self.first_index() else {
            return;
        };
        debug_assert!(low >= first);
        let start = (low - first) as usize;
        let end = ((high - first) as usize).min(self.entries.len());
        out.extend(self.entries.range(start..end).cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![0u8; 10].into(),
            ..Default::default()
        }
    }

    #[test]
    fn append_truncates_conflicts_and_restarts_on_gaps() {
        let mut c = EntryCache::new(1 << 20);
        c.append(&[ent(6, 1), ent(7, 1), ent(8, 1)]);
        c.append(&[ent(7, 2)]);
        assert_eq!((c.first_index(), c.last_index()), (Some(6), Some(7)));
        assert_eq!(c.term(7), Some(2));
        c.append(&[ent(20, 3)]);
        assert_eq!((c.first_index(), c.last_index()), (Some(20), Some(20)));
        let mut out = Vec::new();
        c.fetch(20, 21, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn bounded_by_bytes_and_compaction() {
        let mut c = EntryCache::new(40);
        c.append(&(1..=10).map(|i| ent(i, 1)).collect::<Vec<_>>());
        assert!(c.bytes() <= 40);
        assert_eq!(c.last_index(), Some(10));
        c.compact_to(10);
        assert_eq!(c.first_index(), Some(10));
    }
}
