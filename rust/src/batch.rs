//! The websocket forwarding frame of one batch, written in one pass into one buffer:
//!
//! ```text
//! {"batch":<int>,"shard":<int>,"ids":["<event id>",...],"events":[<body>,<body>,...]}
//! ```
//!
//! The bodies are the forward bodies the codec built (`{"shardId":N,"data":…}`), copied
//! as they are; the ids are JSON strings. Built from what the outbox holds, so the batch
//! costs one allocation and one copy of each body instead of a list of ids, an `orjson`
//! call, and two joins in Python (see `forward_ws.py`).

/// Where a frame is written: a growing `Vec` (tests) or the exact-size buffer of a
/// Python `bytes` ([`SliceOut`]).
pub trait Out {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]);
}

impl Out for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Writes into a fixed slice; bytes past its end are counted, not written, so a wrong
/// size is an error the caller sees ([`SliceOut::finish`]), never a panic.
pub struct SliceOut<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> SliceOut<'a> {
    /// A writer at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// True when exactly the whole slice was written.
    pub fn finish(&self) -> bool {
        self.pos == self.buf.len()
    }
}

impl Out for SliceOut<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
    }
}

/// True when some byte of `id` must be escaped (a branch-free pass the compiler
/// vectorises: event ids are short visible ASCII and never need it).
#[inline]
fn needs_escape(id: &[u8]) -> bool {
    id.iter().fold(0u8, |acc, &c| {
        acc | u8::from(c < 0x20) | u8::from(c == b'"') | u8::from(c == b'\\')
    }) != 0
}

/// Bytes an id takes as a JSON string, quotes included.
pub fn id_len(id: &[u8]) -> usize {
    if !needs_escape(id) {
        return id.len() + 2;
    }
    2 + id.iter().map(|&c| escaped_len(c)).sum::<usize>()
}

#[inline]
fn escaped_len(c: u8) -> usize {
    match c {
        b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
        0..=0x1f => 6,
        _ => 1,
    }
}

/// Appends `id` (UTF-8) as a JSON string: quotes, backslashes and control characters
/// escaped, everything else as it is (JSON allows raw UTF-8).
pub fn push_id(out: &mut impl Out, id: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.put(b"\"");
    if !needs_escape(id) {
        out.put(id);
        out.put(b"\"");
        return;
    }
    let mut start = 0;
    for (i, &c) in id.iter().enumerate() {
        if escaped_len(c) == 1 {
            continue;
        }
        out.put(&id[start..i]);
        match c {
            b'"' => out.put(b"\\\""),
            b'\\' => out.put(b"\\\\"),
            b'\n' => out.put(b"\\n"),
            b'\r' => out.put(b"\\r"),
            b'\t' => out.put(b"\\t"),
            0x08 => out.put(b"\\b"),
            0x0c => out.put(b"\\f"),
            _ => out.put(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(c >> 4)],
                HEX[usize::from(c & 15)],
            ]),
        }
        start = i + 1;
    }
    out.put(&id[start..]);
    out.put(b"\"");
}

/// The frame's bytes before the ids.
pub fn head(batch_id: u64, shard_id: u64) -> String {
    format!("{{\"batch\":{batch_id},\"shard\":{shard_id},\"ids\":[")
}

/// Exact size of the frame for these ids and bodies.
pub fn frame_len<'a>(
    head_len: usize,
    ids: impl Iterator<Item = &'a [u8]>,
    bodies: impl Iterator<Item = &'a [u8]>,
) -> usize {
    let (mut n, mut total) = (0usize, head_len + b"],\"events\":[".len() + b"]}".len());
    for id in ids {
        total += id_len(id);
        n += 1;
    }
    for body in bodies {
        total += body.len();
    }
    // Commas between the ids and between the bodies.
    total + 2 * n.saturating_sub(1)
}

/// Writes the whole frame into `out` ([`frame_len`] bytes).
pub fn write_frame<'a>(
    out: &mut impl Out,
    head: &[u8],
    ids: impl Iterator<Item = &'a [u8]>,
    bodies: impl Iterator<Item = &'a [u8]>,
) {
    out.put(head);
    for (i, id) in ids.enumerate() {
        if i > 0 {
            out.put(b",");
        }
        push_id(out, id);
    }
    out.put(b"],\"events\":[");
    for (i, body) in bodies.enumerate() {
        if i > 0 {
            out.put(b",");
        }
        out.put(body);
    }
    out.put(b"]}");
}

/// A frame in a fresh Vec (tests and tools; the Python binding writes into the `bytes`).
pub fn build(batch_id: u64, shard_id: u64, events: &[(&[u8], &[u8])]) -> Vec<u8> {
    let head = head(batch_id, shard_id);
    let len = frame_len(
        head.len(),
        events.iter().map(|e| e.0),
        events.iter().map(|e| e.1),
    );
    let mut out = Vec::with_capacity(len);
    write_frame(
        &mut out,
        head.as_bytes(),
        events.iter().map(|e| e.0),
        events.iter().map(|e| e.1),
    );
    debug_assert_eq!(out.len(), len);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        /// Any ids (control characters, quotes, non-ASCII) and bodies: the frame parses as
        /// JSON to exactly those ids and bodies, and `frame_len` is its size.
        #[test]
        fn frames_parse_back_to_their_ids_and_bodies(
            batch_id in any::<u64>(),
            shard_id in any::<u64>(),
            events in proptest::collection::vec(
                ("\\PC{0,12}|[\\x00-\\x1f\"\\\\]{0,4}", any::<i64>(), "[a-z\"\\\\é]{0,8}"),
                0..12,
            ),
        ) {
            let bodies: Vec<Vec<u8>> = events
                .iter()
                .map(|(_, n, s)| serde_json::to_vec(&serde_json::json!({"shardId": n, "data": {"s": s}})).unwrap())
                .collect();
            let pairs: Vec<(&[u8], &[u8])> = events
                .iter()
                .zip(&bodies)
                .map(|((id, _, _), body)| (id.as_bytes(), &body[..]))
                .collect();
            let frame = build(batch_id, shard_id, &pairs);
            let v: Value = serde_json::from_slice(&frame).unwrap();
            prop_assert_eq!(&v["batch"], &serde_json::json!(batch_id));
            prop_assert_eq!(&v["shard"], &serde_json::json!(shard_id));
            let ids: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
            prop_assert_eq!(&v["ids"], &serde_json::json!(ids));
            let parsed: Vec<Value> = bodies.iter().map(|b| serde_json::from_slice(b).unwrap()).collect();
            prop_assert_eq!(&v["events"], &Value::Array(parsed));
        }
    }

    #[test]
    fn a_frame_is_the_documented_layout() {
        let frame = build(
            7,
            3,
            &[
                (b"3:abc:1", br#"{"shardId":3,"data":{"op":0}}"#),
                (b"3:abc:2", br#"{"shardId":3,"data":{"op":0,"s":2}}"#),
            ],
        );
        assert_eq!(
            std::str::from_utf8(&frame).unwrap_or_default(),
            r#"{"batch":7,"shard":3,"ids":["3:abc:1","3:abc:2"],"events":[{"shardId":3,"data":{"op":0}},{"shardId":3,"data":{"op":0,"s":2}}]}"#
        );
    }

    #[test]
    fn an_empty_batch_is_still_valid_json() {
        assert_eq!(
            build(1, 0, &[]),
            br#"{"batch":1,"shard":0,"ids":[],"events":[]}"#
        );
    }

    #[test]
    fn ids_are_escaped_as_json_strings() {
        let mut out = Vec::new();
        push_id(&mut out, b"a\"b\\c\n\x01\x7f\xc3\xa9");
        assert_eq!(out, b"\"a\\\"b\\\\c\\n\\u0001\x7f\xc3\xa9\"");
        assert_eq!(id_len(b"a\"b\\c\n\x01\x7f\xc3\xa9"), out.len());
    }
}
