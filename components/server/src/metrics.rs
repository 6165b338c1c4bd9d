//! gRPC metrics, by method and outcome code.

use std::sync::LazyLock;

use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};

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

/// Registers every metric of this module now, so /metrics lists them
/// (at zero) before first use.
pub fn register() {
    LazyLock::force(&GRPC_REQUESTS);
    LazyLock::force(&GRPC_DURATION);
}
