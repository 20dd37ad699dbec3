//! Per-connection transport decompression: zlib-stream, zstd-stream or none.
//!
//! Frames are inflated as they arrive, straight into the caller's output buffer (which
//! already holds the forward-body prefix), so compressed bytes are never buffered and
//! the size limit is enforced while inflating: a decompression bomb stops within one
//! allocation step of `max_message_size`.
use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

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

enum Context {
    Zlib(Box<Decompress>),
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
            Compression::Zstd => Context::Zstd(Box::new(
                ZstdDecoder::new().map_err(|e| Error::compression(e.to_string()))?,
            )),
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
            d.run(&mut inb, &mut outb)
                .map_err(|e| Error::compression(e.to_string()))?;
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
