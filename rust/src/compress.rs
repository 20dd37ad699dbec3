//! Server side of a transport stream (the fake Discord and benchmarks): one compressor per
//! connection, flushed after each message so the client can decode it at once.
use flate2::{Compress, Compression as Level, FlushCompress};
use zstd::stream::raw::{Encoder as ZstdEncoder, InBuffer, Operation, OutBuffer};

use crate::errors::{Error, Result};
use crate::inflate::Compression;

enum Ctx {
    Zlib(Box<Compress>),
    Zstd(Box<ZstdEncoder<'static>>),
}

/// A per-connection stream compressor.
pub struct Compressor {
    ctx: Ctx,
}

impl Compressor {
    /// zlib (with header, like Discord) or zstd at `level`.
    pub fn new(kind: Compression, level: i32) -> Result<Self> {
        let ctx = match kind {
            Compression::Zlib => {
                let level = u32::try_from(level.clamp(0, 9)).unwrap_or(6);
                Ctx::Zlib(Box::new(Compress::new(Level::new(level), true)))
            }
            Compression::Zstd => Ctx::Zstd(Box::new(
                ZstdEncoder::new(level).map_err(|e| Error::compression(e.to_string()))?,
            )),
            Compression::Plain => {
                return Err(Error::compression(
                    "a compressor needs zlib-stream or zstd-stream",
                ))
            }
        };
        Ok(Self { ctx })
    }

    /// Compresses one message and flushes (zlib: `Z_SYNC_FLUSH`, so the output ends with
    /// `00 00 ff ff`, even for an empty message, as stock zlib does; zstd: flush, the frame
    /// is never ended, so an empty message compresses to nothing).
    pub fn compress(&mut self, message: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(message.len() / 2 + 64);
        match &mut self.ctx {
            Ctx::Zlib(c) => {
                // Input first without flushing, then a sync flush with no input: the
                // no-flush call also keeps zlib from skipping the flush of an empty
                // message as a "duplicate" one.
                let mut input = message;
                for flush in [FlushCompress::None, FlushCompress::Sync] {
                    loop {
                        if out.capacity() - out.len() < 64 {
                            out.reserve(out.capacity().max(256));
                        }
                        let before = c.total_in();
                        c.compress_vec(input, &mut out, flush)
                            .map_err(|e| Error::compression(e.to_string()))?;
                        input = &input[(c.total_in() - before) as usize..];
                        if input.is_empty() && out.len() < out.capacity() {
                            break;
                        }
                    }
                }
            }
            Ctx::Zstd(e) => {
                let mut inb = InBuffer::around(message);
                loop {
                    if out.capacity() - out.len() < 64 {
                        out.reserve(out.capacity().max(256));
                    }
                    let pos = out.len();
                    let mut outb = OutBuffer::around_pos(&mut out, pos);
                    e.run(&mut inb, &mut outb)
                        .map_err(|e| Error::compression(e.to_string()))?;
                    if inb.pos() == message.len() {
                        break;
                    }
                }
                loop {
                    if out.capacity() - out.len() < 64 {
                        out.reserve(out.capacity().max(256));
                    }
                    let pos = out.len();
                    let mut outb = OutBuffer::around_pos(&mut out, pos);
                    let left = e
                        .flush(&mut outb)
                        .map_err(|e| Error::compression(e.to_string()))?;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }
}
