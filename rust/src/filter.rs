//! editedMessages: drop `MESSAGE_UPDATE`s that change neither `content` nor
//! `edited_timestamp` (embed unfurls), using a fixed-size table of recent messages.
//!
//! The table is set-associative (8 ways per set, sets a power of two), keyed by the full
//! message id, so two messages never share an entry. Each entry keeps one 64-bit hash of
//! the raw bytes of `content` and `edited_timestamp` as Discord sent them (escapes
//! included: the same content always arrives as the same bytes) and the time it was last
//! written. Memory is allocated once, on the first message event, and never grows; a full
//! set evicts its oldest entry, and entries older than `max_age_ms` count as forgotten.
//!
//! Safety rule: an update is dropped only when it carries both keys and their hash equals
//! the stored one. A missing key is "unknown" and never matches, a forgotten message
//! passes, and every passed update overwrites the stored hash.

use std::sync::{Mutex, TryLockError};
use std::time::Instant;

/// Ways per set: 8 entries of 24 bytes, three cache lines.
const WAYS: usize = 8;

/// Stored hash meaning "not known" (a real hash equal to it is nudged to 1).
const UNKNOWN: u64 = 0;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// Message id; 0 = empty (snowflakes are never 0).
    id: u64,
    /// Hash of content + `edited_timestamp`, or [`UNKNOWN`].
    hash: u64,
    /// Milliseconds (filter clock) of the last write.
    stamp: u64,
}

/// Bytes of one table entry.
pub const ENTRY_BYTES: usize = std::mem::size_of::<Slot>();

/// The edit filter's table.
pub struct EditFilter {
    slots: Vec<Slot>,
    set_bits: u32,
    capacity: usize,
    max_age_ms: u64,
    /// `MESSAGE_UPDATE`s decided.
    pub updates: u64,
    /// `MESSAGE_UPDATE`s dropped.
    pub drops: u64,
}

/// What the filter decided for a `MESSAGE_UPDATE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Pass,
    /// Nothing the bot cares about changed: drop it.
    Drop,
}

impl EditFilter {
    /// A filter remembering about `capacity` messages (rounded up to a power of two of
    /// 8-way sets) for at most `max_age_ms`. Allocates nothing until first used.
    pub fn new(capacity: usize, max_age_ms: u64) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        Self {
            slots: Vec::new(),
            set_bits: sets.trailing_zeros(),
            capacity: sets * WAYS,
            max_age_ms,
            updates: 0,
            drops: 0,
        }
    }

    /// How long an entry counts as known.
    pub fn max_age_ms(&self) -> u64 {
        self.max_age_ms
    }

    /// Bytes allocated for the table (0 until the first message event).
    pub fn allocated_bytes(&self) -> usize {
        self.slots.capacity() * ENTRY_BYTES
    }

    /// Entries the table holds once allocated.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Combined hash of the raw `content` and `edited_timestamp` values; [`UNKNOWN`] when
    /// either key is missing.
    pub fn hash_fields(content: Option<&[u8]>, edited: Option<&[u8]>) -> u64 {
        match (content, edited) {
            (Some(c), Some(e)) => {
                let h = hash64(e, hash64(c, 0x243f_6a88_85a3_08d3));
                if h == UNKNOWN {
                    1
                } else {
                    h
                }
            }
            _ => UNKNOWN,
        }
    }

    fn set(&mut self, id: u64) -> &mut [Slot] {
        if self.slots.is_empty() {
            self.slots = vec![Slot::default(); self.capacity];
        }
        // Fibonacci hashing: snowflake low bits are a counter, high bits a timestamp.
        let set = if self.set_bits == 0 {
            0
        } else {
            (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.set_bits)) as usize
        };
        &mut self.slots[set * WAYS..(set + 1) * WAYS]
    }

    fn fresh(&self, slot: &Slot, now: u64) -> bool {
        slot.id != 0 && now.saturating_sub(slot.stamp) <= self.max_age_ms
    }

    /// Records a `MESSAGE_CREATE` (or any passed update) with its field hash.
    pub fn remember(&mut self, id: u64, hash: u64, now: u64) {
        if id == 0 {
            return;
        }
        let max_age = self.max_age_ms;
        let set = self.set(id);
        let mut victim = 0;
        let mut victim_score = u64::MAX;
        for (w, slot) in set.iter().enumerate() {
            if slot.id == id {
                victim = w;
                break;
            }
            // Empty and expired slots first, then the oldest.
            let score = if slot.id == 0 || now.saturating_sub(slot.stamp) > max_age {
                0
            } else {
                slot.stamp.saturating_add(1)
            };
            if score < victim_score {
                victim_score = score;
                victim = w;
            }
        }
        set[victim] = Slot {
            id,
            hash,
            stamp: now,
        };
    }

    /// Decides a `MESSAGE_UPDATE`; remembers it when it passes.
    pub fn update(&mut self, id: u64, hash: u64, now: u64) -> Verdict {
        self.updates += 1;
        let verdict = self.decide(id, hash, now);
        self.drops += u64::from(verdict == Verdict::Drop);
        verdict
    }

    fn decide(&mut self, id: u64, hash: u64, now: u64) -> Verdict {
        if id == 0 {
            return Verdict::Pass;
        }
        if hash != UNKNOWN && !self.slots.is_empty() {
            let max_age = self.max_age_ms;
            let set = self.set(id);
            if let Some(slot) = set.iter().find(|s| s.id == id) {
                let fresh = now.saturating_sub(slot.stamp) <= max_age;
                if fresh && slot.hash == hash {
                    return Verdict::Drop;
                }
            }
        }
        self.remember(id, hash, now);
        Verdict::Pass
    }

    /// Forgets a deleted message.
    pub fn forget(&mut self, id: u64) {
        if self.slots.is_empty() || id == 0 {
            return;
        }
        for slot in self.set(id) {
            if slot.id == id {
                *slot = Slot::default();
            }
        }
    }

    /// Number of live (non-expired) entries; for tests and stats.
    pub fn len(&self, now: u64) -> usize {
        self.slots.iter().filter(|s| self.fresh(s, now)).count()
    }

    /// True when no entry is live.
    pub fn is_empty(&self, now: u64) -> bool {
        self.len(now) == 0
    }
}

/// An [`EditFilter`] that several codecs share (message ids are global snowflakes, so
/// one table per process serves every shard), with the clock its entries are stamped by.
///
/// Codecs of one process are fed from one thread under the GIL, so the lock is never
/// contended; it is only tried, never waited for, and a busy or poisoned table counts
/// as "pass" (the safe answer) instead of blocking or panicking.
pub struct SharedFilter {
    table: Mutex<EditFilter>,
    epoch: Instant,
}

impl SharedFilter {
    /// A table of about `capacity` entries (allocated on first use).
    pub fn new(capacity: usize, max_age_ms: u64) -> Self {
        Self {
            table: Mutex::new(EditFilter::new(capacity, max_age_ms)),
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since this filter was created (the stamp clock).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs `f` on the table; `None` when it is busy (a re-entrant use) or poisoned.
    pub fn with<T>(&self, f: impl FnOnce(&mut EditFilter) -> T) -> Option<T> {
        match self.table.try_lock() {
            Ok(mut table) => Some(f(&mut table)),
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => None,
        }
    }
}

const K0: u64 = 0xa076_1d64_78bd_642f;
const K1: u64 = 0xe703_7ed1_a0b4_28db;
const K2: u64 = 0x8ebc_6af0_9c88_c6e3;
const K3: u64 = 0x5899_65cc_7537_4cc3;

#[inline]
fn mix(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline]
fn read8(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// A fast 64-bit non-cryptographic hash (wyhash-style folded multiplies), seeded.
pub fn hash64(data: &[u8], seed: u64) -> u64 {
    let len = data.len() as u64;
    let mut s = seed ^ mix(seed ^ K0, K1 ^ len);
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        s = mix(read8(c) ^ K1, read8(&c[8..]) ^ s);
    }
    let rest = chunks.remainder();
    let (a, b) = if rest.len() >= 8 {
        let mut tail = [0u8; 8];
        tail[..rest.len() - 8].copy_from_slice(&rest[8..]);
        (read8(rest), u64::from_le_bytes(tail))
    } else {
        let mut tail = [0u8; 8];
        tail[..rest.len()].copy_from_slice(rest);
        (u64::from_le_bytes(tail), 0)
    };
    s = mix(a ^ K2 ^ s, b ^ K3 ^ len.rotate_left(32));
    mix(s ^ K0, len ^ K1)
}
