//! Storage metrics. raft-engine registers its own metrics (prefixed
//! `raft_engine_`) in the same default registry.

use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_int_counter, register_int_gauge, Histogram, IntCounter, IntGauge,
};

pub static RAFT_LOG_WRITE_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_raft_log_write_duration_seconds",
        "Duration of one raft-engine batch write (with fsync when synced).",
        prometheus::exponential_buckets(0.0001, 2.0, 18).unwrap()
    )
    .unwrap()
});

pub static RAFT_LOG_WRITE_BYTES: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_raft_log_write_size_bytes",
        "Bytes of one raft-engine batch write.",
        prometheus::exponential_buckets(64.0, 4.0, 12).unwrap()
    )
    .unwrap()
});

/// Synced write requests. raft-engine groups concurrent writers, so the
/// number of real fsyncs is `raft_engine_sync_log_duration_seconds_count`.
pub static RAFT_LOG_SYNCED_WRITES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_raft_log_synced_writes_total",
        "raft-engine batch writes that asked for fsync."
    )
    .unwrap()
});

pub static RAFT_LOG_WRITES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "flotilla_raft_log_writes_total",
        "raft-engine batch writes."
    )
    .unwrap()
});

pub static DISK_AVAILABLE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "flotilla_disk_available_bytes",
        "Bytes available on the data directory's filesystem."
    )
    .unwrap()
});

pub static DISK_RESERVE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "flotilla_disk_reserve_bytes",
        "Free space below which client writes are refused (server.reserve-space-bytes)."
    )
    .unwrap()
});

pub static DISK_LEVEL: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "flotilla_disk_full_level",
        "0 normal, 1 almost full (client writes refused), 2 full (log appends refused too)."
    )
    .unwrap()
});

static DETAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether hot-path histograms are recorded (`server.detailed-metrics`).
/// Shared by every crate of the node.
#[inline]
pub fn detailed() -> bool {
    DETAILED.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn set_detailed(on: bool) {
    DETAILED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Registers every metric of this module now, so /metrics lists them
/// (at zero) before first use.
pub fn register() {
    LazyLock::force(&RAFT_LOG_WRITE_DURATION);
    LazyLock::force(&RAFT_LOG_WRITE_BYTES);
    LazyLock::force(&RAFT_LOG_SYNCED_WRITES);
    LazyLock::force(&RAFT_LOG_WRITES);
    LazyLock::force(&DISK_AVAILABLE);
    LazyLock::force(&DISK_LEVEL);
    LazyLock::force(&DISK_RESERVE);
}
