//! `shardgate._native`: the per-frame Discord gateway codec.
use pyo3::prelude::*;

/// The Python module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
