//! The status HTTP server: `/health` (the process answers), `/ready` (every
//! local replica knows its leader), `/metrics` (Prometheus text format, the
//! default registry: Flotilla's metrics, raft-engine's and the process
//! collector's) and `/status` (JSON summary of the node).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus::Encoder;
use serde::Serialize;

use crate::service::NodeContext;

pub fn router(ctx: Arc<NodeContext>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(ctx)
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    replicas: usize,
    replicas_without_leader: usize,
}

async fn ready(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    let c = ctx.router.meta().counts();
    let ready = c.without_leader == 0;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Readiness {
            ready,
            replicas: c.replicas,
            replicas_without_leader: c.without_leader,
        }),
    )
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    crate::metrics::update_storage(&ctx.kv, &ctx.cfg.server.data_dir);
    let encoder = prometheus::TextEncoder::new();
    let mut buf = Vec::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(header::CONTENT_TYPE, encoder.format_type().to_string())],
        buf,
    )
        .into_response()
}

/// What `/status` shows and `Admin.NodeStatus` (behind `flotilla-ctl
/// cluster status`) answers: one source for both.
#[derive(Serialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub address: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub shards: usize,
    pub leaders: usize,
    pub shards_without_leader: usize,
    pub replicas_down: usize,
    pub raft_engine_bytes: u64,
    pub rocksdb_bytes: u64,
    pub disk_available_bytes: u64,
}

impl NodeStatus {
    pub fn of(ctx: &NodeContext) -> NodeStatus {
        let c = ctx.router.meta().counts();
        NodeStatus {
            node_id: ctx.node_id,
            address: ctx.addr.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: ctx.started.elapsed().as_secs(),
            shards: c.replicas,
            leaders: c.leaders,
            shards_without_leader: c.without_leader,
            replicas_down: c.down_replicas,
            raft_engine_bytes: dir_size(&ctx.cfg.server.data_dir.join("raft")),
            rocksdb_bytes: dir_size(&ctx.cfg.server.data_dir.join("kv")),
            disk_available_bytes: ctx.disk.available(),
        }
    }
}

async fn status(State(ctx): State<Arc<NodeContext>>) -> Json<NodeStatus> {
    Json(NodeStatus::of(&ctx))
}

/// Bytes of the regular files directly under `dir` (what the engine
/// occupies on disk, preallocated space included).
pub fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
