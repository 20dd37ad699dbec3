//! The codec's error type and its one mapping to Python exceptions.
//!
//! Pure-Rust modules return [`Error`]; only [`From<Error> for PyErr`] knows about Python,
//! so `cargo test` exercises every error path without an interpreter.
use std::fmt;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

create_exception!(
    shardgate._native,
    DecodeError,
    PyValueError,
    "A frame or message could not be decoded."
);
create_exception!(
    shardgate._native,
    CompressionError,
    DecodeError,
    "Corrupt zlib/zstd data; the decompression context is unusable until reset()."
);
create_exception!(
    shardgate._native,
    MessageTooLarge,
    DecodeError,
    "A message exceeded max_message_size (also stops decompression bombs)."
);
create_exception!(
    shardgate._native,
    PayloadError,
    DecodeError,
    "The message decompressed but is not a valid gateway envelope (bad/truncated JSON)."
);

/// Everything that can go wrong while decoding one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Corrupt compressed data; the stream is broken until reset.
    Compression(String),
    /// The decompressed message would exceed `limit` bytes.
    TooLarge {
        /// The configured `max_message_size`.
        limit: usize,
    },
    /// Not a valid gateway envelope: `expected` was wanted at byte `offset` of the message.
    Payload {
        /// Byte offset in the decompressed message.
        offset: usize,
        /// What the scanner wanted to find there.
        expected: &'static str,
    },
}

impl Error {
    /// A payload error at `offset`; cold because valid gateway traffic never takes it.
    #[cold]
    #[inline(never)]
    pub fn payload(offset: usize, expected: &'static str) -> Self {
        Self::Payload { offset, expected }
    }

    /// A compression error with a message.
    #[cold]
    #[inline(never)]
    pub fn compression(msg: impl Into<String>) -> Self {
        Self::Compression(msg.into())
    }

    /// True when the transport stream is still intact (only payload errors).
    pub fn stream_intact(&self) -> bool {
        matches!(self, Self::Payload { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Compression(msg) => write!(f, "corrupt compressed stream: {msg}"),
            Self::TooLarge { limit } => {
                write!(f, "message exceeds max_message_size ({limit} bytes)")
            }
            Self::Payload { offset, expected } => {
                write!(
                    f,
                    "invalid gateway payload at byte {offset}: expected {expected}"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for PyErr {
    fn from(err: Error) -> Self {
        let msg = err.to_string();
        match err {
            Error::Compression(_) => CompressionError::new_err(msg),
            Error::TooLarge { .. } => MessageTooLarge::new_err(msg),
            Error::Payload { .. } => PayloadError::new_err(msg),
        }
    }
}

/// Result alias for the codec.
pub type Result<T> = std::result::Result<T, Error>;
