//! Crashes at the moments between two writes, injected with fail points
//! into real server processes (`FAILPOINTS=name=action`; a panic there
//! aborts the process like a power cut). After a restart every shard is
//! consistent: replicas hash equal, every acknowledged write is present and
//! no CompareAndSwap increment was applied twice. Also: a failed fsync stops
//! the node, and a torn raft-engine tail is tolerated.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::workload::{key, spawn_workload, verify, History};
use common::ProcCluster;
use flotilla_test_cluster::put_acked;

use common::SMALL_LOGS;

/// Node 3 runs with `failpoint` armed under load until it crashes there,
/// restarts clean, and the cluster must be consistent.
async fn crash_at(failpoint: &str) {
    let mut cluster = ProcCluster::new(3, 4, SMALL_LOGS);
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let tasks = spawn_workload(&client, 6, stop.clone(), history.clone());

    cluster.nodes[2].kill9();
    cluster.nodes[2].start_with(&[("FAILPOINTS", failpoint)]);
    let status = cluster.nodes[2].wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "node 3 should have crashed at {failpoint}"
    );
    assert!(
        cluster.nodes[2].log_text().contains("fatal"),
        "the crash is logged"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[2].start();
    cluster.nodes[2].wait_ready(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let history = std::mem::take(&mut *history.lock().unwrap());
    assert!(history.puts.len() > 100, "the workload made progress");
    verify(&client, &history).await;
    common::assert_replicas_identical(&mut cluster, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_the_raft_log_write_and_apply() {
    crash_at("raft_after_log_write=400*off->panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_before_the_apply_write() {
    crash_at("apply_before_write=300*off->panic").await;
}

/// Node 3 misses enough of the log to need a snapshot, and crashes while
/// installing it at `failpoint`; the restart finishes the install.
async fn crash_installing_a_snapshot(failpoint: &str) {
    let mut cluster = ProcCluster::new(3, 2, SMALL_LOGS);
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    for i in 0..50u64 {
        client.put(key(i), Bytes::from("before")).await.unwrap();
    }
    cluster.nodes[2].kill9();
    // One write at a time: one log entry each, far past the count limit.
    let mut acked = Vec::new();
    for i in 50..700u64 {
        let v = Bytes::from(format!("v{i}"));
        // (A put on a connection to the killed node may be Indeterminate.)
        put_acked(&client, key(i), v.clone()).await;
        acked.push((key(i), v));
    }
    // Give the leaders a few GC rounds to truncate.
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.nodes[2].start_with(&[("FAILPOINTS", failpoint)]);
    let status = cluster.nodes[2].wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "node 3 should have crashed at {failpoint}"
    );
    cluster.nodes[2].start();
    cluster.nodes[2].wait_ready(Duration::from_secs(60));
    let history = History {
        puts: acked,
        ..Default::default()
    };
    verify(&client, &history).await;
    common::assert_replicas_identical(&mut cluster, &client).await;
    assert!(
        cluster.nodes[2]
            .log_text()
            .contains("finishing a snapshot install interrupted by a restart"),
        "the restart finished the interrupted install"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_clearing_the_range_for_a_snapshot() {
    crash_installing_a_snapshot("snapshot_after_clear=panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_ingest_and_the_apply_state_update() {
    crash_installing_a_snapshot("snapshot_after_ingest=panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fsync_stops_the_node() {
    let mut cluster = ProcCluster::new(3, 2, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    cluster.nodes[0].kill9();
    cluster.nodes[0].start_with(&[("FAILPOINTS", "log_fd::sync::err=20*off->return")]);
    for i in 0..300u64 {
        // A put in flight when the node stops has an unknown outcome.
        match client.put(key(i), Bytes::from("x")).await {
            Ok(()) => {}
            Err(e) if e.is_indeterminate() => {}
            Err(e) => panic!("put: {e}"),
        }
        if !cluster.nodes[0].is_running() {
            break;
        }
    }
    let status = cluster.nodes[0].wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = cluster.nodes[0].log_text();
    assert!(
        log.contains("fatal") && log.contains("sync"),
        "a clear log line:\n{log}"
    );
    // The others go on.
    put_acked(&client, Bytes::from("after"), Bytes::from("1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_torn_raft_log_tail_is_tolerated() {
    let mut cluster = ProcCluster::new(3, 2, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    for i in 0..200u64 {
        client.put(key(i), Bytes::from("v")).await.unwrap();
    }
    cluster.nodes[2].kill9();
    // A write cut short by the crash: garbage after the last record.
    let raft_dir = cluster.data_dir(2).join("raft");
    let mut logs: Vec<_> = std::fs::read_dir(&raft_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raftlog"))
        .collect();
    logs.sort();
    let last = logs.last().expect("a raft log file");
    let mut data = std::fs::read(last).unwrap();
    data.extend_from_slice(&[0xA5; 777]);
    std::fs::write(last, data).unwrap();

    cluster.nodes[2].start();
    cluster.nodes[2].wait_ready(Duration::from_secs(60));
    for i in 200..220u64 {
        put_acked(&client, key(i), Bytes::from("v")).await;
    }
    common::assert_replicas_identical(&mut cluster, &client).await;
}

/// A write on a `BatchCommands` stream that does not apply within
/// `server.request-timeout-ms` is answered Indeterminate at the timeout,
/// once: the apply that comes later answers nothing more. Writes still
/// waiting when the client closes its side are answered before the answers
/// end. In-process (the fail point is armed in this test's process).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_write_that_outlives_the_request_timeout_is_indeterminate_once() {
    use flotilla_proto::error::error::Kind;
    use flotilla_proto::kv::kv_client::KvClient;
    use flotilla_proto::kv::{command::Cmd, command_response::Resp, *};
    use flotilla_test_cluster::TestCluster;

    let c = TestCluster::builder(1)
        .shards(1)
        .configure(|cfg| cfg.server.request_timeout_ms = 1000)
        .start()
        .await;
    c.wait_all_leaders(Duration::from_secs(20)).await;
    let client = c.client().await;
    let shard = client.list_shards().await.unwrap().remove(0).descriptor;
    let context = Some(ShardContext {
        shard_id: shard.id,
        epoch: shard.epoch,
        replica_id: 0,
        read_mode: 0,
    });
    let put = |id: u64, k: &'static str| BatchCommandsRequest {
        commands: vec![Command {
            id,
            cmd: Some(Cmd::Put(PutRequest {
                context,
                key: Bytes::from(k),
                value: Bytes::from("v"),
            })),
        }],
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
    let kind = |r: &CommandResponse| match &r.resp {
        Some(Resp::Put(p)) => p
            .error
            .as_ref()
            .map(|e| (e.kind.clone(), e.message.clone())),
        other => panic!("expected a put's answer, got {other:?}"),
    };

    // Applies stall for 2.5 s each from now.
    fail::cfg("apply_before_write", "sleep(2500)").unwrap();
    let sent = std::time::Instant::now();
    requests.send(put(1, "late")).await.unwrap();
    let m = next_answer(&mut answers)
        .await
        .expect("the stream stays open");
    let waited = sent.elapsed();
    fail::remove("apply_before_write");
    assert_eq!(m.responses.len(), 1, "{m:?}");
    assert_eq!(m.responses[0].id, 1);
    match kind(&m.responses[0]) {
        Some((Some(Kind::Indeterminate(_)), msg)) => {
            assert!(msg.contains("server.request-timeout-ms = 1000"), "{msg}")
        }
        other => panic!("expected Indeterminate at the timeout, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_millis(2400),
        "answered at the timeout, not at the apply: {waited:?}"
    );

    // The write applies after the stall; its answer is not sent again: the
    // next answer on the stream is the next write's.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.get(Bytes::from("late")).await.unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled write applies"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    requests.send(put(2, "next")).await.unwrap();
    let m = next_answer(&mut answers)
        .await
        .expect("the stream stays open");
    let ids: Vec<u64> = m.responses.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![2], "{m:?}");
    assert_eq!(kind(&m.responses[0]), None, "{m:?}");

    // A write still waiting when the client closes its side is answered
    // before the answers end.
    fail::cfg("apply_before_write", "sleep(300)").unwrap();
    requests.send(put(3, "closing")).await.unwrap();
    drop(requests);
    let m = next_answer(&mut answers)
        .await
        .expect("the last write is answered");
    let ids: Vec<u64> = m.responses.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![3], "{m:?}");
    assert_eq!(kind(&m.responses[0]), None, "{m:?}");
    assert!(
        next_answer(&mut answers).await.is_none(),
        "then the answers end"
    );
    fail::remove("apply_before_write");
    c.shutdown().await;
}

async fn next_answer(
    answers: &mut tonic::Streaming<flotilla_proto::kv::BatchCommandsResponse>,
) -> Option<flotilla_proto::kv::BatchCommandsResponse> {
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer within 10 s")
        .unwrap()
}
