//! The Kv gRPC service. Each handler validates its input against the limits
//! (nothing reaches Raft otherwise), sends the command or read to the
//! shard's replica, and answers with the result or a structured error.
//!
//! Reads follow the request's read mode (linearizable unless STALE): a read
//! waits until the replica allows it (leader lease, or a ReadIndex
//! confirmation and the replica applied up to it; see
//! `flotilla_raftstore::replica::read`), then reads a RocksDB snapshot taken
//! at that moment.

use std::sync::Arc;

use bytes::Bytes;
use flotilla_proto::kv::kv_server::Kv;
use flotilla_proto::kv::*;
use flotilla_proto::raftcmd::{self, op, Op, WriteCommand};
use flotilla_raftstore::KeySpan;
use flotilla_storage::CF_DEFAULT;
use tonic::{Request, Response, Status};

use crate::limits;
use crate::service::{require_context, HandlerError, NodeContext};

pub struct KvService {
    ctx: Arc<NodeContext>,
}

impl KvService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        KvService { ctx }
    }
}

fn one_op(op: op::Op) -> WriteCommand {
    WriteCommand {
        ops: vec![Op { op: Some(op) }],
    }
}

fn internal(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Status(Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let c = &self.ctx;
        c.run("Get", async {
            let r = req.into_inner();
            let l = &c.cfg.limits;
            limits::check_key(l, "key", &r.key)?;
            let ctx = require_context(r.context)?;
            let (snap, _) = c
                .read_barrier(&ctx, vec![KeySpan::Point(r.key.clone())])
                .await?;
            let value = snap.get(CF_DEFAULT, &r.key).map_err(internal)?;
            Ok(GetResponse {
                error: None,
                found: value.is_some(),
                value: value.map(Bytes::from).unwrap_or_default(),
            })
        })
        .await
    }

    async fn batch_get(
        &self,
        req: Request<BatchGetRequest>,
    ) -> Result<Response<BatchGetResponse>, Status> {
        let c = &self.ctx;
        c.run("BatchGet", async {
            let r = req.into_inner();
            let l = &c.cfg.limits;
            limits::check_request_size(l, &r)?;
            limits::check_batch(l, "keys", r.keys.len())?;
            for k in &r.keys {
                limits::check_key(l, "keys[]", k)?;
            }
            let ctx = require_context(r.context)?;
            let spans = r.keys.iter().cloned().map(KeySpan::Point).collect();
            let (snap, _) = c.read_barrier(&ctx, spans).await?;
            let pairs = tokio::task::spawn_blocking(move || {
                let mut pairs = Vec::new();
                for k in r.keys {
                    if let Some(v) = snap.get(CF_DEFAULT, &k)? {
                        pairs.push(KvPair {
                            key: k,
                            value: v.into(),
                        });
                    }
                }
                Ok::<_, flotilla_storage::Error>(pairs)
            })
            .await
            .map_err(internal)?
            .map_err(internal)?;
            Ok(BatchGetResponse { error: None, pairs })
        })
        .await
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let c = &self.ctx;
        c.run("Put", async {
            let r = req.into_inner();
            let l = &c.cfg.limits;
            limits::check_request_size(l, &r)?;
            limits::check_key(l, "key", &r.key)?;
            limits::check_value(l, "value", &r.value)?;
            let cmd = one_op(op::Op::Put(raftcmd::Put {
                key: r.key,
                value: r.value,
            }));
            c.propose(r.context, cmd).await?;
            Ok(PutResponse::default())
        })
        .await
    }

    async fn batch_put(
        &self,
        req: Request<BatchPutRequest>,
    ) -> Result<Response<BatchPutResponse>, Status> {
        let c = &self.ctx;
        c.run("BatchPut", async {
            let r = req.into_inner();
            let l = &c.cfg.limits;
            limits::check_request_size(l, &r)?;
            limits::check_batch(l, "pairs", r.pairs.len())?;
            for p in &r.pairs {
                limits::check_key(l, "pairs[].key", &p.key)?;
                limits::check_value(l, "pairs[].value", &p.value)?;
            }
            let ops = r
                .pairs
                .into_iter()
                .map(|p| Op {
                    op: Some(op::Op::Put(raftcmd::Put {
                        key: p.key,
                        value: p.value,
                    })),
                })
                .collect();
            c.propose(r.context, WriteCommand { ops }).await?;
            Ok(BatchPutResponse::default())
        })
        .await
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let c = &self.ctx;
        c.run("Delete", async {
            let r = req.into_inner();
            limits::check_key(&c.cfg.limits, "key", &r.key)?;
            let cmd = one_op(op::Op::Delete(raftcmd::Delete { key: r.key }));
            c.propose(r.context, cmd).await?;
            Ok(DeleteResponse::default())
        })
        .await
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let c = &self.ctx;
        c.run("DeleteRange", async {
            let r = req.into_inner();
            let l = &c.cfg.limits;
            limits::check_bound(l, "start_key", &r.start_key)?;
            limits::check_bound(l, "end_key", &r.end_key)?;
            limits::check_range(&r.start_key, &r.end_key)?;
            let cmd = one_op(op::Op::DeleteRange(raftcmd::DeleteRange {
                start_key: r.start_key,
                end_key: r.end_key,
            }));
            c.propose(r.context, cmd).await?;
            Ok(DeleteRangeResponse::default())
        })
        .await
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let c = &self.ctx;
        c.run("Scan", async {
            let r = req.into_inner();
            let l = &c.cfg.limits;
            limits::check_bound(l, "start_key", &r.start_key)?;
            limits::check_bound(l, "end_key", &r.end_key)?;
            limits::check_range(&r.start_key, &r.end_key)?;
            let ctx = require_context(r.context)?;
            let span = KeySpan::Range {
                start: r.start_key.clone(),
                end: r.end_key.clone(),
            };
            let (snap, shard_end) = c.read_barrier(&ctx, vec![span]).await?;
            let end = if r.end_key.is_empty() {
                shard_end
            } else {
                r.end_key
            };
            let limit = match r.limit {
                0 => l.max_scan_limit,
                n => n.min(l.max_scan_limit),
            } as usize;
            let (pairs, more) = tokio::task::spawn_blocking(move || {
                snap.scan(CF_DEFAULT, &r.start_key, &end, limit, r.reverse)
            })
            .await
            .map_err(internal)?
            .map_err(internal)?;
            Ok(ScanResponse {
                error: None,
                pairs: pairs
                    .into_iter()
                    .map(|(k, v)| KvPair {
                        key: k.into(),
                        value: v.into(),
                    })
                    .collect(),
                more,
            })
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        req: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let c = &self.ctx;
        c.run("CompareAndSwap", async {
            let r = req.into_inner();
            let l = &c.cfg.limits;
            limits::check_request_size(l, &r)?;
            limits::check_key(l, "key", &r.key)?;
            limits::check_value(l, "expected_value", &r.expected_value)?;
            limits::check_value(l, "new_value", &r.new_value)?;
            let cmd = one_op(op::Op::Cas(raftcmd::Cas {
                key: r.key,
                expected_exists: r.expected_exists,
                expected_value: r.expected_value,
                new_value: r.new_value,
                delete: r.delete,
            }));
            let result = c.propose(r.context, cmd).await?;
            let outcome = result.cas.into_iter().next().unwrap_or_default();
            Ok(CompareAndSwapResponse {
                error: None,
                succeeded: outcome.succeeded,
                previous_exists: outcome.previous.is_some(),
                previous_value: outcome.previous.unwrap_or_default(),
            })
        })
        .await
    }
}
