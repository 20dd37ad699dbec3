//! The whole per-message pipeline without Python: inflate, scan, filter, body, stats.
use super::fixtures::{
    compress_all, ACK, GUILD_CREATE, HELLO, MESSAGE_CREATE, MESSAGE_DELETE, MESSAGE_EDIT,
    MESSAGE_UNFURL, READY,
};
use crate::codec::CodecCore;
use crate::errors::Error;
use std::sync::Arc;

use crate::filter::SharedFilter;
use crate::inflate::Compression;
use crate::scan::Kind;

fn codec(kind: Compression, filter: bool) -> CodecCore {
    let f = filter.then(|| Arc::new(SharedFilter::new(16384, 900_000)));
    CodecCore::new(3, kind, 1 << 26, f).unwrap()
}

#[test]
fn body_splices_the_payload_byte_for_byte() {
    for kind in [Compression::Zlib, Compression::Zstd, Compression::Plain] {
        let mut c = codec(kind, true);
        let frames = if kind == Compression::Plain {
            vec![HELLO.to_vec(), READY.to_vec(), ACK.to_vec()]
        } else {
            compress_all(kind, &[HELLO, READY, ACK])
        };
        for (frame, msg) in frames.iter().zip([HELLO, READY, ACK]) {
            let d = c.feed(frame, true).unwrap().unwrap();
            assert_eq!(c.payload(), msg);
            let mut want = br#"{"shardId":3,"data":"#.to_vec();
            want.extend_from_slice(msg);
            want.push(b'}');
            assert_eq!(c.body(), &want[..]);
            assert_eq!(&c.body()[c.base()..c.body().len() - 1], msg);
            assert!(!d.drop);
        }
        assert_eq!(c.stats.messages, 3);
        assert_eq!(c.stats.frames, 3);
        assert_eq!(
            c.stats.bytes_out,
            (HELLO.len() + READY.len() + ACK.len()) as u64
        );
        assert_eq!(
            c.stats.bytes_in,
            frames.iter().map(Vec::len).sum::<usize>() as u64
        );
    }
}

#[test]
fn nothing_is_returned_until_a_message_is_complete() {
    let frames = compress_all(Compression::Zlib, &[GUILD_CREATE]);
    let mut c = codec(Compression::Zlib, true);
    let chunks: Vec<&[u8]> = frames[0].chunks(7).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i == chunks.len() - 1;
        let got = c.feed(chunk, last).unwrap();
        assert_eq!(got.is_some(), last);
    }
    assert_eq!(c.payload(), GUILD_CREATE);
}

#[test]
fn edit_filter_drops_unfurls_in_the_stream() {
    let msgs = [
        MESSAGE_CREATE,
        MESSAGE_UNFURL,
        MESSAGE_EDIT,
        MESSAGE_UNFURL,
        MESSAGE_DELETE,
        MESSAGE_UNFURL,
    ];
    let frames = compress_all(Compression::Zlib, &msgs);
    let mut c = codec(Compression::Zlib, true);
    let drops: Vec<bool> = frames
        .iter()
        .map(|f| c.feed(f, true).unwrap().unwrap().drop)
        .collect();
    // unfurl dropped; real edit passes; unfurl with pre-edit content passes (a change);
    // after the delete the message is forgotten and passes.
    assert_eq!(drops, [false, true, false, false, false, false]);
    assert_eq!(c.stats.edits_dropped, 1);
}

#[test]
fn edit_filter_can_be_turned_off() {
    let frames = compress_all(Compression::Zlib, &[MESSAGE_CREATE, MESSAGE_UNFURL]);
    let mut c = codec(Compression::Zlib, false);
    assert!(frames
        .iter()
        .all(|f| !c.feed(f, true).unwrap().unwrap().drop));
    assert_eq!(c.stats.edits_dropped, 0);
}

#[test]
fn filter_clock_expires_entries() {
    let mut c = CodecCore::new(
        0,
        Compression::Plain,
        1 << 20,
        Some(Arc::new(SharedFilter::new(64, 1000))),
    )
    .unwrap();
    c.feed_at(MESSAGE_CREATE, true, 0).unwrap();
    assert!(!c.feed_at(MESSAGE_UNFURL, true, 5000).unwrap().unwrap().drop);
}

#[test]
fn payload_error_keeps_the_stream_usable() {
    let bad: &[u8] = br#"{"t":"MESSAGE_CREATE","s":1,"op":0,"d":{"id":"1""#;
    let frames = compress_all(Compression::Zlib, &[bad, MESSAGE_CREATE]);
    let mut c = codec(Compression::Zlib, true);
    let err = c.feed(&frames[0], true).unwrap_err();
    assert!(
        matches!(err, Error::Payload { .. }) && err.stream_intact(),
        "{err}"
    );
    let d = c.feed(&frames[1], true).unwrap().unwrap();
    assert!(!d.drop);
    assert_eq!(c.last().kind(), Kind::MessageCreate);
    assert_eq!(c.payload(), MESSAGE_CREATE);
    assert_eq!(c.stats.errors, 1);
    assert_eq!(c.stats.messages, 1);
}

#[test]
fn compression_error_needs_reset_then_a_new_stream_works() {
    let mut c = codec(Compression::Zlib, true);
    let err = c
        .feed(b"\x78\x9cgarbage\x00\x00\xff\xff", true)
        .unwrap_err();
    assert!(matches!(err, Error::Compression(_)));
    let frames = compress_all(Compression::Zlib, &[ACK]);
    assert!(c.feed(&frames[0], true).is_err(), "broken until reset");
    c.reset().unwrap();
    assert!(c.feed(&frames[0], true).unwrap().is_some());
    assert_eq!(c.payload(), ACK);
    assert_eq!(c.stats.errors, 2);
}

#[test]
fn too_large_then_reset() {
    let mut c = CodecCore::new(0, Compression::Zstd, 64, None).unwrap();
    let frames = compress_all(Compression::Zstd, &[READY]);
    assert_eq!(
        c.feed(&frames[0], true).unwrap_err(),
        Error::TooLarge { limit: 64 }
    );
    c.reset().unwrap();
    let frames = compress_all(Compression::Zstd, &[ACK]);
    c.feed(&frames[0], true).unwrap().unwrap();
    assert_eq!(c.payload(), ACK);
}

#[test]
fn an_idle_codec_gives_its_buffer_back() {
    let big = format!(r#"{{"op":0,"t":"X","s":1,"d":"{}"}}"#, "x".repeat(300_000));
    let frames = compress_all(Compression::Zlib, &[big.as_bytes(), ACK]);
    let mut c = codec(Compression::Zlib, false);
    assert_eq!(c.lend(Vec::new()), None);
    c.feed(&frames[0], true).unwrap().unwrap();
    assert_eq!(c.payload(), big.as_bytes());
    let work = c.reclaim().expect("no message in progress");
    assert!(work.capacity() > 300_000);
    assert_eq!(c.buffer_capacity(), 0, "the idle codec holds no buffer");
    // The next message is inflated into whatever buffer is lent, prefix included.
    assert_eq!(c.lend(work), None);
    c.feed(&frames[1], true).unwrap().unwrap();
    assert_eq!(c.payload(), ACK);
    assert_eq!(&c.body()[..c.base()], br#"{"shardId":3,"data":"#);
}

#[test]
fn a_message_split_across_calls_keeps_its_buffer() {
    let frames = compress_all(Compression::Zlib, &[GUILD_CREATE, ACK]);
    let mut c = codec(Compression::Zlib, true);
    let (first, rest) = frames[0].split_at(frames[0].len() / 2);
    assert_eq!(c.lend(Vec::with_capacity(64)), None);
    assert!(c.feed(first, false).unwrap().is_none());
    assert_eq!(c.reclaim(), None, "mid-message: the output so far stays");
    let other = Vec::with_capacity(1 << 16);
    assert_eq!(
        c.lend(other).map(|v| v.capacity()),
        Some(1 << 16),
        "refused"
    );
    assert!(c.feed(rest, true).unwrap().is_some());
    assert_eq!(c.payload(), GUILD_CREATE);
    assert!(c.reclaim().is_some());
    // Without a lent buffer the codec allocates its own.
    assert!(c.feed(&frames[1], true).unwrap().is_some());
    assert_eq!(c.payload(), ACK);
}

#[test]
fn codecs_sharing_a_filter_see_each_others_messages() {
    let shared = Arc::new(SharedFilter::new(1024, 900_000));
    let mut a = CodecCore::new(0, Compression::Plain, 1 << 20, Some(shared.clone())).unwrap();
    let mut b = CodecCore::new(1, Compression::Plain, 1 << 20, Some(shared.clone())).unwrap();
    a.feed(MESSAGE_CREATE, true).unwrap().unwrap();
    assert!(b.feed(MESSAGE_UNFURL, true).unwrap().unwrap().drop);
    b.feed(MESSAGE_DELETE, true).unwrap().unwrap();
    assert!(!a.feed(MESSAGE_UNFURL, true).unwrap().unwrap().drop);
    assert_eq!(shared.with(|t| (t.updates, t.drops)), Some((2, 1)));
}

#[test]
fn a_busy_shared_filter_passes_instead_of_blocking() {
    let shared = Arc::new(SharedFilter::new(1024, 900_000));
    let mut a = CodecCore::new(0, Compression::Plain, 1 << 20, Some(shared.clone())).unwrap();
    a.feed(MESSAGE_CREATE, true).unwrap().unwrap();
    let inner = shared.with(|_| a.feed(MESSAGE_UNFURL, true).unwrap().unwrap().drop);
    assert_eq!(inner, Some(false), "re-entrant use: pass");
    assert!(a.feed(MESSAGE_UNFURL, true).unwrap().unwrap().drop);
}

#[test]
fn sleep_is_due_after_an_ack_that_ends_an_idle_beat() {
    let msgs = [READY, ACK, ACK, ACK, MESSAGE_CREATE, ACK, ACK];
    let frames = compress_all(Compression::Zlib, &msgs);
    let mut c = codec(Compression::Zlib, false);
    let mut scratch = Vec::new();
    let mut due = Vec::new();
    for f in &frames {
        c.feed(f, true).unwrap().unwrap();
        due.push(c.sleep_due());
    }
    assert_eq!(due, [false; 7], "off unless asked for");
    let mut c = codec(Compression::Zlib, false);
    c.set_sleep_when_idle(true);
    due.clear();
    for (f, msg) in frames.iter().zip(msgs) {
        c.feed(f, true).unwrap().unwrap();
        assert_eq!(c.payload(), msg);
        due.push(c.sleep_due());
        if c.sleep_due() {
            assert!(c.hibernate(&mut scratch).unwrap());
            assert!(!c.sleep_due() && c.asleep());
        }
    }
    // The first ACK follows READY; each later one follows a beat without a dispatch.
    assert_eq!(due, [false, false, true, true, false, false, true]);
}
