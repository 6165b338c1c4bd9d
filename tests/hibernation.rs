//! Hibernation of idle shards, in-process (real RocksDB, raft-engine and
//! gRPC on loopback; 20 ms ticks, so 200-400 ms elections and a 200 ms
//! node-silence threshold): idle shards stop ticking on every node, a write
//! wakes its shard and is answered, a hibernated leader cut off from the
//! others is replaced and answers no read with stale data, a node's death
//! makes the followers of its hibernated leaders elect new ones, and a link
//! cut between a hibernated leader and one follower moves nothing.

use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_client::Client;
use flotilla_raftstore::{NodeId, ReadMode, ReadRequest, ShardId};
use flotilla_test_cluster::{put_acked, wait_until, TestCluster};

const WAIT: Duration = Duration::from_secs(20);

/// Hibernation is on by default; these tests depend on it, so say so.
fn hibernating(cfg: &mut flotilla_server::Config) {
    cfg.raftstore.hibernate = true;
}

/// A key inside `shard_id`'s range, as `node` knows it.
fn key_in(c: &TestCluster, node: NodeId, shard_id: ShardId, tag: &str) -> Bytes {
    let d = c.descriptor(node, shard_id);
    let mut k = d.start_key.to_vec();
    k.push(0);
    k.extend_from_slice(tag.as_bytes());
    Bytes::from(k)
}

/// The user shards (not the meta shard) hosted on `node`.
fn user_shards(c: &TestCluster, node: NodeId) -> Vec<ShardId> {
    let mut ids: Vec<_> = c
        .router(node)
        .meta()
        .all()
        .into_iter()
        .map(|m| m.descriptor.id)
        .filter(|id| *id != flotilla_storage::META_SHARD_ID)
        .collect();
    ids.sort_unstable();
    ids
}

/// Waits until every replica of `shards` on `nodes` hibernates.
async fn wait_asleep(c: &TestCluster, nodes: &[NodeId], shards: &[ShardId]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let awake: Vec<_> = nodes
            .iter()
            .flat_map(|&n| shards.iter().map(move |&s| (n, s)))
            .filter(|&(n, s)| !c.router(n).meta().is_asleep(s))
            .collect();
        if awake.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let mut why = Vec::new();
            for (n, s) in awake {
                why.push(format!("node {n}: {:?}", c.replica_status(n, s).await));
            }
            panic!("replicas still ticking:\n{}", why.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A hibernating cluster of 3 nodes with `shards` user shards, every one
/// with a leader.
async fn hibernating_cluster(shards: usize) -> TestCluster {
    let c = TestCluster::builder(3)
        .shards(shards)
        .configure(hibernating)
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    c
}

/// A hibernating cluster of 3 nodes with `shards` user shards, each
/// written once (key "a" of its range, "v1"), every replica asleep.
async fn asleep_cluster(shards: usize) -> (TestCluster, Client, Vec<NodeId>, Vec<ShardId>) {
    let c = hibernating_cluster(shards).await;
    let client = c.client_with_timeout(Duration::from_secs(10)).await;
    let nodes = c.node_ids();
    let ids = user_shards(&c, 1);
    assert_eq!(ids.len(), shards);
    for &s in &ids {
        put_acked(&client, key_in(&c, 1, s, "a"), "v1").await;
    }
    wait_asleep(&c, &nodes, &ids).await;
    (c, client, nodes, ids)
}

/// Each shard's term, as its leader's node records it.
fn leader_terms(c: &TestCluster, shards: &[ShardId]) -> Vec<u64> {
    shards
        .iter()
        .map(|&s| {
            c.router(c.leader_of(s).unwrap())
                .meta()
                .get(s)
                .unwrap()
                .term
        })
        .collect()
}

/// The node that leads the most of `shards`.
fn busiest_leader(c: &TestCluster, nodes: &[NodeId], shards: &[ShardId]) -> NodeId {
    *nodes
        .iter()
        .max_by_key(|&&n| {
            shards
                .iter()
                .filter(|&&s| c.leader_of(s) == Some(n))
                .count()
        })
        .unwrap()
}

/// A leader read sent straight to `node`'s replica: Some(outcome) if the
/// replica answered within `within`.
async fn direct_leader_read(
    c: &TestCluster,
    node: NodeId,
    shard_id: ShardId,
    within: Duration,
) -> Option<flotilla_raftstore::Result<()>> {
    let epoch = c.descriptor(node, shard_id).epoch();
    let (tx, rx) = tokio::sync::oneshot::channel();
    c.router(node).read(ReadRequest {
        shard_id,
        epoch,
        spans: vec![],
        mode: ReadMode::Leader,
        cb: Box::new(move |r| {
            let _ = tx.send(r);
        }),
    });
    tokio::time::timeout(within, rx).await.ok()?.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_shards_hibernate_on_every_node_and_a_write_wakes_its_shard() {
    let (c, client, nodes, shards) = asleep_cluster(8).await;
    // Asleep means asleep: nobody ticks, so nobody wakes by itself (each
    // replica checked ten times over more than two election timeouts).
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for &n in &nodes {
            for &s in &shards {
                assert!(
                    c.router(n).meta().is_asleep(s),
                    "shard {s} woke on node {n} with nothing to do"
                );
            }
        }
    }
    let status = c.replica_status(1, shards[0]).await;
    assert!(status.hibernated, "status says {status:?}");

    // A write to one shard wakes it (and only it) and is answered.
    let target = shards[3];
    let key = key_in(&c, 1, target, "a");
    client
        .put(key.clone(), "v2")
        .await
        .expect("write to a hibernated shard");
    assert_eq!(
        client.get(key.clone()).await.unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    let others: Vec<_> = shards.iter().copied().filter(|s| *s != target).collect();
    for &n in &nodes {
        for &s in &others {
            assert!(
                c.router(n).meta().is_asleep(s),
                "shard {s} woke on node {n}"
            );
        }
    }
    // It goes back to sleep, and reads after that see the write: leader
    // reads (the lease is over by then), follower and stale reads on every
    // replica (the followers applied it before the leader slept).
    wait_asleep(&c, &nodes, &[target]).await;
    assert_eq!(
        client.get(key.clone()).await.unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    for mode in [
        flotilla_proto::kv::ReadMode::Follower,
        flotilla_proto::kv::ReadMode::Stale,
    ] {
        let reader = client.with_read_mode(mode);
        for _ in 0..6 {
            assert_eq!(
                reader.get(key.clone()).await.unwrap().as_deref(),
                Some(&b"v2"[..]),
                "{mode:?} read"
            );
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hibernated_leader_cut_off_is_replaced_and_answers_no_stale_read() {
    let mut c = hibernating_cluster(4).await;
    let client = c.client_with_timeout(Duration::from_secs(10)).await;
    let nodes = c.node_ids();
    let shards = user_shards(&c, 1);
    let shard = shards[1];
    let key = key_in(&c, 1, shard, "k");
    put_acked(&client, key.clone(), "v1").await;
    wait_asleep(&c, &nodes, &shards).await;

    let old = c.leader_of(shard).unwrap();
    let old_term = c.router(old).meta().get(shard).unwrap().term;
    c.isolate(old);
    let others: Vec<_> = nodes.iter().copied().filter(|n| *n != old).collect();
    // Nobody asked the followers anything: node liveness woke them.
    let started = Instant::now();
    let new = c.wait_leader(shard, &others, WAIT).await;
    eprintln!(
        "new leader on node {new} {:?} after the cut",
        started.elapsed()
    );
    // (The client may first try the old leader: put_acked sends again
    // after an unknown outcome.)
    put_acked(&client, key.clone(), "v2").await;

    // The old leader still hosts v1; it must not serve it as current.
    if let Some(Ok(())) = direct_leader_read(&c, old, shard, Duration::from_secs(3)).await {
        panic!("the cut-off old leader of shard {shard} served a leader read");
    }
    c.heal();
    wait_until("the old leader to follow the new term", || {
        let m = c.router(old).meta().get(shard).unwrap();
        async move { !m.is_leader() && m.term > old_term }
    })
    .await;
    assert_eq!(
        client.get(key.clone()).await.unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    c.assert_replicas_identical(shard).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_of_a_stopped_nodes_hibernated_leaders_elect_new_ones() {
    let (mut c, client, nodes, shards) = asleep_cluster(8).await;
    let victim = busiest_leader(&c, &nodes, &shards);
    let led: Vec<_> = shards
        .iter()
        .copied()
        .filter(|&s| c.leader_of(s) == Some(victim))
        .collect();
    assert!(!led.is_empty());
    let keys: Vec<_> = shards.iter().map(|&s| key_in(&c, 1, s, "a")).collect();
    c.stop_node(victim).await;
    let others: Vec<_> = nodes.iter().copied().filter(|n| *n != victim).collect();
    for &s in &led {
        c.wait_leader(s, &others, WAIT).await;
    }
    for k in &keys {
        client
            .put(k.clone(), "v2")
            .await
            .expect("write after the stop");
    }
    // Back on its data: it catches up, and everything hibernates again.
    c.restart_node(victim).await;
    wait_asleep(&c, &nodes, &shards).await;
    for k in &keys {
        assert_eq!(
            client.get(k.clone()).await.unwrap().as_deref(),
            Some(&b"v2"[..])
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_cut_between_a_hibernated_leader_and_one_follower_moves_nothing() {
    let (mut c, client, nodes, shards) = asleep_cluster(4).await;
    let shard = shards[0];
    let leader = c.leader_of(shard).unwrap();
    let term = c.router(leader).meta().get(shard).unwrap().term;
    let cut = *nodes.iter().find(|n| **n != leader).unwrap();
    // The cut follower's node finds the leader's node silent and its
    // replica campaigns; the third replica, woken by the vote request,
    // wakes the leader, hears it, and refuses. As with any raft group
    // whose leader reaches a quorum, leadership stays.
    c.partition(&[leader], &[cut]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = c.router(leader).meta().get(shard).unwrap();
    assert!(m.is_leader() && m.term == term, "leadership moved: {m:?}");
    let key = key_in(&c, 1, shard, "a");
    client
        .put(key.clone(), "v2")
        .await
        .expect("write while one link is cut");
    c.heal();
    assert_eq!(client.get(key).await.unwrap().as_deref(), Some(&b"v2"[..]));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_that_never_hears_the_request_keeps_its_shard_awake_and_led() {
    use flotilla_raftstore::Extra;
    use flotilla_test_cluster::FilterDecision;
    let mut c = hibernating_cluster(4).await;
    let nodes = c.node_ids();
    let shards = user_shards(&c, 1);
    let terms = |c: &TestCluster| leader_terms(c, &shards);
    // Node 3 never gets a leader's request to hibernate: the leaders wait
    // for its answer, give up, ping (waking the followers that did sleep)
    // and ask again, over and over. Through ten election timeouts no
    // shard sleeps on a leader's or node 3's side, and no election is
    // held: node 3's replicas keep hearing heartbeats. (Shards node 3
    // leads sleep: its requests go out.)
    c.add_filter(std::sync::Arc::new(
        |m: &flotilla_raftstore::RaftMessage| {
            if m.to_node == 3 && matches!(m.extra, Some(Extra::Hibernate { .. })) {
                FilterDecision::Drop
            } else {
                FilterDecision::Pass
            }
        },
    ));
    // (A write wakes each shard, should it have slept already.)
    let client = c.client_with_timeout(Duration::from_secs(10)).await;
    for &s in &shards {
        put_acked(&client, key_in(&c, 1, s, "a"), "v1").await;
    }
    let before = terms(&c);
    let followed: Vec<_> = shards
        .iter()
        .copied()
        .filter(|&s| c.leader_of(s) != Some(3))
        .collect();
    assert!(!followed.is_empty());
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for &s in &followed {
            let leader = c.leader_of(s).unwrap();
            for n in [leader, 3] {
                assert!(
                    !c.router(n).meta().is_asleep(s),
                    "shard {s} sleeps on node {n} though node 3 never agreed"
                );
            }
        }
    }
    assert_eq!(terms(&c), before, "an election was held");
    c.heal();
    wait_asleep(&c, &nodes, &shards).await;
    assert_eq!(terms(&c), before, "an election was held");
    c.shutdown().await;
}

/// Shards whose leadership was just moved to a node (as the placement
/// driver does when it balances leaders), then asleep, elect a new leader
/// in one election when that node stops: the new term is the old one plus
/// one. (Once in `make bench-scale`, a shard moved to the killed node 13 s
/// before the kill needed a second election, 1.3 s later. The move was
/// probably incidental: such second elections came from followers that a
/// client woke, whose own stale clocks split the vote with the chosen
/// voter; see `hibernate::wake`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_just_moved_to_a_node_elect_once_when_it_stops() {
    let (mut c, client, nodes, shards) = asleep_cluster(8).await;
    let victim = nodes[0];
    for &s in &shards {
        if c.leader_of(s) != Some(victim) {
            client.transfer_leader(s, victim).await.expect("transfer");
        }
    }
    for &s in &shards {
        c.wait_leader(s, &[victim], WAIT).await;
    }
    wait_asleep(&c, &nodes, &shards).await;
    let terms = leader_terms(&c, &shards);
    c.stop_node(victim).await;
    let others: Vec<_> = nodes.iter().copied().filter(|n| *n != victim).collect();
    for &s in &shards {
        c.wait_leader(s, &others, WAIT).await;
    }
    for ((&s, &term), now) in shards.iter().zip(&terms).zip(leader_terms(&c, &shards)) {
        assert_eq!(now, term + 1, "shard {s}: term {term} -> {now}");
    }
    c.shutdown().await;
}

/// A shard whose chosen voter's own election had just failed elects once
/// when its leader's node stops. Seen in `make bench-scale`: a client woke
/// a follower right after the kill, raft's clock (frozen while it slept)
/// ran out before the silence reached the lease bound, the other follower
/// refused the pre-vote, and the failed candidate, knowing no leader any
/// more, ignored the node's death. Being the voter chosen to campaign, its
/// shard waited for the other follower's fallback timer. It now answers to
/// the leader it had in that term (`hibernate::leader_in_term`, unit
/// tested there; the time it saves shows in `make bench-scale`).
///
/// Here the chosen voter stops hearing its leader (one link of one shard
/// cut, node heartbeats pass), is woken by a request, and its pre-votes
/// fail: the other follower still hears the leader. Then the leader's node
/// stops. Which of the two wins depends on their timers; either way the
/// shard elects once, and takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_whose_chosen_voter_just_failed_an_election_elects_once_when_its_leader_stops() {
    use flotilla_test_cluster::FilterDecision;
    let (mut c, client, nodes, shards) = asleep_cluster(4).await;
    let victim = busiest_leader(&c, &nodes, &shards);
    // Each of the victim's shards with its chosen voter's node (as
    // `hibernate::on_peer_node` picks it: the voters elsewhere by replica
    // id, the one at shard id modulo their count).
    let led: Vec<(ShardId, NodeId)> = shards
        .iter()
        .filter(|&&s| c.leader_of(s) == Some(victim))
        .map(|&s| {
            let mut voters: Vec<_> = c
                .descriptor(victim, s)
                .replicas
                .iter()
                .filter(|r| r.node_id != victim)
                .map(|r| (r.id, r.node_id))
                .collect();
            voters.sort_unstable();
            (s, voters[s as usize % voters.len()].1)
        })
        .collect();
    assert!(!led.is_empty());
    let cut = led.clone();
    c.add_filter(std::sync::Arc::new(
        move |m: &flotilla_raftstore::RaftMessage| {
            if m.from_node == victim && cut.contains(&(m.shard_id, m.to_node)) {
                FilterDecision::Drop
            } else {
                FilterDecision::Pass
            }
        },
    ));
    for &(s, chosen) in &led {
        // Answered "not the leader"; it wakes, and its clock runs.
        let _ = direct_leader_read(&c, chosen, s, Duration::from_secs(5)).await;
    }
    let terms = leader_terms(&c, &led.iter().map(|l| l.0).collect::<Vec<_>>());
    for &(s, chosen) in &led {
        wait_until(
            &format!("shard {s}'s chosen voter to lose its leader"),
            || {
                let m = c.router(chosen).meta().get(s).unwrap();
                async move { m.leader_id == 0 }
            },
        )
        .await;
    }
    for (&(s, _), &term) in led.iter().zip(&terms) {
        let m = c.router(victim).meta().get(s).unwrap();
        assert!(m.is_leader() && m.term == term, "shard {s}: {m:?}");
    }
    c.stop_node(victim).await;
    let others: Vec<_> = nodes.iter().copied().filter(|n| *n != victim).collect();
    for (&(s, _), &term) in led.iter().zip(&terms) {
        let leader = c.wait_leader(s, &others, WAIT).await;
        let now = c.router(leader).meta().get(s).unwrap().term;
        assert_eq!(now, term + 1, "shard {s}: term {term} -> {now}");
    }
    c.heal();
    for &(s, _) in &led {
        put_acked(&client, key_in(&c, others[0], s, "a"), "v2").await;
    }
    c.shutdown().await;
}
