//! `ShardCodec`, `Message` and `Inflater`: the Python-facing classes, over a pure-Rust
//! [`CodecCore`] that does inflate + scan + filter + body in one pass per message.
use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyString};

use crate::body;
use crate::errors::{Error, Result};
use crate::filter::{hash64, EditFilter, SharedFilter, Verdict};
use crate::inflate::{Compression, Transport};
use crate::scan::{self, Kind, Scan};

/// Output buffers above this capacity are shrunk back after a message.
const KEEP_CAPACITY: usize = 1 << 20;
/// The process-wide work buffers (see [`Bufs`]) keep at most this much between calls.
const SHARED_KEEP: usize = 256 << 10;
/// Largest edit filter (24 bytes an entry: 384 MiB).
const MAX_FILTER_CAPACITY: usize = 1 << 24;
/// Capacity of a codec's private edit filter (`edit_filter=True`): 24 KiB once used.
const PRIVATE_FILTER_CAPACITY: usize = 1024;
/// Capacity of an `EditFilter()` (shared by a process's shards): 1.5 MiB once used.
const SHARED_FILTER_CAPACITY: usize = 65536;
/// Default `max_age_ms` of both.
const FILTER_MAX_AGE_MS: u64 = 900_000;
/// Distinct `t` strings cached as Python objects per codec.
const T_CACHE_MAX: usize = 128;
/// Longest `t` cached, in raw bytes (Discord's longest event name is about 40): the
/// cache holds at most 128 x 64 bytes of names, whatever the server sends.
const T_CACHE_MAX_LEN: usize = 64;

/// Hasher for the small `t` cache: the filter's hash instead of `SipHash` (the keys are
/// Discord's event names; there is nothing to defend against in a 128-entry table).
#[derive(Default)]
struct NameHasher(u64);

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = hash64(bytes, self.0);
    }
}

type TCache = HashMap<Box<[u8]>, Py<PyString>, BuildHasherDefault<NameHasher>>;

/// Counters exposed by `stats()`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Complete messages decoded.
    pub messages: u64,
    /// Frames fed.
    pub frames: u64,
    /// Bytes fed (compressed).
    pub bytes_in: u64,
    /// Payload bytes produced (decompressed).
    pub bytes_out: u64,
    /// `MESSAGE_UPDATE`s the edit filter dropped.
    pub edits_dropped: u64,
    /// Errors of any kind.
    pub errors: u64,
}

/// One decoded message's filter verdict; its scan is [`CodecCore::last`] and its body
/// [`CodecCore::body`] until the next feed (kept in the core to avoid moving them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The edit filter says to drop it.
    pub drop: bool,
}

/// When to hibernate on its own (see [`CodecCore::set_sleep_when_idle`]).
#[derive(Debug, Default, Clone, Copy)]
struct IdleWatch {
    /// Hibernate after a heartbeat ACK that follows a whole beat without a dispatch.
    enabled: bool,
    /// A dispatch was decoded since the last heartbeat ACK.
    dispatched: bool,
    /// The last message was such an ACK: the caller should call `hibernate`.
    due: bool,
}

/// Everything per connection except Python objects.
///
/// The output buffer can be lent in and taken back around each call
/// ([`CodecCore::lend`], [`CodecCore::reclaim`]), so that the codecs of a process share
/// one work buffer and an idle codec holds none; a codec keeps a buffer only while a
/// message is split across calls.
pub struct CodecCore {
    transport: Transport,
    /// The forward-body prefix for this shard.
    prefix: Box<[u8]>,
    /// `prefix ++ payload ++ '}'` once a message is complete; may be empty (no prefix
    /// either) between messages, then the prefix is written at the next feed.
    buf: Vec<u8>,
    /// A complete body is in `buf`; cleared at the next feed.
    done: bool,
    filter: Option<Arc<SharedFilter>>,
    last: Scan,
    idle: IdleWatch,
    /// Counters.
    pub stats: Stats,
}

impl CodecCore {
    /// A codec for one connection of shard `shard_id`.
    pub fn new(
        shard_id: u64,
        compression: Compression,
        max_message_size: usize,
        filter: Option<Arc<SharedFilter>>,
    ) -> Result<Self> {
        Ok(Self {
            transport: Transport::new(compression, max_message_size)?,
            prefix: body::prefix(shard_id).into_boxed_slice(),
            buf: Vec::new(),
            done: false,
            filter,
            last: Scan::default(),
            idle: IdleWatch::default(),
            stats: Stats::default(),
        })
    }

    /// The compression in use.
    pub fn compression(&self) -> Compression {
        self.transport.kind()
    }

    /// Feeds one websocket frame; `Some` when it completed a message.
    pub fn feed(&mut self, frame: &[u8], fin: bool) -> Result<Option<Decoded>> {
        self.feed_inner(frame, fin, None)
    }

    /// [`CodecCore::feed`] with an explicit filter clock (milliseconds).
    pub fn feed_at(&mut self, frame: &[u8], fin: bool, now_ms: u64) -> Result<Option<Decoded>> {
        self.feed_inner(frame, fin, Some(now_ms))
    }

    fn feed_inner(
        &mut self,
        frame: &[u8],
        fin: bool,
        now_ms: Option<u64>,
    ) -> Result<Option<Decoded>> {
        if self.done || self.buf.len() < self.prefix.len() {
            self.buf.clear();
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf.shrink_to(KEEP_CAPACITY / 4);
            }
            self.buf.extend_from_slice(&self.prefix);
            self.done = false;
        }
        self.stats.frames += 1;
        self.stats.bytes_in += frame.len() as u64;
        self.idle.due = false;
        let res = self.decode(frame, fin, now_ms);
        if res.is_err() {
            self.stats.errors += 1;
            self.buf.truncate(self.prefix.len());
        }
        res
    }

    /// True while a message is split across calls (its output so far is in the buffer).
    fn in_progress(&self) -> bool {
        !self.done && self.buf.len() > self.prefix.len()
    }

    /// Offers `buf` as the output buffer for the next feed. Returns it unused when this
    /// codec is in the middle of a message (it keeps its own buffer then).
    pub fn lend(&mut self, buf: Vec<u8>) -> Option<Vec<u8>> {
        if self.in_progress() {
            return Some(buf);
        }
        self.buf = buf;
        self.buf.clear();
        self.done = false;
        None
    }

    /// Takes the output buffer back (leaving none) unless a message is in progress; the
    /// last message's body and payload are gone afterwards.
    pub fn reclaim(&mut self) -> Option<Vec<u8>> {
        if self.in_progress() {
            return None;
        }
        self.done = false;
        Some(std::mem::take(&mut self.buf))
    }

    /// Hibernate on its own after a heartbeat ACK when no dispatch arrived since the
    /// previous ACK (a whole heartbeat interval): [`CodecCore::sleep_due`] says when.
    pub fn set_sleep_when_idle(&mut self, on: bool) {
        self.idle.enabled = on;
    }

    /// The last message was a heartbeat ACK after an idle beat (see
    /// [`CodecCore::set_sleep_when_idle`]); cleared by the next feed or hibernate.
    pub fn sleep_due(&self) -> bool {
        self.idle.due
    }

    /// Puts an idle zlib context away (see [`crate::inflate::Transport::hibernate`]);
    /// refused in the middle of a message. `scratch` is working space.
    pub fn hibernate(&mut self, scratch: &mut Vec<u8>) -> Result<bool> {
        self.idle.due = false;
        if self.in_progress() {
            return Ok(false);
        }
        let res = self.transport.hibernate(scratch);
        if res.is_err() {
            self.stats.errors += 1;
        }
        res
    }

    /// True while the zlib context is put away.
    pub fn asleep(&self) -> bool {
        self.transport.asleep()
    }

    /// Capacity of the output buffer this codec holds.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn decode(&mut self, frame: &[u8], fin: bool, now_ms: Option<u64>) -> Result<Option<Decoded>> {
        if !self
            .transport
            .feed(frame, fin, &mut self.buf, self.prefix.len())?
        {
            return Ok(None);
        }
        let payload = &self.buf[self.prefix.len()..];
        self.last = scan::scan(payload)?;
        let scan = &self.last;
        // The clock is read only for the messages the filter stores; a busy table
        // (never expected: see SharedFilter) passes.
        let drop = match (&self.filter, scan.kind(), scan.message_id) {
            (Some(f), Kind::MessageCreate, Some(id)) => {
                let (hash, now) = (
                    field_hash(payload, scan),
                    now_ms.unwrap_or_else(|| f.now_ms()),
                );
                f.with(|t| t.remember(id, hash, now));
                false
            }
            (Some(f), Kind::MessageUpdate, Some(id)) => {
                let (hash, now) = (
                    field_hash(payload, scan),
                    now_ms.unwrap_or_else(|| f.now_ms()),
                );
                f.with(|t| t.update(id, hash, now)) == Some(Verdict::Drop)
            }
            (Some(f), Kind::MessageDelete, Some(id)) => {
                f.with(|t| t.forget(id));
                false
            }
            _ => false,
        };
        match self.last.op {
            scan::OP_DISPATCH => self.idle.dispatched = true,
            scan::OP_HEARTBEAT_ACK => {
                self.idle.due = self.idle.enabled && !self.idle.dispatched;
                self.idle.dispatched = false;
            }
            _ => {}
        }
        self.stats.messages += 1;
        self.stats.bytes_out += payload.len() as u64;
        self.stats.edits_dropped += u64::from(drop);
        self.buf.push(body::SUFFIX);
        self.done = true;
        Ok(Some(Decoded { drop }))
    }

    /// What the scanner found in the last decoded message (spans index
    /// [`CodecCore::payload`]).
    pub fn last(&self) -> &Scan {
        &self.last
    }

    /// Mutable access to the last scan (to move its owned fields out).
    pub fn last_mut(&mut self) -> &mut Scan {
        &mut self.last
    }

    /// The forward body of the last decoded message.
    pub fn body(&self) -> &[u8] {
        &self.buf
    }

    /// The payload of the last decoded message (valid after a `Some` from feed).
    pub fn payload(&self) -> &[u8] {
        let base = self.prefix.len().min(self.buf.len());
        if self.done {
            &self.buf[base..self.buf.len() - 1]
        } else {
            &self.buf[base..]
        }
    }

    /// Offset of the payload in the body.
    pub fn base(&self) -> usize {
        self.prefix.len()
    }

    /// A fresh decompression context; the edit filter and counters are kept.
    pub fn reset(&mut self) -> Result<()> {
        self.buf.clear();
        self.done = false;
        self.idle.dispatched = false;
        self.idle.due = false;
        self.transport.reset()
    }
}

fn field_hash(payload: &[u8], scan: &Scan) -> u64 {
    EditFilter::hash_fields(
        scan.content.clone().map(|r| &payload[r]),
        scan.edited_timestamp.clone().map(|r| &payload[r]),
    )
}

/// The work buffers the codecs of one thread share: the output buffer a message is
/// inflated into (lent to the codec for the call, see [`CodecCore::lend`]) and the copy of
/// a non-`bytes` frame. Taken out of the thread-local for the call and put back after, so
/// a re-entrant call (a finaliser run by an allocation, feeding another codec) just finds
/// none and allocates its own; nothing is ever borrowed across Python code.
#[derive(Default)]
struct Bufs {
    work: Vec<u8>,
    scratch: Vec<u8>,
}

thread_local! {
    static BUFS: Cell<Bufs> = const {
        Cell::new(Bufs {
            work: Vec::new(),
            scratch: Vec::new(),
        })
    };
}

impl Bufs {
    fn take() -> Self {
        BUFS.with(Cell::take)
    }

    /// Puts the buffers back for the next call, shrunk to [`SHARED_KEEP`] after a big
    /// message.
    fn give_back(mut self) {
        for b in [&mut self.work, &mut self.scratch] {
            if b.capacity() > SHARED_KEEP {
                b.clear();
                b.shrink_to(SHARED_KEEP);
            }
        }
        BUFS.with(|c| c.set(self));
    }
}

/// A `fin` argument: any object, by truthiness (picows' `frame.fin` is an int).
#[derive(Clone, Copy)]
pub struct Truthy(bool);

impl<'a, 'py> FromPyObject<'a, 'py> for Truthy {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(b) = obj.cast::<PyBool>() {
            return Ok(Self(b.is_true()));
        }
        obj.is_truthy().map(Self)
    }
}

/// Runs `f` on the bytes of a `bytes`, `bytearray` or `memoryview` (any C-contiguous
/// byte buffer). Non-`bytes` buffers are copied into `scratch` (a reused allocation),
/// because the slice must not outlive the exported buffer, which picows invalidates
/// after its callback.
fn with_bytes<T>(
    frame: &Bound<'_, PyAny>,
    scratch: &mut Vec<u8>,
    f: impl FnOnce(&[u8]) -> T,
) -> PyResult<T> {
    if let Ok(b) = frame.cast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    let buf = PyBuffer::<u8>::get(frame)?;
    scratch.clear();
    scratch.resize(buf.item_count(), 0);
    buf.copy_to_slice(frame.py(), scratch)?;
    drop(buf);
    Ok(f(scratch))
}

fn parse_compression(name: Option<&str>) -> PyResult<Compression> {
    Compression::from_name(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "compression must be 'zlib-stream', 'zstd-stream' or None, not {name:?}"
        ))
    })
}

fn check_size(max_message_size: usize) -> PyResult<usize> {
    if max_message_size == 0 {
        return Err(PyValueError::new_err("max_message_size must be positive"));
    }
    Ok(max_message_size)
}

/// One complete gateway message, scanned. Immutable.
#[allow(clippy::struct_field_names)] // `message_id` is the Python attribute name.
#[pyclass(frozen, module = "shardgate._native")]
pub struct Message {
    #[pyo3(get)]
    op: i64,
    #[pyo3(get)]
    seq: Option<i64>,
    #[pyo3(get)]
    t: Option<Py<PyString>>,
    #[pyo3(get)]
    kind: u8,
    #[pyo3(get)]
    body: Py<PyBytes>,
    payload_start: usize,
    /// Span of `d`'s raw JSON text in `body`; empty when the message has no `d`.
    d_start: usize,
    d_end: usize,
    #[pyo3(get)]
    drop: bool,
    #[pyo3(get)]
    heartbeat_interval: Option<u64>,
    #[pyo3(get)]
    session_id: Option<String>,
    #[pyo3(get)]
    resume_gateway_url: Option<String>,
    #[pyo3(get)]
    guild_ids: Option<Vec<u64>>,
    #[pyo3(get)]
    guild_id: Option<u64>,
    #[pyo3(get)]
    unavailable: Option<bool>,
    #[pyo3(get)]
    resumable: Option<bool>,
    #[pyo3(get)]
    message_id: Option<u64>,
    #[pyo3(get)]
    event_id: Option<Py<PyString>>,
}

#[pymethods]
impl Message {
    /// The decompressed gateway message exactly as Discord sent it (a copy).
    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let body = self.body.bind(py).as_bytes();
        let end = body.len().saturating_sub(1).max(self.payload_start);
        PyBytes::new(py, &body[self.payload_start..end])
    }

    /// XXH3-64 of the raw bytes of `d` exactly as they appear in the payload (of
    /// `null` when there is no `d`), computed on each call.
    fn d_hash(&self, py: Python<'_>) -> u64 {
        let body = self.body.bind(py).as_bytes();
        scan::d_hash(body.get(self.d_start..self.d_end).filter(|d| !d.is_empty()))
    }

    /// The guild a dispatch belongs to, for routing: `d.id` for `GUILD_CREATE`,
    /// `GUILD_UPDATE` and `GUILD_DELETE`, `d.guild_id` for any other dispatch; `None`
    /// when absent, not a snowflake, `d` is not an object, or the message is not a
    /// dispatch. Walks the top level of `d` on each call.
    fn route_guild_id(&self, py: Python<'_>) -> Option<u64> {
        let t = match &self.t {
            Some(t) => Some(t.bind(py).to_str().ok()?.as_bytes()),
            None => None,
        };
        let key = scan::route_key(self.op, t)?;
        if self.d_start >= self.d_end {
            return None;
        }
        let body = self.body.bind(py).as_bytes();
        scan::top_level_snowflake(body, self.d_start..self.d_end, key)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let t = self.t.as_ref().map_or_else(
            || "None".to_owned(),
            |t| format!("{:?}", t.bind(py).to_string()),
        );
        format!(
            "Message(op={}, seq={}, t={}, kind={}, drop={}, size={})",
            self.op,
            self.seq
                .map_or_else(|| "None".to_owned(), |s| s.to_string()),
            t,
            self.kind,
            if self.drop { "True" } else { "False" },
            self.body
                .bind(py)
                .as_bytes()
                .len()
                .saturating_sub(self.payload_start + 1)
        )
    }
}

/// The edit filter's table as a Python object, to share one among the codecs of a
/// process (message ids are global snowflakes).
#[pyclass(name = "EditFilter", frozen, module = "shardgate._native")]
pub struct PyEditFilter {
    inner: Arc<SharedFilter>,
}

fn check_capacity(capacity: usize) -> PyResult<usize> {
    if (1..=MAX_FILTER_CAPACITY).contains(&capacity) {
        Ok(capacity)
    } else {
        Err(PyValueError::new_err(format!(
            "edit filter capacity must be in 1..={MAX_FILTER_CAPACITY}"
        )))
    }
}

#[pymethods]
impl PyEditFilter {
    #[new]
    #[pyo3(signature = (capacity = SHARED_FILTER_CAPACITY, max_age_ms = FILTER_MAX_AGE_MS))]
    #[pyo3(text_signature = "(capacity=65536, max_age_ms=900000)")]
    fn new(capacity: usize, max_age_ms: u64) -> PyResult<Self> {
        Ok(Self {
            inner: Arc::new(SharedFilter::new(check_capacity(capacity)?, max_age_ms)),
        })
    }

    /// Entries the table holds (``capacity`` rounded up to whole 8-way sets).
    #[getter]
    fn capacity(&self) -> usize {
        self.inner.with(|t| t.capacity()).unwrap_or(0)
    }

    #[getter]
    fn max_age_ms(&self) -> u64 {
        self.inner.with(|t| t.max_age_ms()).unwrap_or(0)
    }

    /// Counters and size (walks the table: not for the hot path).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let now = self.inner.now_ms();
        let (entries, capacity, allocated, updates, drops) = self
            .inner
            .with(|t| {
                (
                    t.len(now),
                    t.capacity(),
                    t.allocated_bytes(),
                    t.updates,
                    t.drops,
                )
            })
            .unwrap_or_default();
        let d = PyDict::new(py);
        d.set_item("entries", entries)?;
        d.set_item("capacity", capacity)?;
        d.set_item("allocated_bytes", allocated)?;
        d.set_item("updates", updates)?;
        d.set_item("drops", drops)?;
        Ok(d)
    }
}

/// `ShardCodec(edit_filter=...)`: a shared [`PyEditFilter`], or a bool for a private
/// table (`True`) or none (`False`).
pub enum FilterArg {
    /// Use this shared table.
    Shared(Arc<SharedFilter>),
    /// A private table or none.
    Private(bool),
}

impl<'a, 'py> FromPyObject<'a, 'py> for FilterArg {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(b) = obj.cast::<PyBool>() {
            return Ok(Self::Private(b.is_true()));
        }
        match obj.cast::<PyEditFilter>() {
            Ok(f) => Ok(Self::Shared(f.get().inner.clone())),
            Err(_) => Err(PyTypeError::new_err(
                "edit_filter must be a bool or an EditFilter",
            )),
        }
    }
}

/// Per-connection decoder: feed every websocket frame, get a Message when one completes.
#[pyclass(module = "shardgate._native")]
pub struct ShardCodec {
    core: CodecCore,
    shard_id: u64,
    t_cache: TCache,
    /// `shard:session:` (see `event_prefix`); a dispatch's id is this plus its seq.
    event_prefix: Option<String>,
}

#[pymethods]
impl ShardCodec {
    #[new]
    #[pyo3(signature = (
        shard_id,
        compression = Some("zlib-stream"),
        *,
        max_message_size = 64 * 1024 * 1024,
        edit_filter = FilterArg::Private(true),
        edit_filter_capacity = PRIVATE_FILTER_CAPACITY,
        edit_filter_max_age_ms = FILTER_MAX_AGE_MS,
        hibernate_when_idle = false,
    ))]
    #[pyo3(text_signature = "(shard_id, compression='zlib-stream', *, \
        max_message_size=67108864, edit_filter=True, edit_filter_capacity=1024, \
        edit_filter_max_age_ms=900000, hibernate_when_idle=False)")]
    fn new(
        shard_id: u64,
        compression: Option<&str>,
        max_message_size: usize,
        edit_filter: FilterArg,
        edit_filter_capacity: usize,
        edit_filter_max_age_ms: u64,
        hibernate_when_idle: bool,
    ) -> PyResult<Self> {
        let compression = parse_compression(compression)?;
        let max_message_size = check_size(max_message_size)?;
        let filter = match edit_filter {
            FilterArg::Shared(f) => Some(f),
            FilterArg::Private(false) => None,
            FilterArg::Private(true) => Some(Arc::new(SharedFilter::new(
                check_capacity(edit_filter_capacity)?,
                edit_filter_max_age_ms,
            ))),
        };
        let mut core = CodecCore::new(shard_id, compression, max_message_size, filter)?;
        core.set_sleep_when_idle(hibernate_when_idle);
        Ok(Self {
            core,
            shard_id,
            t_cache: TCache::default(),
            event_prefix: None,
        })
    }

    /// The event id prefix (``shard:session:``) of the current session, or None: while
    /// set, every dispatch with a seq gets ``Message.event_id`` = prefix + seq, made here
    /// instead of in Python per event.
    #[getter]
    fn get_event_prefix(&self) -> Option<&str> {
        self.event_prefix.as_deref()
    }

    #[setter]
    fn set_event_prefix(&mut self, prefix: Option<String>) {
        self.event_prefix = prefix;
    }

    #[getter]
    fn shard_id(&self) -> u64 {
        self.shard_id
    }

    #[getter]
    fn compression(&self) -> Option<&'static str> {
        self.core.compression().name()
    }

    /// Consume one websocket frame; returns a Message when it completes one.
    #[pyo3(signature = (frame, fin = Truthy(true)))]
    #[pyo3(text_signature = "(self, /, frame, fin=True)")]
    fn feed(&mut self, frame: &Bound<'_, PyAny>, fin: Truthy) -> PyResult<Option<Message>> {
        let mut bufs = Bufs::take();
        if let Some(work) = self.core.lend(std::mem::take(&mut bufs.work)) {
            bufs.work = work;
        }
        let res = self.feed_lent(frame, fin.0, &mut bufs.scratch);
        if let Some(work) = self.core.reclaim() {
            bufs.work = work;
        }
        if self.core.sleep_due() {
            // Rare (an idle shard, once per heartbeat). A failure (never expected) breaks
            // the stream, so the next feed raises CompressionError; this message is fine.
            if let Ok(true) = self.core.hibernate(&mut bufs.scratch) {
                crate::heap::trim_soon();
            }
        }
        bufs.give_back();
        res
    }

    /// Start a fresh decompression context; the edit filter is kept, the cache of event
    /// names is emptied (a new connection refills it with Discord's few names).
    fn reset(&mut self) -> PyResult<()> {
        self.t_cache.clear();
        Ok(self.core.reset()?)
    }

    /// Put an idle zlib context away until the next frame (frees about 45 KiB).
    fn hibernate(&mut self) -> PyResult<bool> {
        let mut bufs = Bufs::take();
        let res = self.core.hibernate(&mut bufs.scratch);
        bufs.give_back();
        Ok(res?)
    }

    /// Counters (not for the hot path).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.core.stats;
        let d = PyDict::new(py);
        d.set_item("messages", s.messages)?;
        d.set_item("frames", s.frames)?;
        d.set_item("bytes_in", s.bytes_in)?;
        d.set_item("bytes_out", s.bytes_out)?;
        d.set_item("edits_dropped", s.edits_dropped)?;
        d.set_item("errors", s.errors)?;
        d.set_item("buffer_capacity", self.core.buffer_capacity())?;
        d.set_item("asleep", i64::from(self.core.asleep()))?;
        d.set_item("t_cache_entries", self.t_cache.len())?;
        d.set_item(
            "t_cache_bytes",
            self.t_cache.keys().map(|k| k.len()).sum::<usize>(),
        )?;
        Ok(d)
    }
}

impl ShardCodec {
    /// [`ShardCodec::feed`] once the work buffer is lent to the core.
    fn feed_lent(
        &mut self,
        frame: &Bound<'_, PyAny>,
        fin: bool,
        scratch: &mut Vec<u8>,
    ) -> PyResult<Option<Message>> {
        let py = frame.py();
        let core = &mut self.core;
        let decoded = with_bytes(frame, scratch, |b| core.feed(b, fin))??;
        let Some(Decoded { drop }) = decoded else {
            return Ok(None);
        };
        let base = self.core.base();
        let body = PyBytes::new(py, self.core.body());
        let last = self.core.last();
        let t = match last.t.clone() {
            Some(span) => Some(intern_t(
                &mut self.t_cache,
                py,
                &self.core.body()[base + span.start..base + span.end],
                last.t_escaped,
                span.start,
            )?),
            None => None,
        };
        let (d_start, d_end) = last
            .d
            .as_ref()
            .map_or((0, 0), |d| (base + d.start, base + d.end));
        let event_id = match (&self.event_prefix, last.op, last.seq) {
            (Some(prefix), scan::OP_DISPATCH, Some(seq)) => {
                Some(PyString::new(py, &event_id(prefix, seq)).unbind())
            }
            _ => None,
        };
        // Take the (rare) owned READY fields instead of cloning them.
        let scan = self.core.last_mut();
        Ok(Some(Message {
            op: scan.op,
            seq: scan.seq,
            t,
            kind: scan.kind() as u8,
            body: body.unbind(),
            payload_start: base,
            d_start,
            d_end,
            drop,
            heartbeat_interval: scan.heartbeat_interval,
            session_id: scan.session_id.take(),
            resume_gateway_url: scan.resume_gateway_url.take(),
            guild_ids: scan.guild_ids.take(),
            guild_id: scan.guild_id,
            unavailable: scan.unavailable,
            resumable: scan.resumable,
            message_id: scan.message_id,
            event_id,
        }))
    }
}

/// `prefix` followed by `seq` in decimal: an event id (`shardgate.envelope`).
pub fn event_id(prefix: &str, seq: i64) -> String {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = seq.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut out = String::with_capacity(prefix.len() + 21);
    out.push_str(prefix);
    if seq < 0 {
        out.push('-');
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
    out
}

/// The `t` string as a Python str, cached: event names repeat.
#[inline]
fn intern_t(
    cache: &mut TCache,
    py: Python<'_>,
    raw: &[u8],
    escaped: bool,
    at: usize,
) -> Result<Py<PyString>> {
    if raw.len() <= T_CACHE_MAX_LEN {
        if let Some(s) = cache.get(raw) {
            return Ok(s.clone_ref(py));
        }
    }
    new_t(cache, py, raw, escaped, at)
}

/// [`intern_t`] for a name not in the cache (rare: a codec sees a few dozen names), which
/// is cached when it is short and there is room.
#[inline(never)]
fn new_t(
    cache: &mut TCache,
    py: Python<'_>,
    raw: &[u8],
    escaped: bool,
    at: usize,
) -> Result<Py<PyString>> {
    let text = if escaped {
        scan::unescape(raw, at)?
    } else {
        std::str::from_utf8(raw)
            .map_err(|e| Error::payload(at + e.valid_up_to(), "valid UTF-8 in 't'"))?
            .to_owned()
    };
    let s = PyString::new(py, &text).unbind();
    if raw.len() <= T_CACHE_MAX_LEN && cache.len() < T_CACHE_MAX {
        cache.insert(raw.into(), s.clone_ref(py));
    }
    Ok(s)
}

/// Transport decompression alone, no scan, no filter, no body: the benchmark floor.
#[pyclass(module = "shardgate._native")]
pub struct Inflater {
    transport: Transport,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

#[pymethods]
impl Inflater {
    #[new]
    #[pyo3(signature = (compression = Some("zlib-stream"), *, max_message_size = 64 * 1024 * 1024))]
    #[pyo3(text_signature = "(compression='zlib-stream', *, max_message_size=67108864)")]
    fn new(compression: Option<&str>, max_message_size: usize) -> PyResult<Self> {
        let compression = parse_compression(compression)?;
        let max_message_size = check_size(max_message_size)?;
        Ok(Self {
            transport: Transport::new(compression, max_message_size)?,
            buf: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Consume one frame; returns the decompressed message when it completes one.
    #[pyo3(signature = (frame, fin = Truthy(true)))]
    #[pyo3(text_signature = "(self, /, frame, fin=True)")]
    fn feed<'py>(
        &mut self,
        frame: &Bound<'py, PyAny>,
        fin: Truthy,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let py = frame.py();
        let fin = fin.0;
        let transport = &mut self.transport;
        let buf = &mut self.buf;
        let done = with_bytes(frame, &mut self.scratch, |b| transport.feed(b, fin, buf, 0))?;
        match done {
            Ok(true) => {
                let out = PyBytes::new(py, &self.buf);
                self.buf.clear();
                if self.buf.capacity() > KEEP_CAPACITY {
                    self.buf.shrink_to(KEEP_CAPACITY / 4);
                }
                Ok(Some(out))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                self.buf.clear();
                Err(e.into())
            }
        }
    }

    /// Start a fresh decompression context.
    fn reset(&mut self) -> PyResult<()> {
        self.buf.clear();
        Ok(self.transport.reset()?)
    }
}

/// Server side of a transport stream (the fake Discord, benchmarks): one per connection.
#[pyclass(module = "shardgate._native")]
pub struct StreamCompressor {
    inner: crate::compress::Compressor,
    scratch: Vec<u8>,
}

#[pymethods]
impl StreamCompressor {
    #[new]
    #[pyo3(signature = (compression, level = 6))]
    fn new(compression: &str, level: i32) -> PyResult<Self> {
        let Some(kind @ (Compression::Zlib | Compression::Zstd)) =
            Compression::from_name(Some(compression))
        else {
            return Err(PyValueError::new_err(format!(
                "compression must be 'zlib-stream' or 'zstd-stream', not {compression:?}"
            )));
        };
        Ok(Self {
            inner: crate::compress::Compressor::new(kind, level)?,
            scratch: Vec::new(),
        })
    }

    /// Compress one gateway message and flush.
    fn compress<'py>(&mut self, message: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let py = message.py();
        let inner = &mut self.inner;
        let out = with_bytes(message, &mut self.scratch, |b| inner.compress(b))??;
        Ok(PyBytes::new(py, &out))
    }
}
