//! raft-rs logs through slog; this drain forwards its records to `tracing`
//! (target `raft`) with the record's key-value pairs appended. raft-rs's
//! chatty info records (elections, role changes) become debug events: with
//! thousands of shards they would drown the node's log. The raftstore logs
//! the role changes that matter itself, at info, with shard and replica ids.

use std::fmt::Write as _;

use slog::{Drain, Key, OwnedKVList, Record, Serializer, KV};

struct KvFormatter(String);

impl Serializer for KvFormatter {
    fn emit_arguments(&mut self, key: Key, val: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

pub struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut kv = KvFormatter(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info | slog::Level::Debug => {
                tracing::debug!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

/// A slog logger for one replica.
pub fn replica_logger(shard_id: u64, replica_id: u64) -> slog::Logger {
    slog::Logger::root(
        TracingDrain.fuse(),
        slog::o!("shard_id" => shard_id, "replica_id" => replica_id),
    )
}
