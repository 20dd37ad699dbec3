//! `ws_batch_frame`: the Python binding of [`crate::batch`].
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::batch;

/// One outbox entry's id and body: an exact `(event_id, body)` tuple (what waits in the
/// outbox) or any object with `event_id` and `body` attributes (a gap record).
fn entry_parts<'py>(
    item: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyString>, Bound<'py, PyBytes>)> {
    let (id, body) = match item.cast_exact::<PyTuple>() {
        Ok(t) if t.len() == 2 => (t.get_item(0)?, t.get_item(1)?),
        Ok(_) => {
            return Err(PyValueError::new_err(
                "an entry tuple must be (event_id, body)",
            ))
        }
        Err(_) => (item.getattr("event_id")?, item.getattr("body")?),
    };
    let id = id
        .cast_into::<PyString>()
        .map_err(|_| PyTypeError::new_err("an event id must be a str"))?;
    let body = body
        .cast_into::<PyBytes>()
        .map_err(|_| PyTypeError::new_err("an event body must be bytes"))?;
    Ok((id, body))
}

/// The websocket frame of one batch (see `shardgate.forward_ws`), built in one pass.
///
/// # Errors
/// `TypeError`/`ValueError` for an entry that is not an id and a body; `UnicodeEncodeError`
/// for an id that is not valid UTF-8 (a lone surrogate).
#[pyfunction]
#[pyo3(signature = (batch_id, shard_id, entries))]
pub fn ws_batch_frame<'py>(
    py: Python<'py>,
    batch_id: u64,
    shard_id: u64,
    entries: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut parts = Vec::with_capacity(entries.len());
    for item in entries.iter() {
        parts.push(entry_parts(&item)?);
    }
    let mut ids: Vec<&[u8]> = Vec::with_capacity(parts.len());
    for (id, _) in &parts {
        ids.push(id.to_str()?.as_bytes());
    }
    let bodies: Vec<&[u8]> = parts.iter().map(|(_, b)| b.as_bytes()).collect();
    let head = batch::head(batch_id, shard_id);
    let len = batch::frame_len(head.len(), ids.iter().copied(), bodies.iter().copied());
    PyBytes::new_with(py, len, |buf| {
        let mut out = batch::SliceOut::new(buf);
        batch::write_frame(
            &mut out,
            head.as_bytes(),
            ids.iter().copied(),
            bodies.iter().copied(),
        );
        if out.finish() {
            Ok(())
        } else {
            Err(PyValueError::new_err("batch frame size mismatch (a bug)"))
        }
    })
}
