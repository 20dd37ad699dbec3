//! Per-connection transport decompression: zlib-stream, zstd-stream or none.
//!
//! Frames are inflated as they arrive, straight into the caller's output buffer (which
//! already holds the forward-body prefix), so compressed bytes are never buffered and
//! the size limit is enforced while inflating: a decompression bomb stops within one
//! allocation step of `max_message_size`.
use std::cell::Cell;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};
use zstd::stream::raw::{DParameter, Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

use crate::errors::{Error, Result};

/// The zlib `Z_SYNC_FLUSH` marker that ends every zlib-stream gateway message.
pub const ZLIB_SUFFIX: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Smallest free space offered to the decompressor per call.
const MIN_CHUNK: usize = 4096;

/// Which transport compression a connection uses (the `compress=` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `compress=zlib-stream`: one zlib context, messages end with `00 00 ff ff`.
    Zlib,
    /// `compress=zstd-stream`: one zstd context, frame never ended, messages end at FIN.
    Zstd,
    /// No transport compression: text frames, messages end at FIN.
    Plain,
}

impl Compression {
    /// Parses the Python-facing name (`None` means plain).
    pub fn from_name(name: Option<&str>) -> Option<Self> {
        match name {
            Some("zlib-stream") => Some(Self::Zlib),
            Some("zstd-stream") => Some(Self::Zstd),
            None => Some(Self::Plain),
            Some(_) => None,
        }
    }

    /// The Python-facing name.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::Zlib => Some("zlib-stream"),
            Self::Zstd => Some("zstd-stream"),
            Self::Plain => None,
        }
    }
}

/// The deflate window: back-references reach at most this far.
const WINDOW: usize = 32 * 1024;

/// Largest zstd window accepted, as a log: 8 MiB, the most that zstd's levels 1 to 19
/// choose for a stream of unknown size. A frame that declares more is a compression
/// error at its header, before the decoder allocates the window (zstd's own default
/// limit is 2^27, 128 MiB per connection). Not derived from
/// `max_message_size`: a zstd-stream's window spans messages, so a small message limit
/// says nothing about the window the server compresses with.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

enum Context {
    Zlib(Box<Decompress>),
    /// A zlib context put away between messages ([`Transport::hibernate`]): its window,
    /// deflated on its own and sync-flushed (empty when nothing was inflated yet).
    ZlibAsleep(Box<[u8]>),
    Zstd(Box<ZstdDecoder<'static>>),
    Plain,
}

/// One connection's decompression state.
pub struct Transport {
    ctx: Context,
    kind: Compression,
    max_message_size: usize,
    /// The last (up to) 4 compressed bytes of the current message, for the marker check.
    tail: [u8; 4],
    tail_len: usize,
    /// Set after a compression error or an oversized message: refuse input until reset.
    broken: bool,
    /// zlib only: bytes of the 2-byte zlib header still to come, and its first byte.
    header_left: u8,
    cmf: u8,
    /// zlib only: the peer ended the deflate stream (Discord never does); then only the
    /// 4-byte Adler-32 trailer may follow.
    ended: bool,
    trailer_left: usize,
}

impl Transport {
    /// A fresh context.
    pub fn new(kind: Compression, max_message_size: usize) -> Result<Self> {
        let ctx = match kind {
            // Raw deflate with the zlib header parsed here: the Adler-32 trailer is only
            // at the end of the stream, which Discord never sends, so computing the
            // checksum over every message would protect nothing.
            Compression::Zlib => Context::Zlib(Box::new(Decompress::new(false))),
            Compression::Zstd => Context::Zstd(Box::new(zstd_decoder()?)),
            Compression::Plain => Context::Plain,
        };
        Ok(Self {
            ctx,
            kind,
            max_message_size,
            tail: [0; 4],
            tail_len: 0,
            broken: false,
            header_left: 2,
            cmf: 0,
            ended: false,
            trailer_left: 4,
        })
    }

    /// The compression this transport decodes.
    pub fn kind(&self) -> Compression {
        self.kind
    }

    /// Drops all stream state, as for a new connection.
    pub fn reset(&mut self) -> Result<()> {
        match &mut self.ctx {
            Context::Zlib(d) => d.reset(false),
            Context::ZlibAsleep(_) => self.ctx = Context::Zlib(Box::new(Decompress::new(false))),
            Context::Zstd(d) => d.reinit().map_err(|e| Error::compression(e.to_string()))?,
            Context::Plain => {}
        }
        self.tail_len = 0;
        self.broken = false;
        self.header_left = 2;
        self.ended = false;
        self.trailer_left = 4;
        Ok(())
    }

    /// Decompresses one websocket frame, appending to `out`; `out[..base]` is the caller's
    /// prefix and is not counted against the size limit.
    ///
    /// Returns `Ok(true)` when the frame completes a message (then `out[base..]` is it).
    /// On error the transport is broken until [`Transport::reset`]; the caller discards
    /// `out[base..]`.
    pub fn feed(
        &mut self,
        frame: &[u8],
        fin: bool,
        out: &mut Vec<u8>,
        base: usize,
    ) -> Result<bool> {
        if self.broken {
            return Err(broken());
        }
        let res = self.feed_inner(frame, fin, out, base);
        if res.is_err() {
            self.broken = true;
            self.tail_len = 0;
        }
        res
    }

    fn feed_inner(
        &mut self,
        frame: &[u8],
        fin: bool,
        out: &mut Vec<u8>,
        base: usize,
    ) -> Result<bool> {
        let limit = self.max_message_size;
        if let Context::ZlibAsleep(compact) = &self.ctx {
            self.ctx = Context::Zlib(wake(compact, out)?);
        }
        match &mut self.ctx {
            Context::Plain => {
                if out.len() - base + frame.len() > limit {
                    return Err(Error::TooLarge { limit });
                }
                out.extend_from_slice(frame);
                Ok(fin)
            }
            Context::Zstd(d) => {
                zstd_feed(d, frame, out, base, limit)?;
                Ok(fin)
            }
            Context::ZlibAsleep(_) => Err(Error::compression("zlib context still asleep")),
            Context::Zlib(d) => {
                let mut data = frame;
                while self.header_left > 0 {
                    let Some((&byte, rest)) = data.split_first() else {
                        break;
                    };
                    if self.header_left == 2 {
                        self.cmf = byte;
                    } else {
                        check_zlib_header(self.cmf, byte)?;
                    }
                    self.header_left -= 1;
                    data = rest;
                }
                if !self.ended {
                    if let Some(rest) = zlib_feed(d, data, out, base, limit)? {
                        self.ended = true;
                        data = &data[data.len() - rest..];
                    } else {
                        data = &[];
                    }
                }
                if self.ended {
                    if data.len() > self.trailer_left {
                        return Err(Error::compression("data after the end of the zlib stream"));
                    }
                    self.trailer_left -= data.len();
                }
                // Track the last 4 compressed bytes of this message across frames.
                if frame.len() >= 4 {
                    self.tail.copy_from_slice(&frame[frame.len() - 4..]);
                    self.tail_len = 4;
                } else {
                    for &b in frame {
                        self.tail.copy_within(1.., 0);
                        self.tail[3] = b;
                    }
                    self.tail_len = (self.tail_len + frame.len()).min(4);
                }
                let complete = fin && self.tail_len == 4 && self.tail == ZLIB_SUFFIX;
                if complete {
                    self.tail_len = 0;
                }
                Ok(complete)
            }
        }
    }
}

impl Transport {
    /// True when a zlib context is put away (see [`Transport::hibernate`]).
    pub fn asleep(&self) -> bool {
        matches!(self.ctx, Context::ZlibAsleep(_))
    }

    /// Puts an idle zlib context away: its 32 KiB window is kept deflated (a few KiB for
    /// gateway JSON) and the inflate state (about 45 KiB) is freed; the next frame
    /// rebuilds it, which costs about as much as inflating 32 KiB. Only between
    /// messages; `scratch` is working space. Returns whether the context was put away
    /// (not for zstd, plain, a broken stream, or in the middle of a message).
    ///
    /// The window is read back from the live context by inflating one crafted deflate
    /// block that copies the last `W` bytes (`W` = what was inflated, at most 32 KiB)
    /// from distance `W`, then an empty stored block: the output is exactly the window
    /// and the context is left as it was (same window, between blocks, byte-aligned).
    /// Re-inflating the deflated window into a fresh context restores that state.
    pub fn hibernate(&mut self, scratch: &mut Vec<u8>) -> Result<bool> {
        let Context::Zlib(d) = &mut self.ctx else {
            return Ok(false);
        };
        if self.broken || self.ended || self.tail_len != 0 {
            return Ok(false);
        }
        if self.header_left == 2 && d.total_in() == 0 {
            self.ctx = Context::ZlibAsleep(Box::default());
            return Ok(true);
        }
        let w = usize::try_from(d.total_out()).unwrap_or(WINDOW).min(WINDOW);
        if self.header_left != 0 || w < 3 {
            return Ok(false);
        }
        let res = read_window(d, w, scratch).and_then(|()| deflate_window(scratch));
        match res {
            Ok(compact) => {
                self.ctx = Context::ZlibAsleep(compact.into_boxed_slice());
                Ok(true)
            }
            Err(e) => {
                // The crafted block was (partly) inflated: the stream cannot be trusted.
                self.broken = true;
                Err(e)
            }
        }
    }
}

/// Inflates the crafted "copy the window" block into `scratch` (cleared first).
fn read_window(d: &mut Decompress, w: usize, scratch: &mut Vec<u8>) -> Result<()> {
    let block = window_copy_block(w);
    scratch.clear();
    scratch.reserve_exact(w + 1);
    let (in0, out0) = (d.total_in(), d.total_out());
    d.decompress_vec(&block, scratch, FlushDecompress::None)
        .map_err(|e| Error::compression(e.to_string()))?;
    if d.total_in() - in0 != block.len() as u64 || d.total_out() - out0 != w as u64 {
        return Err(Error::compression("could not read the zlib window back"));
    }
    Ok(())
}

thread_local! {
    /// The deflate context [`deflate_window`] reuses (about 270 KiB, one per thread that
    /// hibernates): allocating and freeing one per call would leave holes in the heap.
    static WINDOW_DEFLATE: Cell<Option<Box<Compress>>> = const { Cell::new(None) };
}

/// Deflates a window on its own, sync-flushed (so it ends byte-aligned between blocks).
fn deflate_window(window: &[u8]) -> Result<Vec<u8>> {
    let mut c = WINDOW_DEFLATE
        .with(Cell::take)
        .unwrap_or_else(|| Box::new(Compress::new(flate2::Compression::new(6), false)));
    c.reset();
    let mut out = Vec::with_capacity(window.len() / 4 + 64);
    let res = loop {
        let consumed = c.total_in() as usize;
        if let Err(e) = c.compress_vec(&window[consumed..], &mut out, FlushCompress::Sync) {
            break Err(Error::compression(e.to_string()));
        }
        if c.total_in() as usize == window.len() && out.len() < out.capacity() {
            out.shrink_to_fit();
            break Ok(out);
        }
        out.reserve(out.capacity().max(1024));
    };
    WINDOW_DEFLATE.with(|cell| cell.set(Some(c)));
    res
}

/// A fresh context whose window is the one [`deflate_window`] saved; `out` is working
/// space past its current length (restored before returning).
fn wake(compact: &[u8], out: &mut Vec<u8>) -> Result<Box<Decompress>> {
    let mut d = Box::new(Decompress::new(false));
    let len = out.len();
    let res = (|| {
        while (d.total_in() as usize) < compact.len() {
            out.reserve(WINDOW + 64);
            let before = (d.total_in(), d.total_out());
            d.decompress_vec(
                &compact[d.total_in() as usize..],
                out,
                FlushDecompress::None,
            )
            .map_err(|e| Error::compression(e.to_string()))?;
            if (d.total_in(), d.total_out()) == before {
                return Err(Error::compression("could not restore the zlib window"));
            }
        }
        Ok(())
    })();
    out.truncate(len);
    res.map(|()| d)
}

/// Little-endian bit packer for a deflate block.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    /// Appends the low `n` bits of `v`, least significant first.
    fn put(&mut self, v: u32, n: u32) {
        self.acc |= u64::from(v) << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// Appends a Huffman code (sent most significant bit first).
    fn code(&mut self, code: u32, n: u32) {
        self.put(code.reverse_bits() >> (32 - n), n);
    }

    /// A fixed-Huffman length/literal symbol (RFC 1951 3.2.6).
    fn fixed(&mut self, sym: u32) {
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xc0 + sym - 280, 8),
        }
    }

    /// A match of `len` (3..=258) bytes at distance `dist` (1..=32768).
    fn copy(&mut self, len: usize, dist: usize) {
        const LEN_BASE: [u16; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const LEN_EXTRA: [u8; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        const DIST_BASE: [u16; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
            1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DIST_EXTRA: [u8; 30] = [
            0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
            12, 13, 13,
        ];
        let l = LEN_BASE
            .iter()
            .rposition(|&b| usize::from(b) <= len)
            .unwrap_or(0);
        self.fixed(257 + l as u32);
        self.put(
            (len - usize::from(LEN_BASE[l])) as u32,
            u32::from(LEN_EXTRA[l]),
        );
        let c = DIST_BASE
            .iter()
            .rposition(|&b| usize::from(b) <= dist)
            .unwrap_or(0);
        self.code(c as u32, 5);
        self.put(
            (dist - usize::from(DIST_BASE[c])) as u32,
            u32::from(DIST_EXTRA[c]),
        );
    }
}

/// A fixed-Huffman block copying `w` (3..=32768) bytes from distance `w` (which outputs
/// the last `w` bytes inflated, in order), then an empty stored block (byte alignment).
pub fn window_copy_block(w: usize) -> Vec<u8> {
    let mut b = Bits {
        out: Vec::with_capacity(w / 258 * 2 + 16),
        acc: 0,
        n: 0,
    };
    b.put(0b010, 3); // BFINAL 0, BTYPE 01 (fixed)
    let mut left = w;
    while left > 0 {
        // Lengths are 3..=258: never leave a remainder of 1 or 2.
        let len = match left {
            0..=258 => left,
            259 | 260 => left - 3,
            _ => 258,
        };
        b.copy(len, w);
        left -= len;
    }
    b.fixed(256); // end of block
    b.put(0, 3); // BFINAL 0, BTYPE 00 (stored)
    if b.n > 0 {
        b.put(0, 8 - b.n);
    }
    b.out.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    b.out
}

/// A zstd streaming decoder with the window capped at [`ZSTD_WINDOW_LOG_MAX`] (a
/// parameter that survives its session resets, see [`Transport::reset`]).
fn zstd_decoder() -> Result<ZstdDecoder<'static>> {
    let mut d = ZstdDecoder::new().map_err(|e| Error::compression(e.to_string()))?;
    d.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(|e| Error::compression(e.to_string()))?;
    Ok(d)
}

/// A zstd decoding error; the window cap's (zstd: "Frame requires too much memory for
/// decoding") says which limit the frame broke.
#[cold]
fn zstd_error(e: &std::io::Error) -> Error {
    let msg = e.to_string();
    if msg.contains("too much memory") {
        Error::compression(format!(
            "{msg}: the zstd frame's window exceeds {} MiB (windowLog {ZSTD_WINDOW_LOG_MAX})",
            (1u32 << ZSTD_WINDOW_LOG_MAX) >> 20
        ))
    } else {
        Error::compression(msg)
    }
}

#[cold]
fn broken() -> Error {
    Error::compression("stream is broken by an earlier error; call reset()")
}

/// Makes room for at least one chunk of output without letting the message grow more
/// than one byte past `limit` (so an overflow is seen without inflating a bomb).
#[inline]
fn grow(out: &mut Vec<u8>, base: usize, limit: usize, hint: usize) -> Result<()> {
    let size = out.len() - base;
    if size > limit {
        return Err(Error::TooLarge { limit });
    }
    let spare = out.capacity() - out.len();
    if spare >= MIN_CHUNK || spare > limit - size {
        return Ok(());
    }
    let want = hint.max(size).max(MIN_CHUNK);
    let room = (limit - size).saturating_add(1);
    if want >= room {
        out.reserve_exact(room);
    } else {
        out.reserve(want);
    }
    Ok(())
}

/// Validates the 2-byte zlib header (RFC 1950): deflate, window <= 32 KiB, no preset
/// dictionary, check bits.
fn check_zlib_header(cmf: u8, flg: u8) -> Result<()> {
    let ok = cmf & 0x0f == 8
        && cmf >> 4 <= 7
        && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
        && flg & 0x20 == 0;
    if ok {
        Ok(())
    } else {
        Err(Error::compression(format!(
            "invalid zlib header {cmf:02x} {flg:02x}"
        )))
    }
}

/// Inflates `input` fully; returns `Some(unconsumed)` when the deflate stream ended.
fn zlib_feed(
    d: &mut Decompress,
    mut input: &[u8],
    out: &mut Vec<u8>,
    base: usize,
    limit: usize,
) -> Result<Option<usize>> {
    loop {
        grow(out, base, limit, input.len() * 4)?;
        let (in0, out0) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(input, out, FlushDecompress::None)
            .map_err(|e| Error::compression(e.to_string()))?;
        let consumed = (d.total_in() - in0) as usize;
        let produced = (d.total_out() - out0) as usize;
        input = &input[consumed..];
        if out.len() - base > limit {
            return Err(Error::TooLarge { limit });
        }
        let full = out.len() == out.capacity();
        match status {
            Status::StreamEnd => return Ok(Some(input.len())),
            Status::Ok | Status::BufError => {
                if input.is_empty() && !full {
                    return Ok(None);
                }
                if consumed == 0 && produced == 0 && !full {
                    return Err(Error::compression("inflate made no progress"));
                }
            }
        }
    }
}

/// Decompresses `input` fully with the streaming zstd context (the frame is never ended).
fn zstd_feed(
    d: &mut ZstdDecoder<'static>,
    input: &[u8],
    out: &mut Vec<u8>,
    base: usize,
    limit: usize,
) -> Result<()> {
    let mut inb = InBuffer::around(input);
    loop {
        grow(out, base, limit, input.len() * 4)?;
        let pos = out.len();
        let before_in = inb.pos();
        let produced = {
            let mut outb = OutBuffer::around_pos(out, pos);
            d.run(&mut inb, &mut outb).map_err(|e| zstd_error(&e))?;
            outb.pos() - pos
        };
        if out.len() - base > limit {
            return Err(Error::TooLarge { limit });
        }
        let full = out.len() == out.capacity();
        if inb.pos() == input.len() && !full {
            return Ok(());
        }
        if inb.pos() == before_in && produced == 0 && !full {
            return Err(Error::compression("zstd made no progress"));
        }
    }
}
