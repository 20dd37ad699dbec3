//! `shardgate._native`: the per-frame Discord gateway codec.
//!
//! The pure-Rust modules ([`inflate`], [`scan`], [`filter`], [`body`], [`compress`]) know
//! nothing of Python, so `cargo test` covers them; [`codec`] wraps them in pyclasses and
//! [`errors`] maps their errors to Python exceptions.
use pyo3::prelude::*;

pub mod batch;
pub mod body;
pub mod codec;
pub mod compress;
pub mod errors;
pub mod filter;
pub mod heap;
pub mod inflate;
pub mod pybatch;
pub mod scan;

use scan::Kind;

/// Give the free pages of the heap back to the OS now (glibc `malloc_trim(0)`); for a
/// moment after much was freed at once, such as a whole shard group after a reshard.
/// Returns False where there is nothing to call (not glibc).
#[pyfunction]
fn trim_heap() -> bool {
    heap::trim()
}

/// The Python module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<codec::ShardCodec>()?;
    m.add_class::<codec::PyEditFilter>()?;
    m.add_class::<codec::Message>()?;
    m.add_class::<codec::Inflater>()?;
    m.add_class::<codec::StreamCompressor>()?;
    m.add_function(wrap_pyfunction!(pybatch::ws_batch_frame, m)?)?;
    m.add_function(wrap_pyfunction!(trim_heap, m)?)?;
    m.add("DecodeError", py.get_type::<errors::DecodeError>())?;
    m.add(
        "CompressionError",
        py.get_type::<errors::CompressionError>(),
    )?;
    m.add("MessageTooLarge", py.get_type::<errors::MessageTooLarge>())?;
    m.add("PayloadError", py.get_type::<errors::PayloadError>())?;
    for (name, kind) in [
        ("KIND_OTHER", Kind::Other),
        ("KIND_READY", Kind::Ready),
        ("KIND_RESUMED", Kind::Resumed),
        ("KIND_GUILD_CREATE", Kind::GuildCreate),
        ("KIND_GUILD_DELETE", Kind::GuildDelete),
        ("KIND_MESSAGE_CREATE", Kind::MessageCreate),
        ("KIND_MESSAGE_UPDATE", Kind::MessageUpdate),
        ("KIND_MESSAGE_DELETE", Kind::MessageDelete),
    ] {
        m.add(name, kind as u8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
