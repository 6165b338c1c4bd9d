//! Transport metrics, labelled by peer node id (bounded by cluster size).

use std::sync::LazyLock;

use prometheus::{register_histogram, register_int_counter_vec, Histogram, IntCounterVec};

pub static MESSAGES_SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_transport_messages_sent_total",
        "Raft messages written to a peer stream, by peer node.",
        &["to_node"]
    )
    .unwrap()
});

pub static MESSAGES_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_transport_messages_dropped_total",
        "Raft messages dropped before reaching a peer, by peer node and reason.",
        &["to_node", "reason"]
    )
    .unwrap()
});

pub static MESSAGES_RECEIVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_transport_messages_received_total",
        "Raft messages received from peers, by peer node.",
        &["from_node"]
    )
    .unwrap()
});

pub static BATCH_SIZE: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "flotilla_transport_batch_messages",
        "Raft messages per batch sent on a peer stream.",
        prometheus::exponential_buckets(1.0, 2.0, 14).unwrap()
    )
    .unwrap()
});

pub static RECONNECTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_transport_connects_total",
        "Attempts to open a peer stream, by peer node and outcome.",
        &["to_node", "outcome"]
    )
    .unwrap()
});

pub static BACKOFFS_CUT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "flotilla_transport_backoffs_cut_total",
        "Reconnect back-offs cut short because the peer opened a stream to this node, by peer node.",
        &["to_node"]
    )
    .unwrap()
});

/// Registers every metric of this module now, so /metrics lists them
/// (at zero) before first use.
pub fn register() {
    LazyLock::force(&MESSAGES_SENT);
    LazyLock::force(&MESSAGES_DROPPED);
    LazyLock::force(&MESSAGES_RECEIVED);
    LazyLock::force(&BATCH_SIZE);
    LazyLock::force(&RECONNECTS);
    LazyLock::force(&BACKOFFS_CUT);
}
