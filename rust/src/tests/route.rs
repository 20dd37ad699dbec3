//! The routing identity of a dispatch: the hash of `d`'s raw bytes and the guild to
//! route by (computed on demand, outside the per-message scan).
use super::fixtures::{
    ACK, GUILD_CREATE, GUILD_DELETE, HELLO, INVALID_SESSION, MESSAGE_CREATE, MESSAGE_DELETE,
    MESSAGE_EDIT, PRESENCE_UPDATE, READY, RECONNECT, RESUMED,
};
use crate::scan::{d_hash, route_guild_id, route_key, scan, top_level_snowflake, NO_D};

fn route(msg: &[u8]) -> Option<u64> {
    route_guild_id(msg, &scan(msg).unwrap())
}

fn hash(msg: &[u8]) -> u64 {
    let s = scan(msg).unwrap();
    d_hash(s.d.map(|d| &msg[d]))
}

/// A dispatch named `t` whose `d` is `d` (raw JSON text).
fn dispatch(t: &str, d: &str) -> Vec<u8> {
    format!(r#"{{"t":"{t}","s":1,"op":0,"d":{d}}}"#).into_bytes()
}

#[test]
fn the_hash_is_xxh3_64_of_the_raw_d_bytes() {
    // Reference values from an independent XXH3 implementation (the C library, through
    // Python's `xxhash.xxh3_64_intdigest`): the hash must never change between versions,
    // or two processes of a rolling reshard would not agree on an event's identity.
    assert_eq!(d_hash(Some(b"")), 0x2d06_8005_38d3_94c2);
    assert_eq!(d_hash(None), 0xb785_b6ec_423c_44e1);
    assert_eq!(d_hash(Some(br#"{"guild_id":"1"}"#)), 0x04d3_9af0_b45e_a706);
    assert_eq!(d_hash(Some(NO_D)), d_hash(None));
}

#[test]
fn same_d_same_hash_whatever_the_envelope() {
    let prefix = br#"{"t":"MESSAGE_CREATE","s":4,"op":0,"d":"#;
    let d_text =
        std::str::from_utf8(&MESSAGE_CREATE[prefix.len()..MESSAGE_CREATE.len() - 1]).unwrap();
    let a = format!(r#"{{"t":"MESSAGE_CREATE","s":4,"op":0,"d":{d_text}}}"#);
    let b = format!(r#"{{"t":"MESSAGE_CREATE","s":98765,"op":0,"d":{d_text}}}"#);
    let c = format!(r#"{{"d":{d_text}, "op":0, "s":17, "t":"MESSAGE_CREATE"}}"#);
    assert_eq!(a.as_bytes(), MESSAGE_CREATE);
    let h = hash(MESSAGE_CREATE);
    assert_eq!(h, d_hash(Some(d_text.as_bytes())));
    assert_eq!(hash(b.as_bytes()), h);
    assert_eq!(hash(c.as_bytes()), h);
    // Any other byte of d is another identity (the hash is of the raw text: even
    // whitespace counts, which is fine since Discord sends one event as one text).
    let spaced = format!(r#"{{"t":"MESSAGE_CREATE","s":4,"op":0,"d":{d_text} }}"#);
    assert_eq!(hash(spaced.as_bytes()), h, "whitespace after d is not d");
    let inner = d_text.replacen(':', ": ", 1);
    let spaced = format!(r#"{{"t":"MESSAGE_CREATE","s":4,"op":0,"d":{inner}}}"#);
    assert_ne!(hash(spaced.as_bytes()), h);
    assert_ne!(hash(MESSAGE_EDIT), h);
}

#[test]
fn no_d_and_null_d_hash_alike() {
    assert_eq!(hash(br#"{"op":11}"#), hash(ACK));
    assert_eq!(hash(ACK), d_hash(None));
    assert_eq!(hash(RECONNECT), d_hash(None));
    assert_ne!(hash(HELLO), d_hash(None));
}

#[test]
fn fixtures_route_by_guild_id_or_guild_events_by_id() {
    assert_eq!(route(MESSAGE_CREATE), Some(1_030_189_824_911_295_867));
    assert_eq!(route(MESSAGE_DELETE), Some(1_030_189_824_911_295_867));
    assert_eq!(route(PRESENCE_UPDATE), Some(1_030_191_098_277_861_744));
    assert_eq!(route(GUILD_DELETE), Some(613_425_648_685_547_541));
    // GUILD_CREATE: its own id, not the nested channel / member ids that come first.
    let s = scan(GUILD_CREATE).unwrap();
    assert!(s.guild_id.is_some());
    assert_eq!(route(GUILD_CREATE), s.guild_id);
    // No guild at the top level of d, or not a dispatch.
    for msg in [READY, RESUMED, HELLO, ACK, INVALID_SESSION, RECONNECT] {
        assert_eq!(route(msg), None, "{}", String::from_utf8_lossy(msg));
    }
}

#[test]
fn guild_events_use_id_and_others_guild_id() {
    let d = r#"{"guild_id":"11","id":"22"}"#;
    for t in ["GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"] {
        assert_eq!(route(&dispatch(t, d)), Some(22), "{t}");
    }
    for t in [
        "MESSAGE_CREATE",
        "GUILD_MEMBER_ADD",
        "GUILD_ROLE_UPDATE",
        "TYPING_START",
    ] {
        assert_eq!(route(&dispatch(t, d)), Some(11), "{t}");
    }
    // An escaped event name is read unescaped.
    assert_eq!(route(&dispatch(r"GUILD\u005fUPDATE", d)), Some(22));
    // A dispatch without t routes by guild_id; other opcodes never route.
    let no_t = br#"{"t":null,"s":1,"op":0,"d":{"guild_id":"5"}}"#;
    assert_eq!(route(no_t), Some(5));
    let op3 = br#"{"t":null,"s":null,"op":3,"d":{"guild_id":"5"}}"#;
    assert_eq!(route(op3), None);
    assert_eq!(route_key(0, Some(b"GUILD_CREATE")), Some(&b"id"[..]));
    assert_eq!(route_key(0, None), Some(&b"guild_id"[..]));
    assert_eq!(route_key(11, None), None);
}

#[test]
fn snowflake_shapes() {
    let cases: &[(&str, Option<u64>)] = &[
        (r#""1030189824911295867""#, Some(1_030_189_824_911_295_867)),
        ("1030189824911295867", Some(1_030_189_824_911_295_867)),
        (r#""18446744073709551615""#, Some(u64::MAX)),
        ("18446744073709551615", Some(u64::MAX)),
        (r#""0042""#, Some(42)),
        (r#""\u0031\u0032""#, Some(12)),
        (r#""18446744073709551616""#, None),
        ("18446744073709551616", None),
        (r#""""#, None),
        (r#""12a""#, None),
        (r#""+12""#, None),
        (r#""-12""#, None),
        (r#"" 12""#, None),
        (r#""1\n""#, None),
        ("-12", None),
        ("1.5", None),
        ("1e5", None),
        ("12.0", None),
        ("true", None),
        ("false", None),
        ("null", None),
        ("{}", None),
        (r#"{"id":"1"}"#, None),
        (r#"["1"]"#, None),
    ];
    for &(value, want) in cases {
        for t in ["MESSAGE_CREATE", "GUILD_UPDATE"] {
            let key = if t == "MESSAGE_CREATE" {
                "guild_id"
            } else {
                "id"
            };
            let msg = dispatch(t, &format!(r#"{{"a":1,"{key}":{value},"z":[]}}"#));
            assert_eq!(route(&msg), want, "{value} in {t}");
            let spaced = dispatch(t, &format!("{{ \"{key}\" :\n {value} }}"));
            assert_eq!(route(&spaced), want, "{value} spaced, in {t}");
        }
    }
}

#[test]
fn only_the_top_level_counts() {
    let cases: &[(&str, Option<u64>)] = &[
        // Nested guild_ids (before and after the real one) are skipped structurally.
        (
            r#"{"member":{"guild_id":"1"},"guild_id":"2","x":[{"guild_id":"3"}]}"#,
            Some(2),
        ),
        (r#"{"member":{"guild_id":"1"}}"#, None),
        (r#"{"a":[[{"guild_id":"1"}]]}"#, None),
        // Inside strings (content imitating keys) is not a key.
        (r#"{"content":"\"guild_id\":\"7\"","x":1}"#, None),
        (r#"{"content":"{\"guild_id\":7}","guild_id":"8"}"#, Some(8)),
        // Duplicates: the last wins, as in every JSON parser that builds a map.
        (r#"{"guild_id":"1","guild_id":"2"}"#, Some(2)),
        (r#"{"guild_id":"1","guild_id":null}"#, None),
        (r#"{"guild_id":true,"guild_id":"3"}"#, Some(3)),
        // Keys compared as raw bytes: an escaped spelling is not recognised.
        (r#"{"guild\u005fid":"1"}"#, None),
        (r#"{"guild_ids":"1","guild":"2","Guild_id":"3"}"#, None),
        ("{}", None),
        // d of another type.
        ("null", None),
        (r#""guild_id""#, None),
        (r#"[{"guild_id":"1"}]"#, None),
        ("12", None),
    ];
    for &(d, want) in cases {
        assert_eq!(route(&dispatch("MESSAGE_CREATE", d)), want, "{d}");
    }
    // Long values and keys around a 64-byte block boundary.
    for pad in 0..80 {
        let d = format!(
            r#"{{"{}":"{}","guild_id":"{pad}"}}"#,
            "k".repeat(pad % 70),
            "v".repeat(pad)
        );
        assert_eq!(
            route(&dispatch("TYPING_START", &d)),
            Some(pad as u64),
            "{d}"
        );
    }
}

#[test]
fn odd_spans_never_panic() {
    let msg = dispatch("MESSAGE_CREATE", r#"{"guild_id":"5"}"#);
    let s = scan(&msg).unwrap();
    let d = s.d.clone().unwrap();
    assert_eq!(top_level_snowflake(&msg, d.clone(), b"guild_id"), Some(5));
    for (start, end) in [
        (0, 0),
        (d.end, d.end),
        (d.start, d.end - 1),
        (d.start, 10_000),
    ] {
        let _ = top_level_snowflake(&msg, start..end, b"guild_id");
    }
    assert_eq!(
        top_level_snowflake(&msg, d.start..d.end - 1, b"guild_id"),
        None
    );
    assert_eq!(top_level_snowflake(&msg, d.clone(), b""), None);
    assert_eq!(top_level_snowflake(&msg, d, &[b'k'; 64]), None);
}
