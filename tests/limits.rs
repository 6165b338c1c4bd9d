//! Bad input gets INVALID_ARGUMENT naming the field and the limit, and
//! nothing is written. Requests go through raw gRPC, as any client's would.

use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::kv::kv_client::KvClient;
use flotilla_proto::kv::*;
use flotilla_test_cluster::TestCluster;
use tonic::Code;

fn b(s: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(s.as_ref())
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, needle: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            assert!(
                s.message().contains(needle),
                "message {:?} should mention {needle:?}",
                s.message()
            );
        }
        Ok(r) => panic!("expected INVALID_ARGUMENT mentioning {needle}, got {r:?}"),
    }
}

/// The context naming `shard` as the client last saw it.
fn context_of(shard: &flotilla_proto::meta::ShardDescriptor) -> ShardContext {
    ShardContext {
        shard_id: shard.id,
        epoch: shard.epoch,
        replica_id: 0,
        read_mode: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_over_a_limit_are_refused_and_write_nothing() {
    let c = TestCluster::builder(1)
        .shards(1)
        .configure(|cfg| {
            cfg.limits.max_key_size_bytes = 16;
            cfg.limits.max_value_size_bytes = 64;
            cfg.limits.max_batch_keys = 4;
            cfg.limits.max_request_size_bytes = 200;
        })
        .start()
        .await;
    c.wait_all_leaders(Duration::from_secs(20)).await;
    let client = c.client().await;
    let shard = client.list_shards().await.unwrap().remove(0).descriptor;
    let ctx = Some(context_of(&shard));
    let mut kv = KvClient::connect(format!("http://{}", c.grpc_addr(1)))
        .await
        .unwrap();

    let put = |key: Bytes, value: Bytes| PutRequest {
        context: ctx,
        key,
        value,
    };
    assert_invalid(kv.put(put(b(""), b("v"))).await, "key must not be empty");
    assert_invalid(
        kv.put(put(b([7u8; 17]), b("v"))).await,
        "limits.max-key-size-bytes = 16",
    );
    assert_invalid(
        kv.put(put(b("k"), b([1u8; 65]))).await,
        "limits.max-value-size-bytes = 64",
    );
    assert_invalid(
        kv.get(GetRequest {
            context: ctx,
            key: b(""),
        })
        .await,
        "key must not be empty",
    );
    assert_invalid(
        kv.get(GetRequest {
            context: ctx.map(|c| ShardContext { read_mode: 9, ..c }),
            key: b("k"),
        })
        .await,
        "context.read_mode: unknown value 9",
    );

    let pair = |i: u8| KvPair {
        key: b([b'b', i]),
        value: b("v"),
    };
    assert_invalid(
        kv.batch_put(BatchPutRequest {
            context: ctx,
            pairs: (0..5).map(pair).collect(),
        })
        .await,
        "limits.max-batch-keys = 4",
    );
    assert_invalid(
        kv.batch_put(BatchPutRequest {
            context: ctx,
            pairs: vec![],
        })
        .await,
        "pairs must not be empty",
    );
    assert_invalid(
        kv.batch_get(BatchGetRequest {
            context: ctx,
            keys: (0..5).map(|i| b([i])).collect(),
        })
        .await,
        "limits.max-batch-keys = 4",
    );
    // Four pairs with 60-byte values fit every per-item limit but not the
    // 200-byte request limit.
    assert_invalid(
        kv.batch_put(BatchPutRequest {
            context: ctx,
            pairs: (0..4)
                .map(|i| KvPair {
                    key: b([b'r', i]),
                    value: b([0u8; 60]),
                })
                .collect(),
        })
        .await,
        "limits.max-request-size-bytes = 200",
    );
    assert_invalid(
        kv.scan(ScanRequest {
            context: ctx,
            start_key: b("z"),
            end_key: b("a"),
            limit: 10,
            reverse: false,
        })
        .await,
        "start_key must not be greater than end_key",
    );
    assert_invalid(
        kv.delete_range(DeleteRangeRequest {
            context: ctx,
            start_key: b("z"),
            end_key: b("a"),
        })
        .await,
        "start_key must not be greater than end_key",
    );
    assert_invalid(
        kv.compare_and_swap(CompareAndSwapRequest {
            context: ctx,
            key: b("c"),
            expected_exists: false,
            expected_value: b(""),
            new_value: b([0u8; 65]),
            delete: false,
        })
        .await,
        "new_value",
    );
    assert_invalid(
        kv.put(PutRequest {
            context: None,
            key: b("k"),
            value: b("v"),
        })
        .await,
        "context",
    );

    // Nothing of the refused requests was written.
    let all = client.scan(b(""), b(""), 100, false).await.unwrap();
    assert!(all.is_empty(), "refused requests wrote {all:?}");

    // A request within the limits still works.
    let r = kv.put(put(b("ok"), b("v"))).await.unwrap().into_inner();
    assert!(r.error.is_none());
    assert_eq!(client.get(b("ok")).await.unwrap(), Some(b("v")));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_errors_are_structured() {
    let c = TestCluster::builder(1).shards(2).start().await;
    c.wait_all_leaders(Duration::from_secs(20)).await;
    let client = c.client().await;
    let shards = client.list_shards().await.unwrap();
    let first = &shards[0].descriptor;
    let mut kv = KvClient::connect(format!("http://{}", c.grpc_addr(1)))
        .await
        .unwrap();
    use flotilla_proto::error::error::Kind;

    // A key of the second shard sent to the first.
    let r = kv
        .put(PutRequest {
            context: Some(context_of(first)),
            key: b([0xff]),
            value: b("v"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.error.unwrap().kind,
        Some(Kind::KeyNotInShard(_))
    ));

    // A stale epoch.
    let mut stale = first.epoch.unwrap();
    stale.version += 7;
    let r = kv
        .get(GetRequest {
            context: Some(ShardContext {
                epoch: Some(stale),
                ..context_of(first)
            }),
            key: b([0x01]),
        })
        .await
        .unwrap()
        .into_inner();
    match r.error.unwrap().kind {
        Some(Kind::EpochNotMatch(e)) => assert_eq!(e.current_shards[0].id, first.id),
        other => panic!("expected EpochNotMatch, got {other:?}"),
    }

    // An unknown shard.
    let r = kv
        .get(GetRequest {
            context: Some(ShardContext {
                shard_id: 999,
                ..context_of(first)
            }),
            key: b([0x01]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.error.unwrap().kind,
        Some(Kind::ShardNotFound(_))
    ));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_admin_requests_are_refused() {
    use flotilla_proto::admin::admin_client::AdminClient;
    use flotilla_proto::admin::{ChangeReplicasRequest, ReplicaChange, TransferLeaderRequest};
    let c = TestCluster::builder(1).shards(1).start().await;
    c.wait_all_leaders(Duration::from_secs(20)).await;
    let mut admin = AdminClient::connect(format!("http://{}", c.grpc_addr(1)))
        .await
        .unwrap();
    let change = |kind: i32, replica_id: u64, node_id: u64| ChangeReplicasRequest {
        shard_id: 1,
        changes: vec![ReplicaChange {
            kind,
            replica_id,
            node_id,
        }],
    };
    assert_invalid(
        admin
            .change_replicas(ChangeReplicasRequest {
                shard_id: 1,
                changes: vec![],
            })
            .await,
        "changes must not be empty",
    );
    assert_invalid(
        admin.change_replicas(change(42, 7, 1)).await,
        "changes[0].kind 42",
    );
    assert_invalid(
        admin.change_replicas(change(0, 0, 0)).await,
        "changes[0] needs replica_id or node_id",
    );
    assert_invalid(
        admin
            .transfer_leader(TransferLeaderRequest {
                shard_id: 1,
                to_replica_id: 0,
                to_node_id: 9,
            })
            .await,
        "to_node_id 9",
    );
    let before = c.descriptor(1, 1);
    assert_eq!(before.epoch().conf_ver, 1, "nothing changed");
    c.shutdown().await;
}

/// One `BatchCommands` message mixing good and bad commands: each is
/// answered once, under its id, as its unary call would be; the bad ones
/// write nothing and do not stop the others; the stream stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_commands_are_answered_one_by_one() {
    use command::Cmd;
    use command_response::Resp;
    use flotilla_proto::error::error::Kind;
    let c = TestCluster::builder(1)
        .shards(1)
        .configure(|cfg| cfg.limits.max_key_size_bytes = 16)
        .start()
        .await;
    c.wait_all_leaders(Duration::from_secs(20)).await;
    let client = c.client().await;
    let shard = client.list_shards().await.unwrap().remove(0).descriptor;
    let ctx = Some(context_of(&shard));
    let mut stale = shard.epoch.unwrap();
    stale.version += 3;
    let put = |key: &[u8], context| {
        Some(Cmd::Put(PutRequest {
            context,
            key: b(key),
            value: b("v"),
        }))
    };
    let (requests, requests_rx) = tokio::sync::mpsc::channel(4);
    let mut kv = KvClient::connect(format!("http://{}", c.grpc_addr(1)))
        .await
        .unwrap();
    let mut answers = kv
        .batch_commands(tokio_stream::wrappers::ReceiverStream::new(requests_rx))
        .await
        .unwrap()
        .into_inner();
    let commands = vec![
        Command {
            id: 1,
            cmd: put(b"a", ctx),
        },
        Command {
            id: 2,
            cmd: put(&[7u8; 17], ctx),
        },
        Command { id: 3, cmd: None },
        Command {
            id: 4,
            cmd: put(
                b"b",
                ctx.map(|c| ShardContext {
                    epoch: Some(stale),
                    ..c
                }),
            ),
        },
        Command {
            id: 5,
            cmd: put(b"c", ctx),
        },
    ];
    requests
        .send(BatchCommandsRequest { commands })
        .await
        .unwrap();
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 5 {
        let m = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("answers within 10 s")
            .unwrap()
            .expect("the stream stays open");
        for r in m.responses {
            assert!(
                got.insert(r.id, r.resp).is_none(),
                "id {} answered twice",
                r.id
            );
        }
    }
    let ok = |r: &Option<Resp>| matches!(r, Some(Resp::Put(p)) if p.error.is_none());
    assert!(ok(&got[&1]) && ok(&got[&5]), "{got:?}");
    let invalid = |r: &Option<Resp>, needle: &str| match r {
        Some(Resp::Status(s)) => {
            s.code == Code::InvalidArgument as i32 && s.message.contains(needle)
        }
        _ => false,
    };
    assert!(
        invalid(&got[&2], "limits.max-key-size-bytes = 16"),
        "{got:?}"
    );
    assert!(invalid(&got[&3], "no request set"), "{got:?}");
    assert!(
        matches!(&got[&4], Some(Resp::Put(p)) if matches!(
            p.error.as_ref().and_then(|e| e.kind.as_ref()),
            Some(Kind::EpochNotMatch(_))
        )),
        "{got:?}"
    );

    // The same stream serves the next message; only a and c were written.
    requests
        .send(BatchCommandsRequest {
            commands: vec![Command {
                id: 6,
                cmd: Some(Cmd::Scan(ScanRequest {
                    context: ctx,
                    start_key: b(""),
                    end_key: b(""),
                    limit: 100,
                    reverse: false,
                })),
            }],
        })
        .await
        .unwrap();
    let m = answers.message().await.unwrap().unwrap();
    match &m.responses[..] {
        [CommandResponse {
            id: 6,
            resp: Some(Resp::Scan(s)),
        }] => {
            let keys: Vec<_> = s.pairs.iter().map(|p| p.key.clone()).collect();
            assert_eq!(keys, vec![b("a"), b("c")]);
        }
        other => panic!("expected the scan's answer, got {other:?}"),
    }
    // Closing the request side ends the answers.
    drop(requests);
    assert!(answers.message().await.unwrap().is_none());
    c.shutdown().await;
}

/// The client's unary mode (`batch_commands: false`) and its default
/// batched mode read each other's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unary_and_batched_clients_agree() {
    let c = TestCluster::builder(1).shards(2).start().await;
    c.wait_all_leaders(Duration::from_secs(20)).await;
    let batched = c.client().await;
    let unary = flotilla_client::Client::connect(flotilla_client::ClientConfig {
        endpoints: vec![c.grpc_addr(1)],
        batch_commands: false,
        ..Default::default()
    })
    .await
    .unwrap();
    unary.put(b("u"), b("1")).await.unwrap();
    batched.put(b([0xf0]), b("2")).await.unwrap();
    assert_eq!(batched.get(b("u")).await.unwrap(), Some(b("1")));
    assert_eq!(unary.get(b([0xf0])).await.unwrap(), Some(b("2")));
    let cas = unary
        .compare_and_swap(b("u"), Some(b("1")), Some(b("3")))
        .await
        .unwrap();
    assert!(cas.succeeded);
    assert_eq!(
        batched.scan(b(""), b(""), 10, false).await.unwrap().len(),
        2
    );
    assert_eq!(batched.get(b("u")).await.unwrap(), Some(b("3")));
    c.shutdown().await;
}
