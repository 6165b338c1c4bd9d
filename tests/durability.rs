//! Log compaction and snapshots in an in-process cluster: logs stay
//! bounded, a follower that falls behind the compacted log catches up by
//! snapshot (also when the first transfer fails), and replicas end with
//! identical data.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_raftstore::RaftMessage;
use flotilla_test_cluster::{wait_until, FilterDecision, TestCluster};
use raft::eraftpb::MessageType;

const WAIT: Duration = Duration::from_secs(30);

fn b(s: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(s.as_ref())
}

/// Small logs: compaction every 5 ticks once 100 entries pile up.
fn small_logs(cfg: &mut flotilla_server::Config) {
    cfg.raftstore.raft_log_gc_ticks = 5;
    cfg.raftstore.raft_log_gc_threshold = 10;
    cfg.raftstore.raft_log_gc_count_limit = 100;
}

/// One write at a time, so each is its own log entry.
async fn write_keys(c: &TestCluster, from: u32, to: u32) {
    let client = c.client().await;
    for i in from..to {
        client
            .put(b(format!("key{i:05}")), b(format!("value{i}")))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_is_compacted_on_every_replica() {
    let c = TestCluster::builder(3)
        .shards(1)
        .configure(small_logs)
        .start()
        .await;
    c.wait_leader(1, &[], WAIT).await;
    write_keys(&c, 0, 600).await;
    for node in c.node_ids() {
        wait_until("log truncated", || async {
            let s = c.replica_status(node, 1).await;
            s.truncated_index > 400 && s.last_index - s.truncated_index < 300
        })
        .await;
    }
    c.assert_replicas_identical(1).await;
    c.shutdown().await;
}

/// Incompressible bytes (raft-engine lz4-compresses large batches).
fn noise(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_raft_engine_directory_stays_bounded_under_load() {
    const FILE: u64 = 1 << 20;
    const PURGE_AT: u64 = 4 << 20;
    let c = TestCluster::builder(3)
        .shards(4)
        .configure(|cfg| {
            small_logs(cfg);
            cfg.raftstore.raft_engine_purge_interval_ms = 100;
            cfg.raft_engine.target_file_size_bytes = FILE;
            cfg.raft_engine.purge_threshold_bytes = PURGE_AT;
        })
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    let dirs: Vec<_> = c
        .node_ids()
        .iter()
        .map(|&n| c.config(n).server.data_dir.join("raft"))
        .collect();
    let size = |d: &std::path::Path| flotilla_server::status::dir_size(d);

    // 8 writers, 2,048 puts of 16 KiB: 32 MiB through every node's log,
    // eight times the purge threshold.
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let client = c.client().await;
        let done = done.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..256u64 {
                let key = b(format!("{:02x}{w}-{i:04}", (i * 37 + w * 11) % 256));
                client.put(key, noise(w << 16 | i, 16 << 10)).await.unwrap();
            }
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    let mut peak = 0;
    while done.load(Ordering::SeqCst) < 8 {
        peak = dirs.iter().map(|d| size(d)).max().unwrap().max(peak);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    // Live files up to the threshold, recycled ones up to 1.5 times it
    // (raft-engine's recycle capacity), the active file and a rotation.
    let bound = PURGE_AT * 5 / 2 + 3 * FILE;
    assert!(
        peak <= bound,
        "raft-engine peaked at {peak} bytes (bound {bound})"
    );
    for d in &dirs {
        wait_until("raft-engine purged below the bound", || async {
            size(d) <= bound
        })
        .await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    let mut c = TestCluster::builder(3)
        .shards(1)
        .configure(small_logs)
        .start()
        .await;
    let leader = c.wait_leader(1, &[], WAIT).await;
    write_keys(&c, 0, 50).await;
    let lagging = c.node_ids().into_iter().find(|n| *n != leader).unwrap();
    c.isolate(lagging);
    write_keys(&c, 50, 800).await;
    // The leader compacted past what the lagging follower has.
    let leader = c.wait_leader(1, &[], WAIT).await;
    let behind = c.replica_status(lagging, 1).await.last_index;
    wait_until("leader log compacted past the follower", || async {
        c.replica_status(leader, 1).await.truncated_index > behind
    })
    .await;

    c.heal();
    wait_until("follower installed a snapshot", || async {
        c.replica_status(lagging, 1).await.truncated_index > behind
    })
    .await;
    write_keys(&c, 800, 820).await;
    c.assert_replicas_identical(1).await;
    // The follower's data is complete.
    let kv = c.server(lagging).kv_engine();
    wait_until("the last write reached the follower", || async {
        kv.get(flotilla_storage::CF_DEFAULT, b"key00819")
            .unwrap()
            .is_some()
    })
    .await;
    let (pairs, _) = kv
        .scan(flotilla_storage::CF_DEFAULT, b"key", b"kez", 10_000, false)
        .unwrap();
    assert_eq!(pairs.len(), 820);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_snapshot_transfer_is_retried() {
    let mut c = TestCluster::builder(3)
        .shards(1)
        .configure(small_logs)
        .start()
        .await;
    let leader = c.wait_leader(1, &[], WAIT).await;
    let lagging = c.node_ids().into_iter().find(|n| *n != leader).unwrap();
    c.isolate(lagging);
    write_keys(&c, 0, 600).await;
    let leader = c.wait_leader(1, &[], WAIT).await;
    wait_until("leader log compacted", || async {
        c.replica_status(leader, 1).await.truncated_index > 100
    })
    .await;
    c.heal();
    // The link breaks under the first two snapshot transfers.
    let cut = Arc::new(AtomicUsize::new(0));
    let seen = cut.clone();
    c.add_filter(Arc::new(move |m: &RaftMessage| {
        if m.msg.get_msg_type() == MessageType::MsgSnapshot
            && seen.fetch_add(1, Ordering::SeqCst) < 2
        {
            FilterDecision::Drop
        } else {
            FilterDecision::Pass
        }
    }));
    wait_until("follower installed a snapshot", || async {
        c.replica_status(lagging, 1).await.truncated_index > 100
    })
    .await;
    assert!(
        cut.load(Ordering::SeqCst) >= 3,
        "the snapshot was sent again after failures"
    );
    c.assert_replicas_identical(1).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_follower_catches_up_after_the_log_moved_on() {
    let mut c = TestCluster::builder(3)
        .shards(2)
        .configure(small_logs)
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    write_keys(&c, 0, 100).await;
    c.stop_node(2).await;
    write_keys(&c, 100, 700).await;
    c.restart_node(2).await;
    for shard in [1, 2] {
        c.assert_replicas_identical(shard).await;
    }
    c.shutdown().await;
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "this test mounts a tmpfs to fill a disk: it needs root");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers() {
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("disk");
    let _fs = Tmpfs::mount(&mnt, "160m");
    let c = TestCluster::builder(1)
        .shards(2)
        .data_root(&mnt)
        .configure(|cfg| {
            cfg.server.reserve_space_bytes = 40 << 20;
            cfg.raft_engine.target_file_size_bytes = 4 << 20;
        })
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    client.put(b("before"), b("1")).await.unwrap();

    // Fill the disk to just under the reserve.
    let avail = flotilla_storage::disk::available_bytes(&mnt).unwrap();
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![0u8; (avail - (30 << 20)) as usize]).unwrap();
    let err = loop {
        match client.put(b("during"), b("2")).await {
            Err(e) => break e,
            Ok(()) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(
        matches!(&err, flotilla_client::Error::ResourceExhausted(m) if m.contains("server.reserve-space-bytes")),
        "a clear error: {err}"
    );
    // Reads go on, and nothing half-written shows.
    assert_eq!(client.get(b("before")).await.unwrap(), Some(b("1")));

    std::fs::remove_file(&ballast).unwrap();
    wait_until("writes resume", || async {
        client.put(b("after"), b("3")).await.is_ok()
    })
    .await;
    assert_eq!(client.get(b("after")).await.unwrap(), Some(b("3")));
    c.shutdown().await;
}

/// A leader cut off right after its followers appended a write, before it
/// heard them: the new leader commits the write and compacts its log past
/// it, and the old leader catches up by snapshot. The snapshot holds the
/// write, so its waiter must not be told "not applied" (StaleCommand, which
/// a client retries: a retried compare-and-swap would then fail against its
/// own first success).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proposal_covered_by_a_snapshot_is_not_answered_as_not_applied() {
    let mut c = TestCluster::builder(3)
        .shards(1)
        .configure(|cfg| {
            small_logs(cfg);
            // Only the snapshot may answer the old leader's proposal.
            cfg.raftstore.abandon_proposals_after_ticks = 100_000;
        })
        .start()
        .await;
    let old = c.wait_leader(1, &[], WAIT).await;
    // (No writes before: the log is too short for a compaction entry to be
    // pending, so the pending proposal waited for below is the write.)
    // The followers' acknowledgements never reach the leader.
    c.add_filter(Arc::new(move |m: &RaftMessage| {
        if m.to_node == old && m.msg.get_msg_type() == MessageType::MsgAppendResponse {
            FilterDecision::Drop
        } else {
            FilterDecision::Pass
        }
    }));
    let pending = c.direct_put(old, 1, b"covered", b"1");
    wait_until("the old leader appended the write", || async {
        c.replica_status(old, 1).await.pending_proposals > 0
    })
    .await;
    // At or past the write's index (a log compaction entry may follow it).
    let before = c.replica_status(old, 1).await.last_index;
    let others: Vec<_> = c.node_ids().into_iter().filter(|n| *n != old).collect();
    for &n in &others {
        wait_until("followers appended the write", || async {
            c.replica_status(n, 1).await.last_index >= before
        })
        .await;
    }
    c.isolate(old);
    let new = c.wait_leader(1, &others, WAIT).await;
    // Writes the client first sends to the old leader wait there (nothing is
    // abandoned in this test) until the client gives up on them.
    let client = c.client_with_timeout(Duration::from_secs(1)).await;
    for i in 0..380 {
        let key = format!("key{i:05}");
        flotilla_test_cluster::put_acked(&client, b(&key), b(&key)).await;
    }
    wait_until("new leader compacted past the write", || async {
        c.replica_status(new, 1).await.truncated_index > before + 1
    })
    .await;

    c.heal();
    let answer = tokio::time::timeout(WAIT, pending)
        .await
        .expect("the proposal is answered")
        .expect("callback not dropped");
    wait_until("old leader installed a snapshot", || async {
        c.replica_status(old, 1).await.truncated_index > before + 1
    })
    .await;
    // The write committed under the new leader.
    assert_eq!(client.get(b("covered")).await.unwrap(), Some(b("1")));
    match answer {
        Ok(_) | Err(flotilla_raftstore::Error::Indeterminate(_)) => {}
        other => panic!("an applied write was answered {other:?}"),
    }
    c.assert_replicas_identical(1).await;
    c.shutdown().await;
}
