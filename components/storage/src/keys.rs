//! Keys of the `meta` column family. User data lives in `default` under the
//! raw user key and never collides with these.
//!
//! ```text
//! 0x01 "node"                          -> local.NodeIdent          (prost)
//! 0x02 shard_id:u64 BE 0x01            -> local.ShardLocalState    (prost)
//! 0x02 shard_id:u64 BE 0x02            -> local.ApplyState         (prost)
//! 0x03 shard_id:u64 BE                 -> meta.ShardDescriptor     (prost)
//! ```
//!
//! `0x02` records describe replicas hosted here; `0x03` is the node's view
//! of the cluster's shard directory (every shard, hosted or not), used to
//! answer routing requests. Big-endian ids keep each family ordered by shard
//! id, so start-up loads them with one forward scan.

use crate::ShardId;

/// Keys of the meta shard's data (column family `cluster`), the cluster's
/// replicated metadata:
///
/// ```text
/// "id"                 -> u64 BE: the next id never handed out (shards, replicas)
/// "n" node_id:u64 BE   -> meta.Node        (node registry)
/// "s" shard_id:u64 BE  -> meta.ShardDescriptor (shard directory, user shards)
/// ```
pub mod cluster {
    pub const NEXT_ID: &[u8] = b"id";
    pub const NODE_PREFIX: &[u8] = b"n";
    pub const NODE_END: &[u8] = b"o";
    pub const SHARD_PREFIX: &[u8] = b"s";
    pub const SHARD_END: &[u8] = b"t";

    pub fn node_key(node_id: u64) -> Vec<u8> {
        [NODE_PREFIX, &node_id.to_be_bytes()].concat()
    }

    pub fn shard_key(shard_id: u64) -> Vec<u8> {
        [SHARD_PREFIX, &shard_id.to_be_bytes()].concat()
    }
}

pub const NODE_IDENT_KEY: &[u8] = b"\x01node";

pub const SHARD_PREFIX: u8 = 0x02;
pub const SHARD_STATE_SUFFIX: u8 = 0x01;
pub const APPLY_STATE_SUFFIX: u8 = 0x02;

pub const DIRECTORY_PREFIX: u8 = 0x03;

fn shard_key(prefix: u8, shard_id: ShardId, suffix: Option<u8>) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    k.push(prefix);
    k.extend_from_slice(&shard_id.to_be_bytes());
    if let Some(s) = suffix {
        k.push(s);
    }
    k
}

pub fn shard_state_key(shard_id: ShardId) -> Vec<u8> {
    shard_key(SHARD_PREFIX, shard_id, Some(SHARD_STATE_SUFFIX))
}

pub fn apply_state_key(shard_id: ShardId) -> Vec<u8> {
    shard_key(SHARD_PREFIX, shard_id, Some(APPLY_STATE_SUFFIX))
}

pub fn directory_key(shard_id: ShardId) -> Vec<u8> {
    shard_key(DIRECTORY_PREFIX, shard_id, None)
}

/// Splits a `0x02` key into (shard id, suffix).
pub fn decode_shard_key(key: &[u8]) -> Option<(ShardId, u8)> {
    if key.len() != 10 || key[0] != SHARD_PREFIX {
        return None;
    }
    let id = u64::from_be_bytes(key[1..9].try_into().ok()?);
    Some((id, key[9]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_keys_round_trip_and_sort_by_id() {
        let a = shard_state_key(7);
        let b = apply_state_key(7);
        let c = shard_state_key(256);
        assert_eq!(decode_shard_key(&a), Some((7, SHARD_STATE_SUFFIX)));
        assert_eq!(decode_shard_key(&b), Some((7, APPLY_STATE_SUFFIX)));
        assert!(a < b && b < c);
        assert_eq!(decode_shard_key(NODE_IDENT_KEY), None);
    }
}
