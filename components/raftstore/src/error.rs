//! Errors of the raftstore. Routing errors tell a client how to fix its
//! route; the rest say whether the command is known not to have applied.

use flotilla_proto::meta::{Replica, ShardDescriptor};
use thiserror::Error;

use crate::ShardId;

#[derive(Debug, Error, Clone)]
pub enum Error {
    #[error("replica of shard {shard_id} is not the leader (leader: {leader:?})")]
    NotLeader {
        shard_id: ShardId,
        leader: Option<Replica>,
    },
    #[error("epoch not match: shard {shard_id} is now at {current:?}")]
    EpochNotMatch {
        shard_id: ShardId,
        current: Vec<ShardDescriptor>,
    },
    #[error("shard {0} not found on this node")]
    ShardNotFound(ShardId),
    #[error("key {key:?} is not in shard {shard_id} [{start:?}, {end:?})")]
    KeyNotInShard {
        key: Vec<u8>,
        shard_id: ShardId,
        start: Vec<u8>,
        end: Vec<u8>,
    },
    #[error("server is busy: {0}")]
    ServerIsBusy(String),
    /// The command was definitely not applied (its entry was overwritten, or
    /// it never reached the log). Safe to retry.
    #[error("stale command: {0}")]
    StaleCommand(String),
    /// The command may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// An admin command refused as given (deterministically, on every
    /// replica); retrying it unchanged fails the same way.
    #[error("refused: {0}")]
    Rejected(String),
    #[error("node is shutting down")]
    Shutdown,
    #[error("storage: {0}")]
    Storage(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn key_not_in_shard(key: &[u8], shard: &ShardDescriptor) -> Self {
        Error::KeyNotInShard {
            key: key.to_vec(),
            shard_id: shard.id,
            start: shard.start_key.to_vec(),
            end: shard.end_key.to_vec(),
        }
    }

    /// A request under an older version: names `shard` and the shard its
    /// last split created, so a client learns both halves of its old range.
    pub fn epoch_not_match(shard: &ShardDescriptor, split_off: Option<&ShardDescriptor>) -> Self {
        let mut current = vec![shard.clone()];
        current.extend(split_off.cloned());
        Error::EpochNotMatch {
            shard_id: shard.id,
            current,
        }
    }

    /// Whether a client should refresh its route or back off and retry.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. }
                | Error::EpochNotMatch { .. }
                | Error::ShardNotFound(_)
                | Error::KeyNotInShard { .. }
                | Error::ServerIsBusy(_)
                | Error::StaleCommand(_)
        )
    }
}

impl From<flotilla_storage::Error> for Error {
    fn from(e: flotilla_storage::Error) -> Self {
        Error::Storage(e.to_string())
    }
}
