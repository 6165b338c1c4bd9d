//! Errors of the storage layer.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("rocksdb: {0}")]
    RocksDb(#[from] rocksdb::Error),
    #[error("raft-engine: {0}")]
    RaftEngine(#[from] raft_engine::Error),
    #[error("corrupt record {what}: {detail}")]
    Corruption { what: String, detail: String },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Corruption {
            what: "protobuf".into(),
            detail: e.to_string(),
        }
    }
}
