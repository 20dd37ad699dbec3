//! The forward body `{"shardId":N,"data":<payload>}`, spliced from the raw payload.
//!
//! The codec writes the prefix once at the front of its output buffer and inflates each
//! message right after it, so the finished body is one contiguous slice: making the
//! Python `bytes` is a single allocation and memcpy, and the payload is never parsed
//! and re-serialised.

/// The bytes before the payload for `shard_id`.
pub fn prefix(shard_id: u64) -> Vec<u8> {
    format!("{{\"shardId\":{shard_id},\"data\":").into_bytes()
}

/// The byte after the payload.
pub const SUFFIX: u8 = b'}';

/// Builds a body in a fresh Vec (tests and tools; the codec splices in place).
pub fn build(shard_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = prefix(shard_id);
    out.reserve(payload.len() + 1);
    out.extend_from_slice(payload);
    out.push(SUFFIX);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_payload_spliced() {
        let payload = br#"{"t":null,"s":null,"op":11,"d":null}"#;
        let body = build(7, payload);
        assert_eq!(
            body,
            br#"{"shardId":7,"data":{"t":null,"s":null,"op":11,"d":null}}"#.to_vec()
        );
        assert_eq!(&body[prefix(7).len()..body.len() - 1], payload);
    }

    #[test]
    fn large_shard_ids_are_written_in_decimal() {
        assert_eq!(
            prefix(u64::from(u32::MAX)),
            br#"{"shardId":4294967295,"data":"#.to_vec()
        );
    }
}
