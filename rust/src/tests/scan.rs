//! The envelope scan: fields per kind, key order, decoys, strings, and structural errors.
use super::fixtures::{
    ACK, GUILD_CREATE, GUILD_DELETE, HELLO, INVALID_SESSION, MESSAGE_CREATE, MESSAGE_DELETE,
    MESSAGE_EDIT, PRESENCE_UPDATE, READY, RECONNECT, RESUMED,
};
use crate::errors::Error;
use crate::scan::{scan, scan_any_layout, unescape, Kind, Scan};

fn t_of<'a>(msg: &'a [u8], s: &Scan) -> Option<&'a [u8]> {
    s.t.clone().map(|r| &msg[r])
}

#[test]
fn ack_is_a_bare_envelope() {
    assert_eq!(ACK.len(), 36);
    let s = scan(ACK).unwrap();
    assert_eq!(
        (s.op, s.seq, s.t.clone(), s.kind()),
        (11, None, None, Kind::Other)
    );
    assert_eq!(&ACK[s.d.unwrap()], b"null");
}

#[test]
fn hello_heartbeat_interval() {
    let s = scan(HELLO).unwrap();
    assert_eq!(s.op, 10);
    assert_eq!(s.heartbeat_interval, Some(41250));
    assert_eq!(s.kind(), Kind::Other);
}

#[test]
fn ready_session_resume_url_and_guilds() {
    let s = scan(READY).unwrap();
    assert_eq!((s.op, s.seq, s.kind()), (0, Some(1), Kind::Ready));
    assert_eq!(t_of(READY, &s), Some(&b"READY"[..]));
    assert_eq!(s.session_id.as_deref(), Some("9f2c8b1e7d\u{e9}\"x\\y"));
    assert_eq!(
        s.resume_gateway_url.as_deref(),
        Some("wss://gateway-us-east1-c.discord.gg")
    );
    assert_eq!(
        s.guild_ids,
        Some(vec![81_384_788_765_712_384, 613_425_648_685_547_541])
    );
}

#[test]
fn resumed_reconnect_invalid_session() {
    let s = scan(RESUMED).unwrap();
    assert_eq!((s.kind(), s.seq), (Kind::Resumed, Some(42)));
    let s = scan(RECONNECT).unwrap();
    assert_eq!((s.op, s.kind()), (7, Kind::Other));
    let s = scan(INVALID_SESSION).unwrap();
    assert_eq!((s.op, s.resumable), (9, Some(false)));
    let s = scan(br#"{"op":9,"d":true}"#).unwrap();
    assert_eq!(s.resumable, Some(true));
}

#[test]
fn guild_create_and_delete_ignore_nested_ids_and_decoys() {
    let s = scan(GUILD_CREATE).unwrap();
    assert_eq!((s.op, s.kind()), (0, Kind::GuildCreate));
    assert_eq!(s.guild_id, Some(81_384_788_765_712_384));
    assert_eq!(s.unavailable, Some(false));
    let s = scan(GUILD_DELETE).unwrap();
    assert_eq!(
        (s.kind(), s.guild_id, s.unavailable),
        (Kind::GuildDelete, Some(613_425_648_685_547_541), Some(true))
    );
    let s = scan(br#"{"op":0,"t":"GUILD_DELETE","s":2,"d":{"id":"5"}}"#).unwrap();
    assert_eq!(
        (s.guild_id, s.unavailable),
        (Some(5), None),
        "absent unavailable is None"
    );
}

#[test]
fn message_events_id_content_and_edited_timestamp_spans() {
    let s = scan(MESSAGE_CREATE).unwrap();
    assert_eq!((s.op, s.seq, s.kind()), (0, Some(4), Kind::MessageCreate));
    assert_eq!(s.message_id, Some(1_456_074_444_472_168_448));
    let content = &MESSAGE_CREATE[s.content.clone().unwrap()];
    assert_eq!(
        content,
        br#""look {\"op\":7,\"t\":\"X\",\"d\":{}} https:\/\/example.com \u00e9""#
    );
    assert_eq!(
        &MESSAGE_CREATE[s.edited_timestamp.clone().unwrap()],
        b"null"
    );
    let s = scan(MESSAGE_EDIT).unwrap();
    assert_eq!(s.kind(), Kind::MessageUpdate);
    assert_eq!(
        &MESSAGE_EDIT[s.edited_timestamp.clone().unwrap()],
        br#""2026-01-01T00:01:00.000000+00:00""#
    );
    let s = scan(MESSAGE_DELETE).unwrap();
    assert_eq!(
        (s.kind(), s.message_id),
        (Kind::MessageDelete, Some(1_456_074_444_472_168_448))
    );
    assert_eq!(s.content, None);
}

#[test]
fn other_dispatches_keep_d_raw() {
    let s = scan(PRESENCE_UPDATE).unwrap();
    assert_eq!((s.kind(), s.seq), (Kind::Other, Some(9)));
    assert_eq!(t_of(PRESENCE_UPDATE, &s), Some(&b"PRESENCE_UPDATE"[..]));
    let d = &PRESENCE_UPDATE[s.d.unwrap()];
    assert!(d.starts_with(b"{\"user\"") && d.ends_with(b"]}"));
}

/// Rebuilds an envelope with its four keys in the given order.
fn envelope(order: &[usize; 4], t: &str, s: &str, op: &str, d: &str) -> Vec<u8> {
    let parts = [
        format!("\"t\":{t}"),
        format!("\"s\":{s}"),
        format!("\"op\":{op}"),
        format!("\"d\":{d}"),
    ];
    let body: Vec<&str> = order.iter().map(|&i| parts[i].as_str()).collect();
    format!("{{{}}}", body.join(",")).into_bytes()
}

fn permutations() -> Vec<[usize; 4]> {
    let mut out = Vec::new();
    for a in 0..4 {
        for b in 0..4 {
            for c in 0..4 {
                for d in 0..4 {
                    let p = [a, b, c, d];
                    let mut seen = [false; 4];
                    for &i in &p {
                        seen[i] = true;
                    }
                    if seen.iter().all(|&x| x) {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn key_order_does_not_matter() {
    let d = r#"{"op":7,"s":99,"t":"READY","d":{"id":"1"},"id":"1456074444472168448","content":"x \"op\":1","edited_timestamp":null}"#;
    let orders = permutations();
    assert_eq!(orders.len(), 24);
    for order in &orders {
        let msg = envelope(order, "\"MESSAGE_UPDATE\"", "17", "0", d);
        let s = scan(&msg).unwrap();
        assert_eq!(
            (s.op, s.seq, s.kind()),
            (0, Some(17), Kind::MessageUpdate),
            "{}",
            String::from_utf8_lossy(&msg)
        );
        assert_eq!(s.message_id, Some(1_456_074_444_472_168_448));
        assert_eq!(&msg[s.content.clone().unwrap()], br#""x \"op\":1""#);
        assert_eq!(&msg[s.d.clone().unwrap()], d.as_bytes());
        let msg = envelope(
            order,
            "null",
            "null",
            "10",
            r#"{"_trace":["x"],"heartbeat_interval":45000}"#,
        );
        assert_eq!(scan(&msg).unwrap().heartbeat_interval, Some(45000));
        let msg = envelope(order, "null", "null", "9", "true");
        assert_eq!(scan(&msg).unwrap().resumable, Some(true));
        let msg = envelope(
            order,
            "\"READY\"",
            "1",
            "0",
            r#"{"session_id":"a\/b","guilds":[]}"#,
        );
        let s = scan(&msg).unwrap();
        assert_eq!(
            (s.session_id.as_deref(), s.guild_ids.clone()),
            (Some("a/b"), Some(vec![]))
        );
    }
}

#[test]
fn whitespace_is_allowed_everywhere_json_allows_it() {
    let msg = b" {\n \"t\" : \"MESSAGE_CREATE\" ,\r\n\t\"s\" : 3 , \"op\" : 0 , \"d\" : { \"id\" : \"12\" , \"content\" : \"a\" , \"edited_timestamp\" : null , \"x\" : [ 1 , { } ] } } \n";
    let s = scan(msg).unwrap();
    assert_eq!(
        (s.seq, s.kind(), s.message_id),
        (Some(3), Kind::MessageCreate, Some(12))
    );
    assert_eq!(&msg[s.content.clone().unwrap()], b"\"a\"");
    assert_eq!(&msg[s.edited_timestamp.clone().unwrap()], b"null");
}

#[test]
fn unknown_top_level_keys_are_skipped() {
    let msg = br#"{"x":{"op":1},"op":11,"y":[1,2,{"d":3}],"d":null,"z":"op"}"#;
    let s = scan(msg).unwrap();
    assert_eq!(s.op, 11);
}

#[test]
fn unescape_handles_every_json_escape() {
    let raw = br#"a\"b\\c\/d\b\f\n\r\t\u00e9\u4e2d\ud83d\ude00"#;
    assert_eq!(
        unescape(raw, 0).unwrap(),
        "a\"b\\c/d\u{8}\u{c}\n\r\t\u{e9}\u{4e2d}\u{1f600}"
    );
    assert!(unescape(br"\ud83d", 0).is_err(), "lone high surrogate");
    assert!(unescape(br"\ude00", 0).is_err(), "lone low surrogate");
    assert!(unescape(br"\x", 0).is_err());
    assert!(unescape(br"\u12", 0).is_err());
    assert!(unescape(b"\\", 0).is_err());
}

#[test]
fn escaped_t_is_understood() {
    let s = scan(br#"{"op":0,"s":1,"t":"RE\u0041DY","d":{"session_id":"s","guilds":[]}}"#).unwrap();
    assert_eq!(s.kind(), Kind::Ready);
    assert!(s.t_escaped);
}

fn payload_err(msg: &[u8]) -> (usize, &'static str) {
    match scan(msg) {
        Err(Error::Payload { offset, expected }) => (offset, expected),
        other => panic!("{} scanned as {other:?}", String::from_utf8_lossy(msg)),
    }
}

#[test]
fn every_truncation_of_every_fixture_is_an_error() {
    for msg in super::fixtures::ALL {
        for cut in 0..msg.len() {
            let (offset, _) = payload_err(&msg[..cut]);
            assert!(offset <= cut, "offset {offset} past the end {cut}");
        }
    }
}

#[test]
fn structural_errors_say_where_and_what() {
    let cases: &[(&[u8], usize, &str)] = &[
        (b"", 0, "'{'"),
        (b"[1,2]", 0, "'{'"),
        (b"\"op\"", 0, "'{'"),
        (b"42", 0, "'{'"),
        (b"{}", 1, "'op'"),
        (br#"{"t":null,"d":null}"#, 19, "'op'"),
        (br#"{"op":"10"}"#, 6, "integer for 'op'"),
        (br#"{"op":1.5}"#, 6, "integer for 'op'"),
        (br#"{"op":null}"#, 6, "integer for 'op'"),
        (br#"{"op":0,"s":"1"}"#, 12, "integer or null for 's'"),
        (br#"{"op":0,"t":1}"#, 12, "string or null for 't'"),
        (br#"{"op":0,"d":{]}"#, 13, "'}' to close an object"),
        (br#"{"op":0,"d":[}]}"#, 13, "']' to close an array"),
        (br#"{"op":0,"d":{"a":[1,2}}"#, 21, "']' to close an array"),
        (br#"{"op":0,"d":{"a":"b}}"#, 21, "closing '\"'"),
        (br#"{"op":0} x"#, 9, "end of message"),
        (br#"{"op":0}}"#, 8, "end of message"),
        (br#"{"op":0,}"#, 8, "string key"),
        (br#"{"op" 0}"#, 6, "':'"),
        (br#"{"op":0 "d":1}"#, 8, "','"),
        (br#"{"op":99999999999999999999}"#, 6, "integer for 'op'"),
        (br#"{"op":0,"d":tru}"#, 12, "true, false or null"),
        (br#"{"op":0,"d":-}"#, 12, "a number"),
        (br#"{"op":0,"d":+1}"#, 12, "a JSON value"),
    ];
    for &(msg, offset, what) in cases {
        let (got_offset, expected) = payload_err(msg);
        assert!(
            expected.contains(what),
            "{}: expected {what:?}, got {expected:?}",
            String::from_utf8_lossy(msg)
        );
        assert_eq!(
            got_offset,
            offset,
            "{}: {expected}",
            String::from_utf8_lossy(msg)
        );
    }
}

#[test]
fn error_message_names_offset_and_expectation() {
    let err = scan(br#"{"op":"x"}"#).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid gateway payload at byte 6: expected an integer for 'op'"
    );
}

#[test]
fn nesting_limit_is_an_error_not_a_crash() {
    let deep = format!(
        "{{\"op\":0,\"d\":{}{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let (_, expected) = payload_err(deep.as_bytes());
    assert!(expected.contains("nesting"));
    let ok = format!(
        "{{\"op\":0,\"d\":{}{}}}",
        "[".repeat(1000),
        "]".repeat(1000)
    );
    assert!(scan(ok.as_bytes()).is_ok());
}

#[test]
fn long_strings_and_escape_runs_across_block_boundaries() {
    // Backslash runs of every length ending at every position around 64-byte blocks.
    for pad in 0..70 {
        for run in 0..6 {
            let escaped_quote = run % 2 == 1; // an odd run escapes the quote after it
            let mut s = "x".repeat(pad);
            s.push_str(&"\\".repeat(run));
            let msg = if escaped_quote {
                format!(r#"{{"op":0,"d":["{s}"]"]}}"#)
            } else {
                format!(r#"{{"op":0,"d":["{s}"]}}"#)
            };
            let res = scan(msg.as_bytes());
            assert!(res.is_ok(), "pad {pad} run {run}: {msg} -> {res:?}");
            assert_eq!(res.unwrap().d.unwrap().end, msg.len() - 1);
        }
    }
}

#[test]
fn a_sub_field_of_the_wrong_type_is_absent_not_an_error() {
    // The event must still be forwarded: only the extracted field is lost.
    let s =
        scan(br#"{"op":0,"t":"GUILD_CREATE","s":4,"d":{"unavailable":"yes","id":"81"}}"#).unwrap();
    assert_eq!(
        (s.kind(), s.seq, s.guild_id, s.unavailable),
        (Kind::GuildCreate, Some(4), Some(81), None)
    );
    let s = scan(br#"{"op":0,"t":"GUILD_DELETE","d":{"unavailable":1,"id":81}}"#).unwrap();
    assert_eq!((s.guild_id, s.unavailable), (Some(81), None));
    let s = scan(br#"{"op":0,"t":"GUILD_DELETE","d":{"id":{"x":1},"unavailable":true}}"#).unwrap();
    assert_eq!((s.guild_id, s.unavailable), (None, Some(true)));
    let s = scan(br#"{"op":0,"t":"GUILD_CREATE","d":[1,2]}"#).unwrap();
    assert_eq!(
        (s.kind(), s.guild_id, s.d),
        (Kind::GuildCreate, None, Some(31..36))
    );
    let s = scan(br#"{"op":0,"t":"MESSAGE_CREATE","d":{"id":"12a","content":"x"}}"#).unwrap();
    assert_eq!((s.message_id, s.content), (None, Some(55..58)));
    let s = scan(br#"{"op":0,"t":"MESSAGE_CREATE","d":{"id":"99999999999999999999"}}"#).unwrap();
    assert_eq!(s.message_id, None);
    let s = scan(br#"{"op":0,"t":"READY","d":{"session_id":5,"resume_gateway_url":"wss:\/\/x","guilds":{}}}"#)
        .unwrap();
    assert_eq!(
        (s.session_id, s.resume_gateway_url.as_deref(), s.guild_ids),
        (None, Some("wss://x"), None)
    );
    let s = scan(
        br#"{"op":0,"t":"READY","d":{"guilds":[{"unavailable":true},{"id":"7"},3,{"id":null}]}}"#,
    )
    .unwrap();
    assert_eq!(
        s.guild_ids,
        Some(vec![7]),
        "guilds without a valid id are skipped"
    );
    let s = scan(br#"{"op":9,"d":null}"#).unwrap();
    assert_eq!((s.op, s.resumable), (9, None));
    let s = scan(br#"{"d":"x","op":9}"#).unwrap();
    assert_eq!((s.op, s.resumable), (9, None));
    let s = scan(br#"{"op":10,"d":[]}"#).unwrap();
    assert_eq!((s.op, s.heartbeat_interval), (10, None));
    let s = scan(br#"{"op":10,"d":{"heartbeat_interval":-5}}"#).unwrap();
    assert_eq!(s.heartbeat_interval, None);
    let s = scan(br#"{"op":10,"d":{"heartbeat_interval":4.5}}"#).unwrap();
    assert_eq!(s.heartbeat_interval, None);
}

#[test]
fn a_mistyped_sub_field_still_gets_the_structural_check() {
    for msg in [
        &br#"{"op":0,"t":"GUILD_CREATE","d":{"unavailable":[1,"id":"8"}}"#[..],
        br#"{"op":0,"t":"MESSAGE_CREATE","d":{"id":"12","content":"x}}"#,
        br#"{"op":0,"t":"READY","d":{"guilds":[{"id":"1"},{"id":"2"]}}"#,
        br#"{"op":9,"d":nul}"#,
        br#"{"op":10,"d":[}"#,
    ] {
        assert!(
            matches!(scan(msg), Err(Error::Payload { .. })),
            "{}",
            String::from_utf8_lossy(msg)
        );
    }
}

#[test]
fn discord_layout_and_other_layouts_scan_alike() {
    for msg in super::fixtures::ALL {
        assert!(
            msg.starts_with(br#"{"t":"#),
            "fixtures are in Discord's layout"
        );
        assert_eq!(scan(msg), scan_any_layout(msg));
    }
    // Near misses of the layout take the general path and agree with it.
    for msg in [
        &br#"{"t":"MESSAGE_CREATE","s":1,"op":0,"d":{"id":"5"}} "#[..],
        br#"{"t":"MESSAGE_\u0043REATE","s":1,"op":0,"d":{"id":"5"}}"#,
        br#"{"t":"MESSAGE_CREATE","s":1,"op":0,"d":{"id":"5"},"x":1}"#,
        br#"{"t":"MESSAGE_CREATE","op":0,"s":1,"d":{"id":"5"}}"#,
        br#"{"t":null,"s":null,"op":11,"d":null}"#,
        br#"{"t":"READY","s":1,"op":0,"d":{"guilds":[}}"#,
        br#"{"t":"READY","s":1,"op":0,"d":{}"#,
        br#"{"t":"READY","s":1.5,"op":0,"d":{}}"#,
        br#"{"t":"READY","s":1,"op":0,"d":{}}}"#,
    ] {
        assert_eq!(
            scan(msg),
            scan_any_layout(msg),
            "{}",
            String::from_utf8_lossy(msg)
        );
    }
    let s = scan(br#"{"t":"MESSAGE_\u0043REATE","s":1,"op":0,"d":{"id":"5"}}"#).unwrap();
    assert_eq!((s.kind(), s.message_id), (Kind::MessageCreate, Some(5)));
}

#[test]
fn keys_stop_being_read_once_all_are_found_but_the_structure_is_still_checked() {
    let ok = br#"{"t":"MESSAGE_CREATE","s":1,"op":0,"d":{"id":"1","content":"x","edited_timestamp":null,"author":{"id":"2"},"content":"later duplicate"}}"#;
    let s = scan(ok).unwrap();
    assert_eq!(
        (s.message_id, s.content.map(|r| &ok[r])),
        (Some(1), Some(&b"\"x\""[..]))
    );
    let bad = br#"{"t":"MESSAGE_CREATE","s":1,"op":0,"d":{"id":"1","content":"x","edited_timestamp":null,"author":{"a":[}}}"#;
    assert!(matches!(scan(bad), Err(Error::Payload { .. })));
    let bad = br#"{"t":"GUILD_CREATE","s":1,"op":0,"d":{"unavailable":false,"id":"1","roles":[{"x":"y"]}}"#;
    assert!(matches!(scan(bad), Err(Error::Payload { .. })));
}
