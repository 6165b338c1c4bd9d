//! Load-based split: a leader samples the keys its reads touch and, when
//! its shard serves more than `split_qps` reads per second, splits at the
//! median sampled key, so each half takes about half the load (rather than
//! half the data, as the size split does).
//!
//! Reads only, as TiKV's Load Base Split counts them. A read hotspot can be
//! spread by splitting it (the halves' reads then go to two leaders, and
//! with follower reads to more replicas). Every replica of a shard applies
//! each of its writes whatever the shard count, so splitting under write
//! load moves no work off a node; it only adds raft groups. Measured with
//! writes counted: the 256-client put bench split its 8 shards into ~28
//! over four 12 s runs, and the servers' CPU per write grew 35 -> 42 us
//! (smaller per-shard batches: more apply states, messages and rounds).
//! A write-hot shard is balanced by moving its leader instead.
//!
//! Sampling is a reservoir of `CAPACITY` keys per check interval (each
//! read's first key), so a check costs a sort of a few dozen keys.

use bytes::Bytes;
use flotilla_proto::meta::ShardDescriptor;

const CAPACITY: usize = 64;
/// Fewer samples than this say too little about where the load is.
const MIN_SAMPLES: usize = 16;

pub struct LoadSampler {
    ops: u64,
    samples: Vec<Bytes>,
    rng: u64,
}

impl Default for LoadSampler {
    fn default() -> Self {
        LoadSampler {
            ops: 0,
            samples: Vec::with_capacity(CAPACITY),
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl LoadSampler {
    pub fn record(&mut self, key: &Bytes) {
        self.ops += 1;
        if self.samples.len() < CAPACITY {
            self.samples.push(key.clone());
            return;
        }
        // xorshift64: cheap and good enough to pick reservoir slots.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let j = (self.rng % self.ops) as usize;
        if j < CAPACITY {
            self.samples[j] = key.clone();
        }
    }

    /// No request since the last take.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Requests since the last take, and the sampled keys.
    pub fn take(&mut self) -> (u64, Vec<Bytes>) {
        let ops = std::mem::take(&mut self.ops);
        (ops, std::mem::take(&mut self.samples))
    }
}

/// The median of `samples` if it lies strictly inside `shard`'s range.
pub fn median_split_key(mut samples: Vec<Bytes>, shard: &ShardDescriptor) -> Option<Bytes> {
    if samples.len() < MIN_SAMPLES {
        return None;
    }
    samples.sort_unstable();
    let key = samples[samples.len() / 2].clone();
    (key > shard.start_key && (shard.end_key.is_empty() || key < shard.end_key)).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_the_sampled_keys_splits_the_load() {
        let mut s = LoadSampler::default();
        for i in 0..10_000u32 {
            s.record(&Bytes::from(format!("k{:05}", i % 1000)));
        }
        let (ops, samples) = s.take();
        assert_eq!(ops, 10_000);
        assert_eq!(samples.len(), CAPACITY);
        let shard = ShardDescriptor {
            start_key: Bytes::from_static(b"k"),
            ..Default::default()
        };
        let key = median_split_key(samples, &shard).unwrap();
        // Uniform load over k00000..k00999: the median lands mid-range.
        assert!(key > Bytes::from_static(b"k00200") && key < Bytes::from_static(b"k00800"));
        // One hot key at the shard's start cannot split it.
        let hot = vec![Bytes::from_static(b"k"); 32];
        assert_eq!(median_split_key(hot, &shard), None);
        assert_eq!(s.take().0, 0);
    }
}
