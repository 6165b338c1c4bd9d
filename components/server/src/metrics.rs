//! gRPC metrics, by method and outcome code; storage gauges read from
//! RocksDB properties and the data directory when `/metrics` is scraped.

use std::sync::LazyLock;

use flotilla_storage::KvEngine;
use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
};

pub static META_IDS_ALLOCATED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_meta_ids_allocated_total",
        "Shard and replica ids handed out by the meta shard while this node led it."
    )
    .unwrap()
});

pub static META_DIRECTORY_UPDATES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_meta_directory_updates_total",
        "Shard descriptors that replaced older ones in the meta shard's directory, written by this node."
    )
    .unwrap()
});

pub static PD_OPERATORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_pd_operators_total",
        "Operators of the placement driver run while this node led the meta shard, by kind \
         (add-replica, remove-replica, move-replica, transfer-leader) and event (started, done, \
         failed, timed-out).",
        &["kind", "event"]
    )
    .unwrap()
});

pub static META_HEARTBEATS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_meta_heartbeats_total",
        "This node's heartbeats to the meta shard (report led shards, refresh the directory), by result (ok, failed).",
        &["result"]
    )
    .unwrap()
});

pub static META_REGISTRY_CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_meta_registry_checks_total",
        "On the meta leader: node heartbeats' registry checks, by how they were answered (read: a linearizable read of the meta shard, which wakes it; cached: what this leader last read, unchanged since).",
        &["answer"]
    )
    .unwrap()
});

pub static GRPC_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_grpc_requests_total",
        "gRPC requests by method and outcome (ok, a routing error kind, or a gRPC status code).",
        &["method", "code"]
    )
    .unwrap()
});

pub static GRPC_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "flotilla_grpc_request_duration_seconds",
        "gRPC request latency by method.",
        &["method"],
        prometheus::exponential_buckets(0.00005, 2.0, 20).unwrap()
    )
    .unwrap()
});

pub static BATCH_COMMANDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_grpc_batch_commands",
        "Commands per BatchCommands request message (how much clients batch).",
        prometheus::exponential_buckets(1.0, 2.0, 12).unwrap()
    )
    .unwrap()
});

pub static BATCH_RESPONSES: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_grpc_batch_responses",
        "Answers per BatchCommands response message (how much the node batches).",
        prometheus::exponential_buckets(1.0, 2.0, 12).unwrap()
    )
    .unwrap()
});

pub static PLACEMENT_OPERATORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_placement_operators_total",
        "Placement operations asked of this node's leaders, by type (change_replicas, \
         transfer_leader, split, auto_split) and outcome (ok, not_leader, rejected, error).",
        &["type", "outcome"]
    )
    .unwrap()
});

/// Counts one placement operation by its gRPC outcome.
pub fn placement_operator<T>(kind: &str, r: &Result<T, tonic::Status>) {
    let outcome = match r {
        Ok(_) => "ok",
        Err(s)
            if s.metadata()
                .contains_key(flotilla_proto::NOT_LEADER_METADATA) =>
        {
            "not_leader"
        }
        Err(s) if s.code() == tonic::Code::FailedPrecondition => "rejected",
        Err(_) => "error",
    };
    PLACEMENT_OPERATORS
        .with_label_values(&[kind, outcome])
        .inc();
}

pub static STORAGE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "flotilla_storage_bytes",
        "Bytes held by the storage engines, by part: raft_engine_files (the log directory), \
         rocksdb_sst_files, rocksdb_live_data (estimate), rocksdb_memtables, \
         rocksdb_pending_compaction (estimated bytes compaction must still rewrite).",
        &["part"]
    )
    .unwrap()
});

pub static ROCKSDB_STALL: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "flotilla_rocksdb_write_stall",
        "RocksDB write stalls now: stopped (1 when writes are stopped), \
         delayed_rate_bytes_per_second (the throttled write rate, 0 when not delayed), \
         running_compactions.",
        &["kind"]
    )
    .unwrap()
});

/// Reads the storage gauges; called on every scrape.
pub fn update_storage(kv: &KvEngine, data_dir: &std::path::Path) {
    let raft = crate::status::dir_size(&data_dir.join("raft"));
    STORAGE
        .with_label_values(&["raft_engine_files"])
        .set(raft as i64);
    for (part, property) in [
        ("rocksdb_sst_files", "rocksdb.total-sst-files-size"),
        ("rocksdb_live_data", "rocksdb.estimate-live-data-size"),
        ("rocksdb_memtables", "rocksdb.cur-size-all-mem-tables"),
        (
            "rocksdb_pending_compaction",
            "rocksdb.estimate-pending-compaction-bytes",
        ),
    ] {
        STORAGE
            .with_label_values(&[part])
            .set(kv.property_sum(property) as i64);
    }
    let db = kv.db();
    let int = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0) as i64;
    ROCKSDB_STALL
        .with_label_values(&["stopped"])
        .set(int("rocksdb.is-write-stopped"));
    ROCKSDB_STALL
        .with_label_values(&["delayed_rate_bytes_per_second"])
        .set(int("rocksdb.actual-delayed-write-rate"));
    ROCKSDB_STALL
        .with_label_values(&["running_compactions"])
        .set(int("rocksdb.num-running-compactions"));
}

/// Registers every metric of this module now, so /metrics lists them
/// (at zero) before first use.
pub fn register() {
    for method in [
        "Get",
        "BatchGet",
        "Put",
        "BatchPut",
        "Delete",
        "DeleteRange",
        "Scan",
        "CompareAndSwap",
    ] {
        GRPC_REQUESTS.with_label_values(&[method, "ok"]);
        GRPC_DURATION.with_label_values(&[method]);
    }
    LazyLock::force(&GRPC_DURATION);
    LazyLock::force(&STORAGE);
    LazyLock::force(&META_IDS_ALLOCATED);
    for kind in [
        "add-replica",
        "remove-replica",
        "move-replica",
        "transfer-leader",
    ] {
        for event in ["started", "done", "failed", "timed-out"] {
            PD_OPERATORS.with_label_values(&[kind, event]);
        }
    }
    LazyLock::force(&META_DIRECTORY_UPDATES);
    for result in ["ok", "failed"] {
        META_HEARTBEATS.with_label_values(&[result]);
    }
    for answer in ["read", "cached"] {
        META_REGISTRY_CHECKS.with_label_values(&[answer]);
    }
    for kind in ["change_replicas", "transfer_leader", "split", "auto_split"] {
        for outcome in ["ok", "not_leader", "rejected", "error"] {
            PLACEMENT_OPERATORS.with_label_values(&[kind, outcome]);
        }
    }
    LazyLock::force(&ROCKSDB_STALL);
}
