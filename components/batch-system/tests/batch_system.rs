//! Scenarios for the batch-system: no message is lost, an FSM is never polled
//! by two threads at once, a hot FSM does not starve the others, and shutdown
//! stops everything and answers (by dropping) every pending message.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use flotilla_batch_system::{
    create_system, BasicMailbox, BatchSystem, Config, Fsm, HandleResult, HandlerBuilder,
    PollHandler, Router, SendError,
};

#[derive(Debug)]
enum Msg {
    Inc,
    /// Reply once this message is handled.
    Ack(mpsc::Sender<u64>),
    Stop,
}

#[derive(Default)]
struct Probe {
    handled: AtomicUsize,
    dropped: AtomicUsize,
    /// Set while a poller is inside handle_normal for this FSM.
    busy: AtomicBool,
    overlaps: AtomicUsize,
}

struct Counter {
    id: u64,
    rx: Receiver<Msg>,
    probe: Arc<Probe>,
    stopped: bool,
}

impl Fsm for Counter {
    type Message = Msg;
    fn is_stopped(&self) -> bool {
        self.stopped
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.probe.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

struct Control {
    rx: Receiver<Msg>,
    handled: Arc<AtomicUsize>,
}

impl Fsm for Control {
    type Message = Msg;
    fn is_stopped(&self) -> bool {
        false
    }
}

struct Handler {
    per_round: usize,
    /// Widens the window in which a second poller could wrongly hold the FSM.
    dwell: Duration,
    ended: Arc<AtomicUsize>,
}

impl PollHandler<Counter, Control> for Handler {
    fn begin(&mut self, _batch_size: usize) {}

    fn handle_control(&mut self, control: &mut Control) -> Option<usize> {
        while let Ok(m) = control.rx.try_recv() {
            control.handled.fetch_add(1, Ordering::SeqCst);
            if let Msg::Ack(tx) = m {
                let _ = tx.send(0);
            }
        }
        Some(0)
    }

    fn handle_normal(&mut self, fsm: &mut Counter) -> HandleResult {
        if fsm.probe.busy.swap(true, Ordering::SeqCst) {
            fsm.probe.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        if !self.dwell.is_zero() {
            std::thread::sleep(self.dwell);
        }
        let mut n = 0;
        let mut result = HandleResult::drained();
        while n < self.per_round {
            match fsm.rx.try_recv() {
                Ok(Msg::Inc) => {}
                Ok(Msg::Ack(tx)) => {
                    let _ = tx.send(fsm.id);
                }
                Ok(Msg::Stop) => fsm.stopped = true,
                Err(_) => break,
            }
            fsm.probe.handled.fetch_add(1, Ordering::SeqCst);
            n += 1;
        }
        if n == self.per_round && !fsm.rx.is_empty() {
            result = HandleResult::KeepProcessing;
        }
        fsm.probe.busy.store(false, Ordering::SeqCst);
        result
    }

    fn end(&mut self, normals: &mut [Box<Counter>]) {
        self.ended.fetch_add(normals.len(), Ordering::SeqCst);
    }
}

struct Builder {
    per_round: usize,
    dwell: Duration,
    ended: Arc<AtomicUsize>,
}

impl HandlerBuilder<Counter, Control> for Builder {
    type Handler = Handler;
    fn build(&mut self) -> Handler {
        Handler {
            per_round: self.per_round,
            dwell: self.dwell,
            ended: self.ended.clone(),
        }
    }
}

struct TestSystem {
    router: Router<Counter, Control>,
    system: BatchSystem<Counter, Control>,
    probes: Vec<Arc<Probe>>,
    control_handled: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
}

fn start(pool_size: usize, fsms: u64, per_round: usize, dwell: Duration) -> TestSystem {
    let cfg = Config {
        pool_size,
        max_batch_size: 8,
        mailbox_capacity: 1 << 20,
        // Exercised here; yields change timing, never what is handled.
        round_yields: 2,
    };
    let (ctx, crx) = crossbeam_channel::unbounded();
    let control_handled = Arc::new(AtomicUsize::new(0));
    let control = Box::new(Control {
        rx: crx,
        handled: control_handled.clone(),
    });
    let (router, mut system) = create_system::<Counter, Control>("test", &cfg, ctx, control);
    let mut probes = Vec::new();
    for id in 0..fsms {
        let (tx, rx) = crossbeam_channel::unbounded();
        let probe = Arc::new(Probe::default());
        probes.push(probe.clone());
        let fsm = Box::new(Counter {
            id,
            rx,
            probe,
            stopped: false,
        });
        router.register(id, BasicMailbox::new(tx, fsm));
    }
    let ended = Arc::new(AtomicUsize::new(0));
    system.spawn(Builder {
        per_round,
        dwell,
        ended: ended.clone(),
    });
    TestSystem {
        router,
        system,
        probes,
        control_handled,
        ended,
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn no_message_is_lost_under_concurrent_senders() {
    let t = start(3, 16, 7, Duration::ZERO);
    let per_sender = 20_000;
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let router = t.router.clone();
            std::thread::spawn(move || {
                for i in 0..per_sender {
                    let addr = ((i * 7 + s * 13) % 16) as u64;
                    router.send(addr, Msg::Inc).unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let total = 4 * per_sender;
    let probes = t.probes.clone();
    wait_until("every message handled", Duration::from_secs(20), || {
        probes
            .iter()
            .map(|p| p.handled.load(Ordering::SeqCst))
            .sum::<usize>()
            == total
    });
    // Every FSM got exactly its share: sum matches and nothing is double-counted.
    let mut expected = [0usize; 16];
    for s in 0..4 {
        for i in 0..per_sender {
            expected[(i * 7 + s * 13) % 16] += 1;
        }
    }
    for (id, p) in t.probes.iter().enumerate() {
        assert_eq!(p.handled.load(Ordering::SeqCst), expected[id], "fsm {id}");
    }
    assert!(t.ended.load(Ordering::SeqCst) > 0, "end() was called");
}

#[test]
fn an_fsm_is_never_polled_by_two_threads_at_once() {
    let t = start(4, 2, 1, Duration::from_micros(200));
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let router = t.router.clone();
            std::thread::spawn(move || {
                for i in 0..2_000u64 {
                    router.send(i % 2, Msg::Inc).unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let probes = t.probes.clone();
    wait_until("every message handled", Duration::from_secs(30), || {
        probes
            .iter()
            .map(|p| p.handled.load(Ordering::SeqCst))
            .sum::<usize>()
            == 8_000
    });
    for p in &t.probes {
        assert_eq!(p.overlaps.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn a_hot_fsm_does_not_starve_the_others() {
    // One poller, one FSM flooded without pause: the cold FSMs must still be
    // served promptly, because the hot one goes to the tail of the queue
    // after each round.
    let t = start(1, 5, 16, Duration::ZERO);
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let router = t.router.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    let _ = router.send(0, Msg::Inc);
                }
                std::thread::yield_now();
            }
        })
    };
    wait_until("the hot FSM is busy", Duration::from_secs(5), || {
        t.probes[0].handled.load(Ordering::SeqCst) > 10_000
    });
    for cold in 1..5u64 {
        let (tx, rx) = mpsc::channel();
        let sent = Instant::now();
        t.router.send(cold, Msg::Ack(tx)).unwrap();
        let id = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("cold FSM starved");
        assert_eq!(id, cold);
        assert!(sent.elapsed() < Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
}

#[test]
fn control_fsm_gets_its_messages() {
    let t = start(2, 1, 16, Duration::ZERO);
    let (tx, rx) = mpsc::channel();
    t.router.send_control(Msg::Inc).unwrap();
    t.router.send_control(Msg::Ack(tx)).unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(t.control_handled.load(Ordering::SeqCst), 2);
}

#[test]
fn a_stopped_fsm_is_dropped_and_its_mailbox_refuses() {
    let t = start(2, 3, 16, Duration::ZERO);
    t.router.send(1, Msg::Stop).unwrap();
    let probe = t.probes[1].clone();
    wait_until("fsm 1 dropped", Duration::from_secs(5), || {
        probe.dropped.load(Ordering::SeqCst) == 1
    });
    match t.router.send(1, Msg::Inc) {
        Err(SendError::Disconnected(_)) => {}
        other => panic!("expected Disconnected, got {:?}", other.is_ok()),
    }
    assert!(matches!(
        t.router.send(99, Msg::Inc),
        Err(SendError::NotFound(_))
    ));
}

#[test]
fn full_mailbox_refuses_but_force_send_delivers() {
    let cfg = Config {
        pool_size: 1,
        max_batch_size: 8,
        mailbox_capacity: 2,
        round_yields: 0,
    };
    let (ctx, crx) = crossbeam_channel::unbounded();
    let control = Box::new(Control {
        rx: crx,
        handled: Arc::default(),
    });
    // No pollers spawned: nothing drains the mailbox.
    let (router, _system) = create_system::<Counter, Control>("full", &cfg, ctx, control);
    let (tx, rx) = crossbeam_channel::unbounded();
    let fsm = Box::new(Counter {
        id: 0,
        rx,
        probe: Arc::default(),
        stopped: false,
    });
    router.register(0, BasicMailbox::new(tx, fsm));
    router.send(0, Msg::Inc).unwrap();
    router.send(0, Msg::Inc).unwrap();
    assert!(matches!(router.send(0, Msg::Inc), Err(SendError::Full(_))));
    router.force_send(0, Msg::Inc).unwrap();
    assert_eq!(router.mailbox(0).unwrap().len(), 3);
}

#[test]
fn shutdown_joins_pollers_and_drops_every_fsm_with_its_messages() {
    let mut t = start(2, 8, 4, Duration::from_millis(1));
    // Park acks in the mailboxes; some will still be queued at shutdown.
    let mut replies = Vec::new();
    for i in 0..400u64 {
        let (tx, rx) = mpsc::channel();
        t.router.send(i % 8, Msg::Ack(tx)).unwrap();
        replies.push(rx);
    }
    t.system.shutdown();
    for p in &t.probes {
        assert_eq!(p.dropped.load(Ordering::SeqCst), 1, "every FSM dropped");
    }
    // Every pending message was either handled (answered) or dropped with
    // its FSM (the reply channel disconnects): nobody waits forever.
    for rx in replies {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("a message was left hanging"),
        }
    }
    assert!(matches!(
        t.router.send(0, Msg::Inc),
        Err(SendError::NotFound(_))
    ));
    assert!(t.router.is_shutdown());
}
