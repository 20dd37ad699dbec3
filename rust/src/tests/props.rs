//! Property tests (the bounded fuzz CI runs): round trips through every transport with
//! arbitrary frame splits, the scanner against serde_json, and no panics on any bytes.
use std::fmt::Write as _;

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::fixtures::ALL;
use crate::compress::Compressor;
use crate::errors::Error;
use crate::inflate::{Compression, Transport};
use crate::scan::{d_hash, route_guild_id, scan, scan_any_layout, skip_value_at, Kind};

/// 96 cases per property keeps CI to a few seconds; `PROPTEST_CASES=5000` fuzzes longer.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(96);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings with the characters that trip scanners: quotes, backslashes, brackets,
/// colons, non-ASCII and astral code points.
fn tricky_string() -> impl Strategy<Value = String> {
    "[a-z \"\\\\{}\\[\\]:,/é😀\u{7f}\n]{0,24}"
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<i32>().prop_map(|i| json!(f64::from(i) / 4.0)),
        tricky_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec(
                (
                    prop_oneof![
                        tricky_string(),
                        Just("op".to_owned()),
                        Just("id".to_owned()),
                        Just("t".to_owned()),
                        Just("d".to_owned())
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Serialises with serde_json, optionally escaping every non-ASCII char and '/' the way
/// other encoders do, so both raw and escaped forms are exercised.
fn to_json(v: &Value, escape_all: bool) -> String {
    let s = serde_json::to_string(v).unwrap();
    if !escape_all {
        return s;
    }
    let mut out = String::with_capacity(s.len() * 2);
    let mut in_str = false;
    let mut esc = false;
    for ch in s.chars() {
        if in_str && !esc && (ch as u32 > 0x7e || ch == '/') {
            let mut buf = [0u16; 2];
            for unit in ch.encode_utf16(&mut buf) {
                let _ = write!(out, "\\u{unit:04x}");
            }
            continue;
        }
        if esc {
            esc = false;
        } else if ch == '\\' && in_str {
            esc = true;
        } else if ch == '"' {
            in_str = !in_str;
        }
        out.push(ch);
    }
    out
}

/// A gateway message: a message event whose d holds arbitrary extra keys.
fn message_event() -> impl Strategy<Value = (Value, String)> {
    (
        prop_oneof![
            Just("MESSAGE_CREATE"),
            Just("MESSAGE_UPDATE"),
            Just("GUILD_CREATE"),
            Just("TYPING_START")
        ],
        any::<u32>(),
        1u64..u64::MAX,
        tricky_string(),
        vec((tricky_string(), json_value()), 0..5),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(t, s, id, content, extra, escape_all, d_first)| {
            let mut d = serde_json::Map::new();
            for (k, v) in extra {
                if !matches!(
                    k.as_str(),
                    "id" | "content" | "edited_timestamp" | "unavailable"
                ) {
                    d.insert(k, v);
                }
            }
            d.insert("id".into(), json!(id.to_string()));
            d.insert("content".into(), json!(content));
            d.insert("edited_timestamp".into(), Value::Null);
            let d = Value::Object(d);
            let dj = to_json(&d, escape_all);
            let text = if d_first {
                format!(r#"{{"d":{dj},"op":0,"s":{s},"t":"{t}"}}"#)
            } else {
                format!(r#"{{"t":"{t}","s":{s},"op":0,"d":{dj}}}"#)
            };
            (d, text)
        })
}

/// Splits `frame` at the given cut points (fractions), with random FIN bits for zlib.
fn split<'a>(frame: &'a [u8], cuts: &[(u16, bool)]) -> Vec<(&'a [u8], bool)> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&(c, _)| usize::from(c) * frame.len() / usize::from(u16::MAX))
        .collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &p) in points.iter().enumerate() {
        out.push((&frame[start..p], cuts[i].1));
        start = p;
    }
    out.push((&frame[start..], true));
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_messages_split_anywhere_decode_to_the_original(
        msgs in vec(vec(any::<u8>(), 0..3000), 1..5),
        cuts in vec(vec((any::<u16>(), any::<bool>()), 0..5), 5),
        zstd in any::<bool>(),
    ) {
        let kind = if zstd { Compression::Zstd } else { Compression::Zlib };
        let mut comp = Compressor::new(kind, 6).unwrap();
        let mut t = Transport::new(kind, 1 << 20).unwrap();
        for (msg, cuts) in msgs.iter().zip(&cuts) {
            let frame = comp.compress(msg).unwrap();
            let mut out = Vec::new();
            let pieces = split(&frame, cuts);
            let mut completed = 0;
            for (i, &(piece, fin)) in pieces.iter().enumerate() {
                // zstd (and plain) messages end at FIN: only the last piece may have it.
                let fin = if zstd { i == pieces.len() - 1 } else { fin };
                if t.feed(piece, fin, &mut out, 0).unwrap() {
                    completed += 1;
                    prop_assert_eq!(i, pieces.len() - 1, "completed early");
                }
            }
            prop_assert_eq!(completed, 1);
            prop_assert_eq!(&out, msg);
        }
    }

    #[test]
    fn scan_agrees_with_serde_json((d, text) in message_event()) {
        let msg = text.as_bytes();
        let s = scan(msg).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(s.op, 0);
        prop_assert_eq!(Some(s.seq.unwrap()), v["s"].as_i64());
        prop_assert_eq!(std::str::from_utf8(&msg[s.t.clone().unwrap()]).unwrap(), v["t"].as_str().unwrap());
        let d_raw: Value = serde_json::from_slice(&msg[s.d.clone().unwrap()]).unwrap();
        prop_assert_eq!(&d_raw, &d);
        let id: u64 = d["id"].as_str().unwrap().parse().unwrap();
        match s.kind() {
            Kind::MessageCreate | Kind::MessageUpdate => {
                prop_assert_eq!(s.message_id, Some(id));
                let content: Value = serde_json::from_slice(&msg[s.content.clone().unwrap()]).unwrap();
                prop_assert_eq!(&content, &d["content"]);
                prop_assert_eq!(&msg[s.edited_timestamp.clone().unwrap()], b"null");
            }
            Kind::GuildCreate => prop_assert_eq!(s.guild_id, Some(id)),
            _ => prop_assert_eq!((s.message_id, s.guild_id), (None, None)),
        }
    }

    #[test]
    fn block_skip_agrees_with_a_byte_at_a_time_skip(
        v in json_value(),
        escape_all in any::<bool>(),
        pad in 0usize..70,
        cut in any::<u16>(),
    ) {
        let text = format!("{}{}", " ".repeat(pad), to_json(&v, escape_all));
        let b = text.as_bytes();
        prop_assert_eq!(skip_value_at(b, pad).ok(), reference_skip(b, pad));
        prop_assert_eq!(skip_value_at(b, pad).ok(), Some(b.len()));
        // Every truncation either fails in both or (for scalars) succeeds in both.
        let cut = pad + usize::from(cut) % (b.len() - pad + 1);
        prop_assert_eq!(skip_value_at(&b[..cut], pad).ok(), reference_skip(&b[..cut], pad));
    }

    #[test]
    fn scanner_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..600)) {
        let _ = scan(&bytes);
        let _ = skip_value_at(&bytes, 0);
    }

    #[test]
    fn scanner_never_panics_on_mutated_gateway_messages(
        which in 0..ALL.len(),
        edits in vec((any::<u16>(), prop_oneof![Just(b'"'), Just(b'\\'), Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b':'), Just(b','), any::<u8>()]), 1..6),
        truncate in any::<u16>(),
    ) {
        let mut msg = ALL[which].to_vec();
        for (at, byte) in edits {
            let i = usize::from(at) % msg.len();
            msg[i] = byte;
        }
        msg.truncate(usize::from(truncate) % (msg.len() + 1));
        match scan(&msg) {
            Ok(_) | Err(Error::Payload { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }
}

/// A deliberately simple skipper: one byte at a time, a Vec for the bracket stack.
fn reference_skip(b: &[u8], at: usize) -> Option<usize> {
    let first = *b.get(at)?;
    if first != b'{' && first != b'[' {
        return skip_value_at(b, at).ok(); // scalars share the same code on both sides
    }
    let mut stack = Vec::new();
    let mut i = at;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if in_str {
            match c {
                b'\\' => i += 1,
                b'"' => in_str = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'{' | b'[' => stack.push(c),
                b'}' | b']' => {
                    let open = stack.pop()?;
                    if (open == b'{') != (c == b'}') {
                        return None;
                    }
                    if stack.is_empty() {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn hibernating_at_any_message_boundary_is_invisible(
        msgs in vec(vec(any::<u8>(), 0..12_000), 1..6),
        repeat in vec((any::<u16>(), any::<u16>()), 6),
        sleeps in vec(any::<bool>(), 6),
    ) {
        // Messages repeat slices of earlier ones, so the window matters.
        let mut stream: Vec<Vec<u8>> = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let mut m = m.clone();
            if let Some(prev) = stream.last() {
                if !prev.is_empty() {
                    let at = usize::from(repeat[i].0) % prev.len();
                    let len = usize::from(repeat[i].1) % (prev.len() - at + 1);
                    m.extend_from_slice(&prev[at..at + len]);
                }
            }
            stream.push(m);
        }
        let mut comp = Compressor::new(Compression::Zlib, 6).unwrap();
        let mut t = Transport::new(Compression::Zlib, 1 << 20).unwrap();
        let mut scratch = Vec::new();
        let mut inflated: Option<usize> = None; // None: nothing fed yet
        for (msg, &sleep) in stream.iter().zip(&sleeps) {
            if sleep {
                // Refused only when fewer than 3 bytes were ever inflated (no window).
                let expect = inflated.map_or(true, |n| n >= 3);
                prop_assert_eq!(t.hibernate(&mut scratch).unwrap(), expect);
                prop_assert_eq!(t.asleep(), expect);
            }
            *inflated.get_or_insert(0) += msg.len();
            let frame = comp.compress(msg).unwrap();
            let mut out = Vec::new();
            prop_assert!(t.feed(&frame, true, &mut out, 0).unwrap());
            prop_assert_eq!(&out, msg);
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_discord_layout_fast_path_agrees_with_the_general_scan(
        (_, text) in message_event(),
        cut in any::<u16>(),
        junk in vec(any::<u8>(), 0..40),
    ) {
        let msg = text.as_bytes();
        prop_assert_eq!(scan(msg), scan_any_layout(msg));
        // Truncated (errors must be the same too) and with arbitrary bytes after the
        // envelope prefix, where the fast path gives up at every possible point.
        let cut = usize::from(cut) % (msg.len() + 1);
        prop_assert_eq!(scan(&msg[..cut]), scan_any_layout(&msg[..cut]));
        let mut odd = msg[..cut].to_vec();
        odd.extend_from_slice(&junk);
        prop_assert_eq!(scan(&odd), scan_any_layout(&odd));
    }
}

/// Raw JSON for the value of a routing key: snowflakes in every spelling the router
/// accepts (string, bare integer, escaped digits) and near misses of every kind.
fn route_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|v| format!("\"{v}\"")),
        any::<u64>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| {
            let mut digits = String::new();
            for c in v.to_string().chars() {
                let _ = write!(digits, "\\u{:04x}", c as u32);
            }
            format!("\"{digits}\"")
        }),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<i64>().prop_map(|v| format!("\"{v}\"")),
        Just("\"18446744073709551616\"".to_owned()),
        Just("184467440737095516160".to_owned()),
        any::<i32>().prop_map(|v| format!("{v}.5")),
        "\"[0-9a-z+. -]{0,22}\"",
        json_value().prop_map(|v| to_json(&v, false)),
    ]
}

/// Raw JSON text of a `d`: usually an object with a `guild_id` and/or `id` (maybe twice,
/// maybe nested deeper too) among other keys, sometimes another type.
fn routed_d() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        3 => Just("guild_id".to_owned()),
        3 => Just("id".to_owned()),
        4 => tricky_string(),
    ];
    let value = prop_oneof![
        3 => route_value(),
        1 => route_value().prop_map(|v| format!(r#"{{"guild_id":{v},"id":{v}}}"#)),
        1 => route_value().prop_map(|v| format!(r#"[{{"guild_id":{v}}},"guild_id",{v}]"#)),
        2 => json_value().prop_map(|v| to_json(&v, true)),
    ];
    prop_oneof![
        6 => (vec((key, value), 0..7), any::<bool>()).prop_map(|(entries, spaced)| {
            let sep = if spaced { " , " } else { "," };
            let body: Vec<String> = entries
                .iter()
                .map(|(k, v)| {
                    let k = to_json(&Value::String(k.clone()), true);
                    if spaced { format!("{k} :\n{v}") } else { format!("{k}:{v}") }
                })
                .collect();
            format!("{{{}}}", body.join(sep))
        }),
        1 => route_value(),
    ]
}

/// A gateway message around the raw `d` text: the event name, `s` and the layout
/// (Discord's key order, or `d` first with whitespace) vary.
fn envelope(t: &str, op: i64, s: u32, d_first: bool, d: &str) -> String {
    if d_first {
        format!(r#"{{ "d" : {d} , "op":{op}, "s":{s}, "t":"{t}" }}"#)
    } else {
        format!(r#"{{"t":"{t}","s":{s},"op":{op},"d":{d}}}"#)
    }
}

/// What a router that parses the whole message with serde_json finds.
fn reference_route(text: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(text).unwrap();
    if v["op"].as_i64() != Some(0) {
        return None;
    }
    let key = match v["t"].as_str() {
        Some("GUILD_CREATE" | "GUILD_UPDATE" | "GUILD_DELETE") => "id",
        _ => "guild_id",
    };
    match v["d"].as_object()?.get(key)? {
        Value::String(s) if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) => {
            s.parse().ok()
        }
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn d_hash_is_equal_iff_d_bytes_are_equal(
        d in routed_d(),
        other in routed_d(),
        t in prop_oneof![Just("MESSAGE_CREATE"), Just("GUILD_CREATE"), Just("TYPING_START")],
        (s1, s2) in (any::<u32>(), any::<u32>()),
        layouts in (any::<bool>(), any::<bool>()),
    ) {
        let a = envelope(t, 0, s1, layouts.0, &d);
        let b = envelope(t, 0, s2, layouts.1, &d);
        let c = envelope(t, 0, s1, layouts.0, &other);
        let hash = |text: &str| {
            let s = scan(text.as_bytes()).unwrap();
            prop_assert_eq!(&text.as_bytes()[s.d.clone().unwrap()], if text == c { other.as_bytes() } else { d.as_bytes() });
            Ok(d_hash(s.d.map(|r| &text.as_bytes()[r])))
        };
        let (ha, hb, hc) = (hash(&a)?, hash(&b)?, hash(&c)?);
        prop_assert_eq!(ha, hb);
        prop_assert_eq!(ha, xxhash_rust::xxh3::xxh3_64(d.as_bytes()));
        prop_assert_eq!(ha == hc, d == other);
    }

    #[test]
    fn route_guild_id_agrees_with_serde_json(
        d in routed_d(),
        t in prop_oneof![
            Just("GUILD_CREATE"), Just("GUILD_UPDATE"), Just("GUILD_DELETE"),
            Just("MESSAGE_CREATE"), Just("MESSAGE_DELETE"), Just("GUILD_MEMBER_ADD"),
            Just("READY"), Just("TYPING_START"),
        ],
        op in prop_oneof![4 => Just(0i64), 1 => Just(7i64), 1 => Just(10i64)],
        s in any::<u32>(),
        d_first in any::<bool>(),
    ) {
        let text = envelope(t, op, s, d_first, &d);
        let sc = scan(text.as_bytes()).unwrap();
        prop_assert_eq!(route_guild_id(text.as_bytes(), &sc), reference_route(&text), "{}", text);
    }
}

proptest! {
    #![proptest_config(config())]

    /// The native event id is the prefix and the seq in decimal, as Python's
    /// `f"{prefix}{seq}"` writes it, for every i64.
    #[test]
    fn native_event_ids_are_prefix_and_decimal_seq(prefix in "\\PC{0,30}", seq in any::<i64>()) {
        prop_assert_eq!(crate::codec::event_id(&prefix, seq), format!("{prefix}{seq}"));
    }
}

#[test]
fn native_event_ids_at_the_edges() {
    for seq in [0, 1, 9, 10, -1, i64::MAX, i64::MIN] {
        assert_eq!(crate::codec::event_id("3:s:", seq), format!("3:s:{seq}"));
    }
}
