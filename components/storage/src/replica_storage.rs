//! raft-rs `Storage` for one shard replica.
//!
//! State kept in memory and mirrored on disk:
//!
//! | field         | on disk                          | written by            |
//! |---------------|----------------------------------|-----------------------|
//! | `raft_state`  | raft-engine record `rs`          | raft poller, each ready |
//! | entries       | raft-engine group = shard id     | raft poller, each ready |
//! | `apply_state` | RocksDB `meta` ApplyState        | apply poller (with data) |
//! | `conf_state`  | derived from the shard descriptor | apply poller          |
//!
//! The log holds entries `(truncated_index, last_index]`. A new shard's log
//! starts at [`RAFT_INIT_INDEX`]/[`RAFT_INIT_TERM`] (as TiKV does): every
//! replica of a bootstrapped shard starts from the same "applied" state, so
//! none of them needs a snapshot to begin.
//!
//! Writes are staged into the poll round's `LogBatch` by [`ReplicaStorage::append`]
//! and [`ReplicaStorage::stage_raft_state`]; the in-memory state moves at once
//! because raft-rs only reads what it has been told is stable.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use flotilla_proto::local::{ApplyState, SnapshotData};
use flotilla_proto::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::LogBatch;

use crate::entry_cache::EntryCache;
use crate::raft_log::{RaftLocalState, RaftLogEngine};
use crate::{Error, Index, ReplicaId, Result, ShardId, Term};

/// Index at which every bootstrapped shard's log starts (truncated there).
pub const RAFT_INIT_INDEX: Index = 5;
/// Term of the entry at [`RAFT_INIT_INDEX`].
pub const RAFT_INIT_TERM: Term = 5;

/// Bytes of recent entries cached per replica.
pub const ENTRY_CACHE_BYTES: usize = 1 << 20;

/// A snapshot built on this node, ready to be sent.
#[derive(Clone, Debug)]
pub struct GeneratedSnapshot {
    pub index: Index,
    pub term: Term,
    pub conf_state: ConfState,
    pub data: SnapshotData,
    pub generated_at: Instant,
}

impl GeneratedSnapshot {
    fn to_raft(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let m = s.mut_metadata();
        m.index = self.index;
        m.term = self.term;
        m.set_conf_state(self.conf_state.clone());
        s.data = self.data.encode_to_vec().into();
        s
    }
}

/// Snapshot generation, driven by raft asking for a snapshot:
/// `Idle → Requested` (raft asked; the replica FSM hands the request to the
/// apply FSM) `→ Generating → Ready` (kept for every follower that needs
/// it until the log is compacted past it).
#[derive(Debug)]
enum SnapState {
    Idle,
    Requested,
    Generating,
    Ready(Box<GeneratedSnapshot>),
}

/// A snapshot older than this is rebuilt rather than sent again.
const SNAPSHOT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

pub struct ReplicaStorage {
    shard_id: ShardId,
    replica_id: ReplicaId,
    engine: Arc<RaftLogEngine>,
    raft_state: RaftLocalState,
    apply_state: ApplyState,
    conf_state: ConfState,
    cache: EntryCache,
    snap_state: RefCell<SnapState>,
    /// Approximate bytes of the entries in the log.
    log_bytes: u64,
}

/// The apply state of a freshly bootstrapped shard.
pub fn initial_apply_state() -> ApplyState {
    ApplyState {
        applied_index: RAFT_INIT_INDEX,
        applied_term: RAFT_INIT_TERM,
        truncated_index: RAFT_INIT_INDEX,
        truncated_term: RAFT_INIT_TERM,
    }
}

/// Whether a configuration holds `id` (as voter, learner, or either side
/// of a joint configuration).
fn conf_names(cs: &ConfState, id: u64) -> bool {
    cs.voters.contains(&id)
        || cs.learners.contains(&id)
        || cs.voters_outgoing.contains(&id)
        || cs.learners_next.contains(&id)
}

/// The first raft state of a replica created by a split: the initial one,
/// with the term and vote of what it replaces when that is newer.
pub fn split_raft_state(previous: Option<&RaftLocalState>) -> RaftLocalState {
    let mut s = initial_raft_state();
    if let Some(p) = previous.filter(|p| p.hard_state.term > RAFT_INIT_TERM) {
        s.hard_state.term = p.hard_state.term;
        s.hard_state.vote = p.hard_state.vote;
    }
    s
}

/// The raft state of a freshly bootstrapped shard.
pub fn initial_raft_state() -> RaftLocalState {
    RaftLocalState {
        hard_state: HardState {
            term: RAFT_INIT_TERM,
            commit: RAFT_INIT_INDEX,
            ..Default::default()
        },
        last_index: RAFT_INIT_INDEX,
        last_term: RAFT_INIT_TERM,
    }
}

/// The Raft configuration of a descriptor. Transitional roles make it a
/// joint configuration (left automatically): incoming voters vote in the
/// new half only, demoting voters in the old half and become learners.
pub fn conf_state_of(desc: &flotilla_proto::meta::ShardDescriptor) -> ConfState {
    use flotilla_proto::meta::ReplicaRole;
    let mut cs = ConfState::default();
    let mut joint = false;
    for r in &desc.replicas {
        match ReplicaRole::try_from(r.role).unwrap_or(ReplicaRole::Voter) {
            ReplicaRole::Voter => {
                cs.voters.push(r.id);
                cs.voters_outgoing.push(r.id);
            }
            ReplicaRole::Learner => cs.learners.push(r.id),
            ReplicaRole::IncomingVoter => {
                cs.voters.push(r.id);
                joint = true;
            }
            ReplicaRole::DemotingVoter => {
                cs.voters_outgoing.push(r.id);
                cs.learners_next.push(r.id);
                joint = true;
            }
        }
    }
    if joint {
        cs.auto_leave = true;
    } else {
        cs.voters_outgoing.clear();
    }
    cs
}

fn store_err(e: Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl ReplicaStorage {
    /// Rebuilds a replica's storage from disk. `apply_state` comes from
    /// RocksDB, the raft state from raft-engine.
    pub fn recover(
        shard_id: ShardId,
        replica_id: ReplicaId,
        engine: Arc<RaftLogEngine>,
        apply_state: ApplyState,
        conf_state: ConfState,
    ) -> Result<Self> {
        let stored = engine.raft_state(shard_id)?;
        let mut raft_state = if apply_state == initial_apply_state()
            && stored
                .as_ref()
                .is_none_or(|s| s.last_index < RAFT_INIT_INDEX)
        {
            // A shard created by a split, whose first raft state a crash
            // kept from raft-engine (or an uninitialized replica's state it
            // replaces).
            split_raft_state(stored.as_ref())
        } else {
            stored.ok_or_else(|| Error::Corruption {
                what: format!("shard {shard_id}"),
                detail: "no raft state in raft-engine".into(),
            })?
        };
        if raft_state.last_index < apply_state.applied_index {
            return Err(Error::Corruption {
                what: format!("shard {shard_id}"),
                detail: format!(
                    "applied index {} beyond the log's last index {}",
                    apply_state.applied_index, raft_state.last_index
                ),
            });
        }
        // The commit index in the hard state is written lazily; whatever was
        // applied was committed.
        if raft_state.hard_state.commit < apply_state.applied_index {
            raft_state.hard_state.commit = apply_state.applied_index;
        }
        Ok(ReplicaStorage {
            shard_id,
            replica_id,
            engine,
            raft_state,
            apply_state,
            conf_state,
            cache: EntryCache::new(ENTRY_CACHE_BYTES),
            snap_state: RefCell::new(SnapState::Idle),
            log_bytes: 0,
        })
    }

    /// The replica of a shard a split just created on this node: the log
    /// starts at the initial index, the term and vote of an uninitialized
    /// replica it replaces (`previous`) are kept so it never votes twice in
    /// a term. The raft state is written (synced) before this returns.
    pub fn for_split(
        shard_id: ShardId,
        replica_id: ReplicaId,
        engine: Arc<RaftLogEngine>,
        previous: Option<&RaftLocalState>,
        conf_state: ConfState,
    ) -> Result<Self> {
        let raft_state = split_raft_state(previous);
        let mut lb = LogBatch::default();
        lb.add_command(shard_id, raft_engine::Command::Clean);
        RaftLogEngine::put_raft_state(&mut lb, shard_id, &raft_state);
        engine.write(&mut lb, true)?;
        Ok(ReplicaStorage {
            shard_id,
            replica_id,
            engine,
            raft_state,
            apply_state: initial_apply_state(),
            conf_state,
            cache: EntryCache::new(ENTRY_CACHE_BYTES),
            snap_state: RefCell::new(SnapState::Idle),
            log_bytes: 0,
        })
    }

    /// A replica created by a message from its leader before it has any
    /// state: empty log at index 0, no configuration. It becomes initialized
    /// by installing a snapshot. Any leftover raft-engine state of an earlier
    /// replica of the shard on this node is cleaned first.
    pub fn new_uninitialized(
        shard_id: ShardId,
        replica_id: ReplicaId,
        engine: Arc<RaftLogEngine>,
    ) -> Result<Self> {
        if engine.raft_state(shard_id)?.is_some() || engine.first_index(shard_id).is_some() {
            let mut lb = LogBatch::default();
            lb.add_command(shard_id, raft_engine::Command::Clean);
            engine.write(&mut lb, true)?;
        }
        Ok(ReplicaStorage {
            shard_id,
            replica_id,
            engine,
            raft_state: RaftLocalState::default(),
            apply_state: ApplyState::default(),
            conf_state: ConfState::default(),
            cache: EntryCache::new(ENTRY_CACHE_BYTES),
            snap_state: RefCell::new(SnapState::Idle),
            log_bytes: 0,
        })
    }

    /// Whether the replica has state (a configuration); an uninitialized
    /// one waits for a snapshot.
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || !self.conf_state.learners.is_empty()
    }

    pub fn shard_id(&self) -> ShardId {
        self.shard_id
    }

    pub fn replica_id(&self) -> ReplicaId {
        self.replica_id
    }

    pub fn raft_state(&self) -> &RaftLocalState {
        &self.raft_state
    }

    pub fn apply_state(&self) -> &ApplyState {
        &self.apply_state
    }

    pub fn last_index(&self) -> Index {
        self.raft_state.last_index
    }

    pub fn applied_index(&self) -> Index {
        self.apply_state.applied_index
    }

    pub fn truncated_index(&self) -> Index {
        self.apply_state.truncated_index
    }

    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Approximate bytes of entries in the log (since start-up).
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    /// Entries in the log.
    pub fn log_entries(&self) -> u64 {
        self.raft_state.last_index - self.apply_state.truncated_index
    }

    /// Records apply progress reported by the apply poller (including a log
    /// truncation), trimming the entry cache of what apply no longer needs.
    pub fn set_apply_state(&mut self, mut state: ApplyState) {
        // A result apply produced before a snapshot it has not installed yet
        // must not move the log's start back before the snapshot.
        if state.truncated_index < self.apply_state.truncated_index {
            state.truncated_index = self.apply_state.truncated_index;
            state.truncated_term = self.apply_state.truncated_term;
        }
        let old_entries = self.log_entries();
        self.cache.compact_to(state.applied_index + 1);
        self.apply_state = state;
        if let Some(b) = (self.log_bytes * self.log_entries()).checked_div(old_entries) {
            self.log_bytes = b;
        }
    }

    /// Makes the log start after a snapshot at (`index`, `term`): the raft
    /// state moves to it and every older entry is gone. Stages the raft-engine
    /// side (compaction of the old log, raft state, the pending-snapshot
    /// record) into `batch`; the caller installs the data.
    pub fn apply_snapshot(
        &mut self,
        index: Index,
        term: Term,
        data: &SnapshotData,
        batch: &mut LogBatch,
    ) {
        self.raft_state.last_index = index;
        self.raft_state.last_term = term;
        if self.raft_state.hard_state.commit < index {
            self.raft_state.hard_state.commit = index;
        }
        self.apply_state.truncated_index = index;
        self.apply_state.truncated_term = term;
        self.cache.clear();
        self.log_bytes = 0;
        if let Some(shard) = &data.shard {
            self.conf_state = crate::replica_storage::conf_state_of(shard);
        }
        // Appending right after a compacted range is fine; appending over it
        // or leaving a gap would panic raft-engine, so the old log goes in
        // the same batch.
        RaftLogEngine::compact_to(batch, self.shard_id, index + 1);
        RaftLogEngine::put_pending_snapshot(
            batch,
            self.shard_id,
            &flotilla_proto::local::PendingSnapshot {
                index,
                term,
                data: Some(data.clone()),
            },
        );
        self.stage_raft_state(batch);
    }

    /// Whether raft asked for a snapshot that nobody builds yet; marks it
    /// being built.
    pub fn take_snapshot_request(&self) -> bool {
        let mut st = self.snap_state.borrow_mut();
        if matches!(*st, SnapState::Requested) {
            *st = SnapState::Generating;
            return true;
        }
        false
    }

    /// A snapshot build finished (`None`: it failed; raft will ask again).
    pub fn on_snapshot_generated(&self, snap: Option<GeneratedSnapshot>) {
        *self.snap_state.borrow_mut() = match snap {
            Some(s) => SnapState::Ready(Box::new(s)),
            None => SnapState::Idle,
        };
    }

    /// The snapshot ready to send, if any.
    pub fn generated_snapshot(&self) -> Option<GeneratedSnapshot> {
        match &*self.snap_state.borrow() {
            SnapState::Ready(s) => Some((**s).clone()),
            _ => None,
        }
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Stages `entries` into `batch` and makes them the log's tail.
    pub fn append(&mut self, entries: &[Entry], batch: &mut LogBatch) {
        let Some(last) = entries.last() else { return };
        RaftLogEngine::append_entries(batch, self.shard_id, entries);
        self.cache.append(entries);
        self.log_bytes += entries
            .iter()
            .map(|e| e.data.len() as u64 + 16)
            .sum::<u64>();
        self.raft_state.last_index = last.index;
        self.raft_state.last_term = last.term;
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.raft_state.hard_state = hs;
    }

    pub fn set_commit(&mut self, commit: Index) {
        self.raft_state.hard_state.commit = commit;
    }

    /// Stages the raft state record into `batch`.
    pub fn stage_raft_state(&self, batch: &mut LogBatch) {
        RaftLogEngine::put_raft_state(batch, self.shard_id, &self.raft_state);
    }

    fn read_term(&self, idx: Index) -> Result<Term> {
        if idx == self.apply_state.truncated_index {
            return Ok(self.apply_state.truncated_term);
        }
        if let Some(t) = self.cache.term(idx) {
            return Ok(t);
        }
        match self.engine.entry(self.shard_id, idx)? {
            Some(e) => Ok(e.term),
            None => Err(Error::Corruption {
                what: format!("shard {} entry {idx}", self.shard_id),
                detail: "missing from raft-engine".into(),
            }),
        }
    }
}

impl raft::Storage for ReplicaStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.raft_state.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        if low <= self.apply_state.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.raft_state.last_index + 1,
            "shard {} entries [{low}, {high}) beyond last index {}",
            self.shard_id,
            self.raft_state.last_index
        );
        let mut ents = Vec::with_capacity((high - low).min(1024) as usize);
        if low >= high {
            return Ok(ents);
        }
        let cache_first = self.cache.first_index().unwrap_or(u64::MAX);
        if low < cache_first {
            let engine_high = high.min(cache_first);
            let n = self
                .engine
                .fetch_entries(
                    self.shard_id,
                    low,
                    engine_high,
                    max_size.map(|s| s as usize),
                    &mut ents,
                )
                .map_err(store_err)?;
            if (n as u64) < engine_high - low {
                if n == 0 {
                    return Err(raft::Error::Store(StorageError::Unavailable));
                }
                // Cut short by max_size.
                return Ok(ents);
            }
        }
        if high > cache_first {
            self.cache.fetch(low.max(cache_first), high, &mut ents);
        }
        raft::util::limit_size(&mut ents, max_size);
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.apply_state.truncated_index {
            return Ok(self.apply_state.truncated_term);
        }
        if idx < self.apply_state.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.raft_state.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if idx == self.raft_state.last_index {
            return Ok(self.raft_state.last_term);
        }
        self.read_term(idx).map_err(store_err)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.apply_state.truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.raft_state.last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut st = self.snap_state.borrow_mut();
        match &*st {
            // A snapshot built before `to` joined the shard does not name
            // it in its configuration, and raft on `to` refuses it: such a
            // snapshot is never reused for it.
            SnapState::Ready(s)
                if s.index >= request_index
                    && s.index >= self.apply_state.truncated_index
                    && s.generated_at.elapsed() < SNAPSHOT_MAX_AGE
                    && conf_names(&s.conf_state, to) =>
            {
                return Ok(s.to_raft());
            }
            SnapState::Requested | SnapState::Generating => {}
            _ => *st = SnapState::Requested,
        }
        // Built in the background; raft asks again later.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn new_storage(dir: &std::path::Path) -> (Arc<RaftLogEngine>, ReplicaStorage) {
        let engine = RaftLogEngine::open(dir, &Default::default()).unwrap();
        let mut b = LogBatch::default();
        RaftLogEngine::put_raft_state(&mut b, 1, &initial_raft_state());
        engine.write(&mut b, true).unwrap();
        let s = ReplicaStorage::recover(
            1,
            11,
            engine.clone(),
            initial_apply_state(),
            ConfState::default(),
        )
        .unwrap();
        (engine, s)
    }

    #[test]
    fn bootstrapped_log_starts_truncated_at_init_index() {
        let dir = tempfile::tempdir().unwrap();
        let (_e, s) = new_storage(dir.path());
        assert_eq!(s.first_index().unwrap(), RAFT_INIT_INDEX + 1);
        assert_eq!(raft::Storage::last_index(&s).unwrap(), RAFT_INIT_INDEX);
        assert_eq!(s.term(RAFT_INIT_INDEX).unwrap(), RAFT_INIT_TERM);
        assert!(matches!(
            s.entries(5, 6, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
    }

    #[test]
    fn appended_entries_survive_restart_and_tail_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, mut s) = new_storage(dir.path());
        let mut b = LogBatch::default();
        s.append(&[ent(6, 6), ent(7, 6), ent(8, 6)], &mut b);
        s.stage_raft_state(&mut b);
        engine.write(&mut b, true).unwrap();
        // A new leader overwrites 8.
        let mut b = LogBatch::default();
        s.append(&[ent(8, 7)], &mut b);
        s.stage_raft_state(&mut b);
        engine.write(&mut b, true).unwrap();
        assert_eq!(s.term(8).unwrap(), 7);
        drop(s);
        drop(engine);

        let engine = RaftLogEngine::open(dir.path(), &Default::default()).unwrap();
        let s = ReplicaStorage::recover(1, 11, engine, initial_apply_state(), ConfState::default())
            .unwrap();
        assert_eq!(raft::Storage::last_index(&s).unwrap(), 8);
        assert_eq!(s.term(8).unwrap(), 7);
        assert_eq!(s.term(7).unwrap(), 6);
        let ents = s
            .entries(6, 9, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            ents.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(6, 6), (7, 6), (8, 7)]
        );
        // max_size always returns at least one entry.
        let one = s.entries(6, 9, 1, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn commit_is_raised_to_applied_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, mut s) = new_storage(dir.path());
        let mut b = LogBatch::default();
        s.append(&[ent(6, 6), ent(7, 6)], &mut b);
        s.stage_raft_state(&mut b);
        engine.write(&mut b, true).unwrap();
        let mut applied = initial_apply_state();
        applied.applied_index = 7;
        let s = ReplicaStorage::recover(1, 11, engine, applied, ConfState::default()).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 7);
    }
}
