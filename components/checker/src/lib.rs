//! `flotilla-checker`: checks a recorded history of single-key operations
//! for linearizability.
//!
//! # Model
//! Each key is a register holding `Option<Bytes>` (absent or a value);
//! operations are `Put` (a value, or `None` for delete), `Get`, and
//! `Cas { expected, new }`. Linearizability is compositional per object
//! (Herlihy & Wing), so the history is split by key and each key checked on
//! its own.
//!
//! # Histories
//! An [`Op`] has its invocation time and, when it completed, its return
//! time and output. An operation whose outcome is unknown (a timeout, a
//! connection lost after sending) gets [`Output::Unknown`]: it may have
//! taken effect at any point after its invocation, or never. As in Knossos
//! and Porcupine it is treated as returning at infinity, which lets the
//! search place it anywhere after its call, including after everything
//! else (where its effect is unobservable, i.e. it never happened). A read
//! that failed carries no information and should simply be left out. An
//! unknown write of a value nobody observed is dropped before the search
//! (`prune_unobserved_unknowns`): it changes no verdict, and each one would
//! multiply the search.
//!
//! # Search
//! Wing & Gong's algorithm with Lowe's memoization, as in Porcupine: walk a
//! doubly linked list of call and return events; at a call, try to
//! linearize that operation now (if the model accepts its output in the
//! current state and the (set of linearized ops, state) pair was not seen
//! before), removing its events from the list; at a return whose operation
//! is not yet linearized, backtrack. The history is linearizable when the
//! list empties. The search is exponential in the worst case, so it runs
//! under a time budget and may answer [`Verdict::Unknown`].
//!
//! On a violation, [`minimize`] shrinks the key's history greedily (drop an
//! operation, keep the drop if the rest still fails) to a small sub-history
//! that shows it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// What an operation asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Write a value; `None` deletes.
    Put(Option<Bytes>),
    Get,
    /// Write `new` only if the register holds `expected`.
    Cas {
        expected: Option<Bytes>,
        new: Option<Bytes>,
    },
}

/// What an operation answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// A write was acknowledged.
    Written,
    /// A read saw this state.
    Read(Option<Bytes>),
    /// A compare-and-swap answered whether it swapped.
    Swapped(bool),
    /// A compare-and-swap did not swap and saw this state.
    NotSwappedSaw(Option<Bytes>),
    /// The operation may or may not have taken effect.
    Unknown,
}

/// One operation of a history. Times are any monotonic unit (nanoseconds
/// since the start of the run, for example).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub client: u64,
    pub key: Bytes,
    pub input: Input,
    pub output: Output,
    pub call: u64,
    /// Ignored when the output is `Unknown`.
    pub ret: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No linearization exists for this key; `ops` is a small sub-history
    /// of it that has none either.
    Violation {
        key: Bytes,
        ops: Vec<Op>,
    },
    /// The search ran out of its time budget on this key.
    Unknown {
        key: Bytes,
    },
}

/// The register model's transition: the state after `input` answered
/// `output` in `state`, or `None` when that answer is impossible there.
fn step(state: &Option<Bytes>, input: &Input, output: &Output) -> Option<Option<Bytes>> {
    match (input, output) {
        (Input::Put(v), Output::Written | Output::Unknown) => Some(v.clone()),
        (Input::Get, Output::Read(seen)) => (seen == state).then(|| state.clone()),
        (Input::Get, Output::Unknown) => Some(state.clone()),
        (Input::Cas { expected, new }, Output::Swapped(true)) => {
            (state == expected).then(|| new.clone())
        }
        (Input::Cas { expected, .. }, Output::Swapped(false)) => {
            (state != expected).then(|| state.clone())
        }
        (Input::Cas { expected, .. }, Output::NotSwappedSaw(seen)) => {
            (state != expected && seen == state).then(|| state.clone())
        }
        (Input::Cas { expected, new }, Output::Unknown) => Some(if state == expected {
            new.clone()
        } else {
            state.clone()
        }),
        _ => None,
    }
}

/// Checks every key of `history` (registers start absent) within `budget`
/// in all. Returns the first violation found, else `Unknown` if a key ran
/// out of time, else `Linearizable`.
pub fn check(history: &[Op], budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    let mut by_key: BTreeMap<&Bytes, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut unknown = None;
    for (key, ops) in by_key {
        let ops = prune_unobserved_unknowns(ops);
        match check_key(&ops, deadline) {
            Some(true) => {}
            Some(false) => {
                return Verdict::Violation {
                    key: key.clone(),
                    ops: minimize(&ops, deadline + budget),
                }
            }
            None => unknown = unknown.or(Some(key.clone())),
        }
    }
    match unknown {
        Some(key) => Verdict::Unknown { key },
        None => Verdict::Linearizable,
    }
}

/// Drops the operations of unknown outcome that wrote a value nobody
/// observed. Such an operation can always be linearized last (it never
/// returned), where it changes nothing anyone saw, so the history is
/// linearizable with it exactly when it is without it; and each one left in
/// multiplies the search (it may go anywhere after its call). Writes of
/// absence (deletes) are kept: absence is not unique, so a read of it may
/// be theirs.
fn prune_unobserved_unknowns(ops: Vec<&Op>) -> Vec<Op> {
    let seen: HashSet<&Option<Bytes>> = ops.iter().filter_map(|o| observed(o)).collect();
    ops.into_iter()
        .filter(|o| {
            o.output != Output::Unknown
                || !written(o).is_some_and(|w| w.is_some() && !seen.contains(w))
        })
        .cloned()
        .collect()
}

/// The state an operation wrote, if it (maybe) wrote one.
fn written(op: &Op) -> Option<&Option<Bytes>> {
    match (&op.input, &op.output) {
        (Input::Put(v), _) => Some(v),
        (Input::Cas { new, .. }, Output::Swapped(true) | Output::Unknown) => Some(new),
        _ => None,
    }
}

/// The state an operation saw, if it saw one.
fn observed(op: &Op) -> Option<&Option<Bytes>> {
    match (&op.input, &op.output) {
        (_, Output::Read(v) | Output::NotSwappedSaw(v)) => Some(v),
        (Input::Cas { expected, .. }, Output::Swapped(true)) => Some(expected),
        _ => None,
    }
}

/// Shrinks a non-linearizable single-key history: drops each operation in
/// turn and keeps the drop when the rest still has no linearization. A
/// write whose value a remaining operation observed is kept, so the
/// witness explains what every read saw (a stale read keeps the write it
/// saw and the one it missed). Stops shrinking at `deadline` (what is left
/// still fails).
pub fn minimize(ops: &[Op], deadline: Instant) -> Vec<Op> {
    let mut ops = ops.to_vec();
    // Passes until nothing more can go: dropping a read can free the write
    // it observed.
    let mut shrunk = true;
    while shrunk && Instant::now() < deadline {
        shrunk = false;
        let mut i = 0;
        while i < ops.len() && Instant::now() < deadline {
            let explains = written(&ops[i]).is_some_and(|w| {
                w.is_some()
                    && ops
                        .iter()
                        .enumerate()
                        .any(|(j, o)| j != i && observed(o) == Some(w))
            });
            if !explains {
                let mut without = ops.clone();
                without.remove(i);
                if check_key(&without, deadline) == Some(false) {
                    ops = without;
                    shrunk = true;
                    continue;
                }
            }
            i += 1;
        }
    }
    ops
}

/// An event of the search list: the call or the return of operation `op`.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// For a call, the index of its return event.
    matching: usize,
    prev: usize,
    next: usize,
}

const HEAD: usize = 0;
const NONE: usize = usize::MAX;

/// Checks one key's operations. `Some(true)`: linearizable; `Some(false)`:
/// not; `None`: the deadline passed.
fn check_key(ops: &[Op], deadline: Instant) -> Option<bool> {
    // Events sorted by time; at equal times calls come first, so operations
    // that touch in time count as concurrent (the lenient reading).
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        let ret = if op.output == Output::Unknown {
            u64::MAX
        } else {
            op.ret.max(op.call)
        };
        order.push((op.call, true, i));
        order.push((ret, false, i));
    }
    order.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));

    // Node 0 is the head sentinel; events are nodes 1..=2n.
    let mut ev = vec![Event {
        op: NONE,
        is_call: false,
        matching: NONE,
        prev: NONE,
        next: NONE,
    }];
    let mut call_node = vec![NONE; ops.len()];
    for &(_, is_call, i) in &order {
        let n = ev.len();
        ev.push(Event {
            op: i,
            is_call,
            matching: NONE,
            prev: n - 1,
            next: NONE,
        });
        ev[n - 1].next = n;
        if is_call {
            call_node[i] = n;
        } else {
            let c = call_node[i];
            ev[c].matching = n;
        }
    }

    let lift = |ev: &mut Vec<Event>, c: usize| {
        for n in [c, ev[c].matching] {
            let (p, x) = (ev[n].prev, ev[n].next);
            ev[p].next = x;
            if x != NONE {
                ev[x].prev = p;
            }
        }
    };
    let unlift = |ev: &mut Vec<Event>, c: usize| {
        for n in [ev[c].matching, c] {
            let (p, x) = (ev[n].prev, ev[n].next);
            ev[p].next = n;
            if x != NONE {
                ev[x].prev = n;
            }
        }
    };

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Option<Bytes>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<Bytes>)> = Vec::new();
    let mut state: Option<Bytes> = None;
    let mut node = ev[HEAD].next;
    let mut steps = 0u64;
    while ev[HEAD].next != NONE {
        steps += 1;
        if steps.is_multiple_of(4096) && Instant::now() > deadline {
            return None;
        }
        if node == NONE {
            // Every remaining call was tried; only unknown-outcome returns
            // (at infinity) are left beyond this point.
            match stack.pop() {
                None => return Some(false),
                Some((c, s)) => {
                    let op = ev[c].op;
                    linearized[op / 64] &= !(1 << (op % 64));
                    state = s;
                    unlift(&mut ev, c);
                    node = ev[c].next;
                    continue;
                }
            }
        }
        let e = ev[node];
        if e.is_call {
            let op = &ops[e.op];
            if let Some(next_state) = step(&state, &op.input, &op.output) {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if seen.insert((lin.clone(), next_state.clone())) {
                    stack.push((node, state));
                    state = next_state;
                    linearized = lin;
                    lift(&mut ev, node);
                    node = ev[HEAD].next;
                    continue;
                }
            }
            node = e.next;
        } else {
            // A return whose operation is not linearized yet: backtrack.
            match stack.pop() {
                None => return Some(false),
                Some((c, s)) => {
                    let op = ev[c].op;
                    linearized[op / 64] &= !(1 << (op % 64));
                    state = s;
                    unlift(&mut ev, c);
                    node = ev[c].next;
                }
            }
        }
    }
    Some(true)
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |b: &Option<Bytes>| match b {
            None => "∅".to_string(),
            Some(b) => match std::str::from_utf8(b) {
                Ok(s) => format!("{s:?}"),
                Err(_) => format!(
                    "0x{}",
                    b.iter().map(|x| format!("{x:02x}")).collect::<String>()
                ),
            },
        };
        let input = match &self.input {
            Input::Put(x) => format!("put {}", v(x)),
            Input::Get => "get".to_string(),
            Input::Cas { expected, new } => format!("cas {} -> {}", v(expected), v(new)),
        };
        let output = match &self.output {
            Output::Written => "ok".to_string(),
            Output::Read(x) => v(x),
            Output::Swapped(s) => format!("swapped={s}"),
            Output::NotSwappedSaw(x) => format!("not swapped, saw {}", v(x)),
            Output::Unknown => "unknown".to_string(),
        };
        let ret = if self.output == Output::Unknown {
            "∞".to_string()
        } else {
            self.ret.to_string()
        };
        write!(
            f,
            "[{:>12} .. {:>12}] client {:>3}: {input} => {output}",
            self.call, ret, self.client
        )
    }
}

/// Counts of a history, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub ops: usize,
    pub keys: usize,
    pub unknown: usize,
}

pub fn summarize(history: &[Op]) -> Summary {
    let keys: HashMap<&Bytes, ()> = history.iter().map(|o| (&o.key, ())).collect();
    Summary {
        ops: history.len(),
        keys: keys.len(),
        unknown: history
            .iter()
            .filter(|o| o.output == Output::Unknown)
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn op(client: u64, input: Input, output: Output, call: u64, ret: u64) -> Op {
        Op {
            client,
            key: Bytes::from_static(b"k"),
            input,
            output,
            call,
            ret,
        }
    }

    fn put(c: u64, v: &str, call: u64, ret: u64) -> Op {
        op(c, Input::Put(b(v)), Output::Written, call, ret)
    }

    fn get(c: u64, v: Option<&str>, call: u64, ret: u64) -> Op {
        op(c, Input::Get, Output::Read(v.and_then(b)), call, ret)
    }

    const BUDGET: Duration = Duration::from_secs(10);

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            get(1, None, 0, 1),
            put(1, "a", 2, 3),
            get(2, Some("a"), 4, 5),
            op(
                1,
                Input::Cas {
                    expected: b("a"),
                    new: b("b"),
                },
                Output::Swapped(true),
                6,
                7,
            ),
            get(2, Some("b"), 8, 9),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_a_write() {
        // put a overlaps both reads: one sees the old state, one the new.
        let h = vec![
            put(1, "a", 0, 10),
            get(2, Some("a"), 1, 2),
            get(3, None, 3, 4),
        ];
        // Reads at 1-2 saw "a", then a read at 3-4 saw nothing: the write
        // cannot be undone, so this is NOT linearizable.
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
        let ok = vec![
            put(1, "a", 0, 10),
            get(3, None, 1, 2),
            get(2, Some("a"), 3, 4),
        ];
        assert_eq!(check(&ok, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_is_a_violation() {
        let h = vec![
            put(1, "a", 0, 1),
            put(1, "b", 2, 3),
            get(2, Some("a"), 4, 5),
        ];
        match check(&h, BUDGET) {
            Verdict::Violation { ops, .. } => {
                // The witness keeps the write the read saw and the one it
                // missed.
                assert_eq!(ops.len(), 3, "{ops:?}");
            }
            v => panic!("expected a violation, got {v:?}"),
        }
    }

    #[test]
    fn reading_a_value_never_written_is_its_own_witness() {
        let h = vec![put(1, "a", 0, 1), get(2, Some("zzz"), 2, 3)];
        match check(&h, BUDGET) {
            Verdict::Violation { ops, .. } => assert_eq!(ops, vec![h[1].clone()]),
            v => panic!("expected a violation, got {v:?}"),
        }
    }

    #[test]
    fn lost_acknowledged_write_is_a_violation() {
        let h = vec![put(1, "a", 0, 1), get(2, None, 5, 6)];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }

    #[test]
    fn unknown_writes_may_or_may_not_happen() {
        // An unknown put that was never observed: fine.
        let h = vec![
            op(1, Input::Put(b("x")), Output::Unknown, 0, 0),
            get(2, None, 5, 6),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // Observed later: also fine, even long after its call.
        let h = vec![
            op(1, Input::Put(b("x")), Output::Unknown, 0, 0),
            get(2, None, 5, 6),
            get(2, Some("x"), 100, 101),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        // But not before it was invoked.
        let h = vec![
            get(2, Some("x"), 0, 1),
            op(1, Input::Put(b("x")), Output::Unknown, 5, 0),
        ];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }

    #[test]
    fn cas_counter_applied_twice_is_a_violation() {
        // Two clients increment 0 -> 1; both cannot succeed.
        let cas = |c, e: &str, n: &str, ok, call, ret| {
            op(
                c,
                Input::Cas {
                    expected: b(e),
                    new: b(n),
                },
                Output::Swapped(ok),
                call,
                ret,
            )
        };
        let h = vec![
            put(0, "0", 0, 1),
            cas(1, "0", "1", true, 2, 5),
            cas(2, "0", "1", true, 3, 6),
        ];
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
        let h = vec![
            put(0, "0", 0, 1),
            cas(1, "0", "1", true, 2, 5),
            cas(2, "0", "1", false, 3, 6),
            get(3, Some("1"), 7, 8),
        ];
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn keys_are_independent() {
        let mut h = vec![put(1, "a", 0, 1), get(2, Some("a"), 2, 3)];
        let mut other = get(3, None, 2, 3);
        other.key = Bytes::from_static(b"other");
        h.push(other);
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn minimize_keeps_only_the_witness() {
        let mut h = vec![put(1, "a", 0, 1)];
        for i in 0..20u64 {
            h.push(get(2, Some("a"), 10 + i * 2, 11 + i * 2));
        }
        h.push(put(1, "b", 100, 101));
        h.push(get(3, Some("a"), 200, 201)); // stale
        match check(&h, BUDGET) {
            Verdict::Violation { ops, .. } => {
                assert_eq!(ops.len(), 3, "{ops:#?}");
                assert_eq!(ops[2].call, 200);
            }
            v => panic!("expected a violation, got {v:?}"),
        }
    }

    #[test]
    fn many_concurrent_clients_check_quickly() {
        // 8 clients, 2,000 overlapping operations on one key, generated
        // from a real sequential order so the history is linearizable.
        let mut h = Vec::new();
        let mut state: Option<Bytes> = None;
        let mut x = 12345u64;
        for i in 0..2000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = i * 10;
            // Each op's linearization point is t+5; windows overlap.
            let (call, ret) = (t + 5 - (x % 5), t + 5 + (x % 17));
            let c = x % 8;
            if x.is_multiple_of(3) {
                let v = b(&i.to_string());
                state = v.clone();
                h.push(op(c, Input::Put(v), Output::Written, call, ret));
            } else {
                h.push(op(c, Input::Get, Output::Read(state.clone()), call, ret));
            }
        }
        let started = Instant::now();
        assert_eq!(check(&h, BUDGET), Verdict::Linearizable);
        assert!(started.elapsed() < BUDGET);
    }

    #[test]
    fn many_unobserved_unknown_writes_do_not_slow_the_check() {
        // A put of unknown outcome per client every few operations, never
        // read back: each could go anywhere after its call, which without
        // pruning makes the search explode.
        let mut h = Vec::new();
        for i in 0..3000u64 {
            let t = i * 10;
            let c = i % 8;
            if i % 3 == 0 {
                h.push(put(c, &format!("known-{i}"), t, t + 4));
                h.push(op(
                    c + 8,
                    Input::Put(b(&format!("lost-{i}"))),
                    Output::Unknown,
                    t + 1,
                    0,
                ));
            } else {
                h.push(get(c, Some(&format!("known-{}", i - i % 3)), t + 5, t + 9));
            }
        }
        let started = Instant::now();
        assert_eq!(check(&h, Duration::from_secs(20)), Verdict::Linearizable);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // An unknown write that was observed still counts: read, then
        // followed by a read of the older value, it is a violation.
        let mut h: Vec<Op> = h.into_iter().take(40).collect();
        h.push(get(1, Some("lost-0"), 40_000, 40_001));
        h.push(get(2, Some("known-27"), 40_010, 40_011));
        assert!(matches!(check(&h, BUDGET), Verdict::Violation { .. }));
    }
}
