//! The codec fuzz target's checks, as a library so that `cargo test` replays the kept
//! inputs (regressions/) without AFL and the AFL binary is a two-line wrapper.
//!
//! Input layout: byte 0 picks the case, the rest is its data.
//!
//! * Raw frames (case % 4 in 0..3: plain, zlib-stream, zstd-stream): the data is cut into
//!   websocket frames by length bytes (`h`: fin = `h & 1`, length = `h >> 1`) and fed to a
//!   [`CodecCore`] as a shard would. Any bytes, so corrupt and truncated streams.
//! * Round trip (case % 4 == 3): the data is plaintext messages separated by `0xFF`
//!   bytes (never in UTF-8 text), compressed as Discord does (zlib-stream or zstd-stream by
//!   bit 2), and the compressed stream cut into frames at points the data also picks; with
//!   bit 3 the codec hibernates after every message. Every message must come out byte for
//!   byte, once, at its last frame; a message that is not a valid envelope must fail alone
//!   (`Error::Payload`) and leave the stream usable for the next one.
//!
//! For every message the codec returns, whatever the case: the body is
//! `{"shardId":N,"data":` + payload + `}`; and when serde_json reads the payload as an
//! object with unique keys whose `op`, `s` and `t` have the envelope's types, the scan must
//! agree with it (op, seq, t, the raw bytes of `d`), and must not have refused a message of
//! a kind whose `d` it does not read.
use std::sync::Arc;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use native::body;
use native::codec::CodecCore;
use native::errors::Error;
use native::filter::SharedFilter;
use native::inflate::Compression;
use native::scan::{self, Kind, Scan};

/// The shard id every fuzzed codec runs as (a multi-digit one, so the prefix is not trivial).
const SHARD: u64 = 17;
/// Small enough that `TooLarge` is reached by fuzzed inputs now and then.
const MAX_MESSAGE: usize = 1 << 16;

/// Runs one input; panics (an AFL crash) on any broken property.
pub fn check(data: &[u8]) {
    let Some((&case, rest)) = data.split_first() else {
        return;
    };
    match case % 4 {
        0 => raw_frames(Compression::Plain, rest),
        1 => raw_frames(Compression::Zlib, rest),
        2 => raw_frames(Compression::Zstd, rest),
        _ => round_trip(case, rest),
    }
}

fn new_core(compression: Compression) -> CodecCore {
    let filter = Some(Arc::new(SharedFilter::new(64, 60_000)));
    match CodecCore::new(SHARD, compression, MAX_MESSAGE, filter) {
        Ok(core) => core,
        Err(e) => panic!("a codec could not be made: {e:?}"),
    }
}

fn raw_frames(compression: Compression, mut data: &[u8]) {
    let mut core = new_core(compression);
    let mut clock = 0;
    // Uncompressed, the message is the frames since the last fin: kept to judge refusals.
    let mut plain: Vec<u8> = Vec::new();
    while let Some((&h, rest)) = data.split_first() {
        let len = usize::from(h >> 1).min(rest.len());
        let (frame, rest) = rest.split_at(len);
        data = rest;
        clock += 1;
        let fin = h & 1 == 1;
        if compression == Compression::Plain {
            plain.extend_from_slice(frame);
        }
        let res = core.feed_at(frame, fin, clock);
        if fin && compression == Compression::Plain {
            let message = std::mem::take(&mut plain);
            match &res {
                Ok(Some(_)) => assert_eq!(core.payload(), &message[..], "plain message changed"),
                Err(Error::Payload { .. }) => check_scan(&message),
                _ => {}
            }
        }
        match res {
            Ok(Some(_)) => check_message(&core, None),
            Ok(None) => {}
            // A broken stream stays broken until reset, as after a reconnect.
            Err(Error::Compression(_) | Error::TooLarge { .. }) => {
                if core.reset().is_err() {
                    panic!("reset failed");
                }
            }
            Err(Error::Payload { .. }) => {}
        }
    }
}

fn round_trip(case: u8, data: &[u8]) {
    let compression = if case & 4 == 0 {
        Compression::Zlib
    } else {
        Compression::Zstd
    };
    let hibernate = case & 8 != 0;
    // The last segment picks the frame cuts; the others are the messages.
    let mut parts: Vec<&[u8]> = data.split(|&b| b == 0xFF).collect();
    let cuts = if parts.len() > 1 {
        parts.pop().unwrap_or_default()
    } else {
        &[]
    };
    let mut compressor = match native::compress::Compressor::new(compression, 6) {
        Ok(c) => c,
        Err(e) => panic!("no compressor: {e:?}"),
    };
    let mut core = new_core(compression);
    let mut scratch = Vec::new();
    let mut cut_at = cuts.iter().copied().cycle();
    for (index, message) in parts.iter().enumerate() {
        if message.len() > MAX_MESSAGE {
            return;
        }
        let wire = match compressor.compress(message) {
            Ok(w) => w,
            Err(e) => panic!("compress failed: {e:?}"),
        };
        // zstd compresses an empty message to nothing: no frame, no message.
        if wire.is_empty() {
            continue;
        }
        let mut frames: Vec<&[u8]> = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let n = match cut_at.next() {
                Some(c) if !cuts.is_empty() => usize::from(c).clamp(1, rest.len()),
                _ => rest.len(),
            };
            let (frame, tail) = rest.split_at(n);
            frames.push(frame);
            rest = tail;
        }
        let last = frames.len() - 1;
        for (i, frame) in frames.iter().enumerate() {
            let fin = i == last;
            let res = core.feed_at(frame, fin, index as u64);
            match (fin, res) {
                (false, Ok(None)) => {}
                (false, other) => panic!("message {index}: a result before its last frame: {other:?}"),
                (true, Ok(Some(_))) => {
                    assert_eq!(
                        core.payload(),
                        *message,
                        "message {index} did not decode to itself"
                    );
                    check_message(&core, Some(message));
                }
                (true, Err(Error::Payload { .. })) => {
                    // Must be a message the scanner refuses on its own, rightly.
                    assert!(
                        scan::scan(message).is_err(),
                        "message {index}: payload error on a message that scans"
                    );
                    check_scan(message);
                }
                (true, other) => panic!("message {index}: {other:?} at its last frame"),
            }
        }
        if hibernate && core.hibernate(&mut scratch).is_err() {
            panic!("hibernate failed between messages");
        }
    }
}

/// The properties of one decoded message (see the module docstring).
fn check_message(core: &CodecCore, expected: Option<&[u8]>) {
    let payload = core.payload();
    if let Some(expected) = expected {
        assert_eq!(payload, expected);
    }
    assert_eq!(
        core.body(),
        &body::build(SHARD, payload)[..],
        "body is not the spliced payload"
    );
    agree_with_serde(payload, core.last(), true);
}

/// `(key, raw value)` pairs of a top-level object, duplicates kept.
struct Pairs<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Pairs<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Pairs(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Compares a successful scan with serde_json where serde_json can speak for the
/// envelope; `scanned` false means the scanner refused the payload.
fn agree_with_serde(payload: &[u8], scan: &Scan, scanned: bool) {
    let Ok(Pairs(pairs)) = serde_json::from_slice::<Pairs>(payload) else {
        return;
    };
    let mut keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if keys.windows(2).any(|w| w[0] == w[1]) {
        return; // duplicate keys: first vs last wins is not a contract
    }
    let raw = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.get());
    let Some(op) = raw("op").and_then(|v| v.parse::<i64>().ok()) else {
        return;
    };
    let seq = match raw("s") {
        None | Some("null") => None,
        Some(v) => match v.parse::<i64>() {
            Ok(s) => Some(s),
            Err(_) => return,
        },
    };
    let t: Option<String> = match raw("t") {
        None | Some("null") => None,
        Some(v) => match serde_json::from_str::<String>(v) {
            Ok(s) => Some(s),
            Err(_) => return,
        },
    };
    if !scanned {
        // Refusing is fine only where the scanner reads fields of d (their types can be
        // wrong); a message of another kind with a valid envelope must scan.
        let reads_d = matches!(op, scan::OP_HELLO | scan::OP_INVALID_SESSION)
            || (op == scan::OP_DISPATCH
                && !matches!(kind_of(t.as_deref()), Kind::Other));
        assert!(reads_d, "a valid envelope was refused: {:?}", String::from_utf8_lossy(payload));
        return;
    }
    assert_eq!(scan.op, op, "op");
    assert_eq!(scan.seq, seq, "s");
    let scanned_t = scan.t.clone().map(|span| {
        let bytes = &payload[span.clone()];
        if scan.t_escaped {
            scan::unescape(bytes, span.start).unwrap_or_default()
        } else {
            String::from_utf8_lossy(bytes).into_owned()
        }
    });
    assert_eq!(scanned_t, t, "t");
    let scanned_d = scan.d.clone().map(|span| &payload[span]);
    assert_eq!(scanned_d, raw("d").map(str::as_bytes), "the raw bytes of d");
}

fn kind_of(t: Option<&str>) -> Kind {
    match t {
        Some("READY") => Kind::Ready,
        Some("RESUMED") => Kind::Resumed,
        Some("GUILD_CREATE") => Kind::GuildCreate,
        Some("GUILD_DELETE") => Kind::GuildDelete,
        Some("MESSAGE_CREATE") => Kind::MessageCreate,
        Some("MESSAGE_UPDATE") => Kind::MessageUpdate,
        Some("MESSAGE_DELETE") => Kind::MessageDelete,
        _ => Kind::Other,
    }
}

/// Scans `payload` directly (no transport) and checks it like a decoded message: a
/// refusal must be one serde_json agrees with. Used by the raw plain-frames case too.
pub fn check_scan(payload: &[u8]) {
    match scan::scan(payload) {
        Ok(s) => agree_with_serde(payload, &s, true),
        Err(_) => agree_with_serde(payload, &Scan::default(), false),
    }
}
