//! Snapshot transfer: one client-streaming `Snapshot` call per snapshot,
//! apart from the raft message streams so heartbeats never queue behind a
//! file.
//!
//! ```text
//! sender                                   receiver
//! SnapshotHeader{MsgSnapshot, file_size} ──► check, open rev_*.sst.tmp
//! data chunks (chunk size, rate limit)   ──► append
//! end of stream                          ──► size + CRC32 check, fsync, rename,
//!                                            fsync dir, then step MsgSnapshot
//!                                     ◄── Done (or an error status)
//! ```
//!
//! Sends and receives are each limited to a number in flight per node; a
//! send has a total timeout. Whatever happens, the sending replica hears
//! the outcome (`report_snapshot`), as raft-rs requires.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_proto::local::SnapshotData;
use flotilla_proto::raft::raft_client::RaftClient as GrpcRaftClient;
use flotilla_proto::raft::{snapshot_chunk, SnapshotChunk, SnapshotHeader};
use flotilla_proto::Message as _;
use flotilla_raftstore::metrics as store_metrics;
use flotilla_raftstore::{RaftMessage, StoreRouter};
use flotilla_storage::snap::sync_dir;
use flotilla_storage::SnapManager;
use protobuf::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// Limits of snapshot transfer.
#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    pub max_concurrent_send: usize,
    pub max_concurrent_recv: usize,
    pub chunk_bytes: usize,
    pub send_timeout: Duration,
    /// Upper bound on one node's sending rate, bytes/s (0 = unlimited).
    pub max_send_bytes_per_sec: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            max_concurrent_send: 4,
            max_concurrent_recv: 4,
            chunk_bytes: 1 << 20,
            send_timeout: Duration::from_secs(600),
            max_send_bytes_per_sec: 100 << 20,
        }
    }
}

fn snapshot_data(msg: &raft::eraftpb::Message) -> Result<SnapshotData, String> {
    SnapshotData::decode(&msg.get_snapshot().data[..]).map_err(|e| e.to_string())
}

/// Streams one snapshot to `addr`. Returns the bytes sent.
pub(crate) async fn send(
    cfg: &SnapshotConfig,
    mgr: &SnapManager,
    channel: tonic::transport::Channel,
    msg: &RaftMessage,
    envelope: flotilla_proto::raft::RaftEnvelope,
) -> Result<u64, String> {
    let meta = msg.msg.get_snapshot().get_metadata();
    let data = snapshot_data(&msg.msg)?;
    let path = mgr.gen_path(msg.shard_id, meta.term, meta.index);
    let mut client = GrpcRaftClient::new(channel)
        .max_encoding_message_size(cfg.chunk_bytes + (1 << 20))
        .max_decoding_message_size(1 << 20);
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let call = tokio::spawn(async move { client.snapshot(ReceiverStream::new(rx)).await });
    let header = SnapshotChunk {
        chunk: Some(snapshot_chunk::Chunk::Header(SnapshotHeader {
            message: Some(envelope),
            file_size: data.file_size,
        })),
    };
    tx.send(header)
        .await
        .map_err(|_| "stream closed".to_string())?;
    let mut sent = 0u64;
    if data.file_size > 0 {
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let started = Instant::now();
        let mut buf = vec![0u8; cfg.chunk_bytes.max(4096)];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            let chunk = SnapshotChunk {
                chunk: Some(snapshot_chunk::Chunk::Data(Bytes::copy_from_slice(
                    &buf[..n],
                ))),
            };
            if tx.send(chunk).await.is_err() {
                break;
            }
            sent += n as u64;
            if cfg.max_send_bytes_per_sec > 0 {
                let due = Duration::from_secs_f64(sent as f64 / cfg.max_send_bytes_per_sec as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    drop(tx);
    match call.await {
        Ok(Ok(_)) => Ok(sent),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(e) => Err(e.to_string()),
    }
}

/// Receives one snapshot, makes its file durable, then hands the
/// MsgSnapshot to the replica.
pub(crate) async fn receive(
    node_id: u64,
    mgr: &SnapManager,
    router: &StoreRouter,
    sem: &Arc<Semaphore>,
    mut stream: Streaming<SnapshotChunk>,
) -> Result<(), Status> {
    let _permit = sem.clone().try_acquire_owned().map_err(|_| {
        Status::resource_exhausted(
            "too many snapshots being received (raftstore.snap-max-concurrent-recv)",
        )
    })?;
    let started = Instant::now();
    let header = match stream.message().await?.and_then(|c| c.chunk) {
        Some(snapshot_chunk::Chunk::Header(h)) => h,
        _ => {
            return Err(Status::invalid_argument(
                "a snapshot stream starts with its header",
            ))
        }
    };
    let env = header
        .message
        .ok_or_else(|| Status::invalid_argument("snapshot header without a message"))?;
    if env.to_node != node_id {
        return Err(Status::invalid_argument(format!(
            "snapshot for node {}, this is node {node_id}",
            env.to_node
        )));
    }
    let msg = raft::eraftpb::Message::parse_from_bytes(&env.message)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
    let data = snapshot_data(&msg).map_err(Status::invalid_argument)?;
    if data.file_size != header.file_size {
        return Err(Status::invalid_argument(
            "snapshot header and data disagree on the size",
        ));
    }
    let meta = msg.get_snapshot().get_metadata();
    let path = mgr.recv_path(env.shard_id, meta.term, meta.index);
    if data.file_size > 0 {
        write_file(&path, data.file_size, &mut stream).await?;
        mgr.verify(&path, &data)
            .map_err(|e| Status::data_loss(e.to_string()))?;
    }
    store_metrics::SNAPSHOT_BYTES
        .with_label_values(&["received"])
        .inc_by(data.file_size);
    store_metrics::SNAPSHOT_DURATION
        .with_label_values(&["receive"])
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(
        shard_id = env.shard_id,
        from_node = env.from_node,
        index = meta.index,
        bytes = data.file_size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot received"
    );
    router.raft_message(RaftMessage {
        shard_id: env.shard_id,
        from_node: env.from_node,
        to_node: env.to_node,
        from_replica: env.from_replica,
        to_replica: env.to_replica,
        epoch: env.epoch.unwrap_or_default(),
        msg,
        extra: None,
    });
    Ok(())
}

async fn write_file(
    path: &Path,
    size: u64,
    stream: &mut Streaming<SnapshotChunk>,
) -> Result<(), Status> {
    let io =
        |what: &str, e: std::io::Error| Status::internal(format!("{what} {}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| io("creating", e))?;
    let mut written = 0u64;
    while let Some(chunk) = stream.message().await? {
        let Some(snapshot_chunk::Chunk::Data(d)) = chunk.chunk else {
            return Err(Status::invalid_argument("a snapshot has one header"));
        };
        written += d.len() as u64;
        if written > size {
            return Err(Status::invalid_argument(
                "more snapshot data than announced",
            ));
        }
        file.write_all(&d).await.map_err(|e| io("writing", e))?;
    }
    if written != size {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(Status::aborted(format!(
            "snapshot stream ended after {written} of {size} bytes"
        )));
    }
    file.sync_all().await.map_err(|e| io("syncing", e))?;
    drop(file);
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(|e| io("renaming", e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(|e| Status::internal(e.to_string()))?;
    }
    Ok(())
}
