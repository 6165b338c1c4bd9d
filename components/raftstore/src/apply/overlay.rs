//! Writes staged in the round's `WriteBatch`, readable before it is written.
//!
//! A CompareAndSwap must see the effect of earlier commands of the same round
//! that are still only in the write batch. The overlay records them: point
//! writes (value or deletion) and deleted ranges. A point write after a range
//! deletion shadows it; a range deletion clears earlier point writes in it.

use std::collections::BTreeMap;

use bytes::Bytes;

#[derive(Default)]
pub struct Overlay {
    points: BTreeMap<Bytes, Option<Bytes>>,
    /// `[start, end)`, empty end = +inf.
    ranges: Vec<(Bytes, Bytes)>,
}

/// What the overlay knows of a key.
pub enum Lookup {
    /// Written in this round (None = deleted).
    Known(Option<Bytes>),
    /// Not touched in this round: read the database.
    Unknown,
}

impl Overlay {
    pub fn put(&mut self, key: Bytes, value: Option<Bytes>) {
        self.points.insert(key, value);
    }

    pub fn delete_range(&mut self, start: Bytes, end: Bytes) {
        if !end.is_empty() && start >= end {
            // Empty (and a BTreeMap range would panic on it).
            return;
        }
        let upper = if end.is_empty() {
            std::ops::Bound::Unbounded
        } else {
            std::ops::Bound::Excluded(end.clone())
        };
        for (_, v) in self
            .points
            .range_mut((std::ops::Bound::Included(start.clone()), upper))
        {
            *v = None;
        }
        self.ranges.push((start, end));
    }

    pub fn get(&self, key: &[u8]) -> Lookup {
        if let Some(v) = self.points.get(key) {
            return Lookup::Known(v.clone());
        }
        let in_range = self
            .ranges
            .iter()
            .any(|(s, e)| key >= &s[..] && (e.is_empty() || key < &e[..]));
        if in_range {
            Lookup::Known(None)
        } else {
            Lookup::Unknown
        }
    }

    /// The greatest key written (with a value) at or after `start`.
    pub fn last_key_from(&self, start: &[u8]) -> Option<&Bytes> {
        self.points
            .range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
            .next_back()
            .map(|(k, _)| k)
    }

    pub fn clear(&mut self) {
        self.points.clear();
        self.ranges.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn later_writes_shadow_earlier_ones() {
        let mut o = Overlay::default();
        o.put(b("a"), Some(b("1")));
        o.put(b("c"), Some(b("3")));
        o.delete_range(b("a"), b("b"));
        assert!(matches!(o.get(b"a"), Lookup::Known(None)));
        assert!(matches!(o.get(b"c"), Lookup::Known(Some(v)) if v == b("3")));
        assert!(matches!(o.get(b"aa"), Lookup::Known(None)));
        assert!(matches!(o.get(b"z"), Lookup::Unknown));
        o.put(b("a"), Some(b("2")));
        assert!(matches!(o.get(b"a"), Lookup::Known(Some(v)) if v == b("2")));
        o.delete_range(b("b"), Bytes::new());
        assert!(matches!(o.get(b"z"), Lookup::Known(None)));
        assert_eq!(o.last_key_from(b"a"), Some(&b("c")));
    }
}
