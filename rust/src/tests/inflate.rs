//! Transport decompression: framing, splits, context reuse, reset, corruption, limits.
use super::fixtures::{compress_all, feed_frames, ALL, GUILD_CREATE, MESSAGE_CREATE, READY};
use crate::errors::Error;
use crate::inflate::{Compression, Transport, ZLIB_SUFFIX};

const BIG: usize = 1 << 26;

fn both() -> [Compression; 2] {
    [Compression::Zlib, Compression::Zstd]
}

#[test]
fn whole_messages_in_sequence_share_one_context() {
    for kind in both() {
        let frames = compress_all(kind, ALL);
        if kind == Compression::Zlib {
            assert_eq!(&frames[0][..2], &[0x78, 0x9c], "zlib header like Discord");
            assert!(frames.iter().all(|f| f.ends_with(&ZLIB_SUFFIX)));
        } else {
            assert_eq!(&frames[0][..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        }
        let mut t = Transport::new(kind, BIG).unwrap();
        let input: Vec<(&[u8], bool)> = frames.iter().map(|f| (f.as_slice(), true)).collect();
        let got = feed_frames(&mut t, &input);
        assert_eq!(got, ALL.iter().map(|m| m.to_vec()).collect::<Vec<_>>());
    }
}

#[test]
fn split_at_every_offset_as_continuation_frames_and_as_separate_messages() {
    for kind in both() {
        // Three messages so the split one depends on the window of the first.
        let frames = compress_all(kind, &[READY, MESSAGE_CREATE, GUILD_CREATE]);
        let f = &frames[1];
        for cut in 0..=f.len() {
            let (a, b) = f.split_at(cut);
            for (fin_a, fin_b) in [(false, true), (true, true)] {
                if kind != Compression::Zlib && fin_a {
                    continue; // zstd and plain messages end at FIN by definition
                }
                let mut t = Transport::new(kind, BIG).unwrap();
                let got = feed_frames(
                    &mut t,
                    &[
                        (&frames[0], true),
                        (a, fin_a),
                        (b, fin_b),
                        (&frames[2], true),
                    ],
                );
                assert_eq!(
                    got,
                    vec![
                        READY.to_vec(),
                        MESSAGE_CREATE.to_vec(),
                        GUILD_CREATE.to_vec()
                    ],
                    "{kind:?} cut {cut} fin {fin_a}"
                );
            }
        }
    }
}

#[test]
fn marker_split_across_three_frames() {
    let frames = compress_all(Compression::Zlib, &[MESSAGE_CREATE]);
    let f = &frames[0];
    let n = f.len();
    for (i, j) in [(n - 4, n - 2), (n - 3, n - 1), (n - 1, n), (n - 2, n - 2)] {
        let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
        let got = feed_frames(
            &mut t,
            &[(&f[..i], false), (&f[i..j], false), (&f[j..], true)],
        );
        assert_eq!(got, vec![MESSAGE_CREATE.to_vec()]);
    }
}

#[test]
fn zlib_message_needs_fin_and_the_marker() {
    let frames = compress_all(Compression::Zlib, &[MESSAGE_CREATE]);
    let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
    let mut out = Vec::new();
    // Whole message but FIN unset: a continuation follows (here: an empty one).
    assert!(!t.feed(&frames[0], false, &mut out, 0).unwrap());
    assert!(t.feed(&[], true, &mut out, 0).unwrap());
    assert_eq!(out, MESSAGE_CREATE);
}

#[test]
fn plain_messages_end_at_fin() {
    let mut t = Transport::new(Compression::Plain, BIG).unwrap();
    let (a, b) = MESSAGE_CREATE.split_at(100);
    let got = feed_frames(&mut t, &[(a, false), (b, true), (READY, true)]);
    assert_eq!(got, vec![MESSAGE_CREATE.to_vec(), READY.to_vec()]);
}

#[test]
fn output_is_appended_after_the_callers_prefix() {
    let frames = compress_all(Compression::Zlib, &[READY]);
    let mut t = Transport::new(Compression::Zlib, READY.len()).unwrap();
    let mut out = b"PREFIX".to_vec();
    assert!(
        t.feed(&frames[0], true, &mut out, 6).unwrap(),
        "limit excludes the prefix"
    );
    assert_eq!(&out[..6], b"PREFIX");
    assert_eq!(&out[6..], READY);
}

#[test]
fn corrupt_data_breaks_the_stream_until_reset() {
    for kind in both() {
        let mut t = Transport::new(kind, BIG).unwrap();
        let mut out = Vec::new();
        let garbage = b"\x12\x34\x56\x78 definitely not compressed \x00\x00\xff\xff";
        let err = t.feed(garbage, true, &mut out, 0).unwrap_err();
        assert!(matches!(err, Error::Compression(_)), "{kind:?}: {err}");
        assert!(!err.stream_intact());
        // Still broken, even for valid input.
        let frames = compress_all(kind, &[MESSAGE_CREATE]);
        out.clear();
        assert!(matches!(
            t.feed(&frames[0], true, &mut out, 0),
            Err(Error::Compression(_))
        ));
        // A reset starts a fresh context: a new connection's stream decodes.
        t.reset().unwrap();
        out.clear();
        assert!(t.feed(&frames[0], true, &mut out, 0).unwrap());
        assert_eq!(out, MESSAGE_CREATE);
    }
}

#[test]
fn reset_discards_a_half_received_message_and_the_window() {
    for kind in both() {
        let first = compress_all(kind, &[READY, MESSAGE_CREATE]);
        let mut t = Transport::new(kind, BIG).unwrap();
        let mut out = Vec::new();
        assert!(t.feed(&first[0], true, &mut out, 0).unwrap());
        out.clear();
        assert!(!t.feed(&first[1][..10], false, &mut out, 0).unwrap());
        t.reset().unwrap();
        out.clear();
        let second = compress_all(kind, &[GUILD_CREATE]);
        assert!(t.feed(&second[0], true, &mut out, 0).unwrap());
        assert_eq!(out, GUILD_CREATE);
    }
}

#[test]
fn a_stream_from_the_middle_is_corrupt() {
    // The second message alone refers to a window this context never saw (or lacks
    // the zlib header): it must fail, not produce garbage silently.
    let frames = compress_all(Compression::Zlib, &[GUILD_CREATE, GUILD_CREATE]);
    let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        t.feed(&frames[1], true, &mut out, 0),
        Err(Error::Compression(_))
    ));
}

#[test]
fn oversized_message_is_rejected_while_inflating() {
    for kind in [Compression::Zlib, Compression::Zstd, Compression::Plain] {
        let mut t = Transport::new(kind, 100).unwrap();
        let mut out = Vec::new();
        let frame = if kind == Compression::Plain {
            GUILD_CREATE.to_vec()
        } else {
            compress_all(kind, &[GUILD_CREATE]).remove(0)
        };
        let err = t.feed(&frame, true, &mut out, 0).unwrap_err();
        assert_eq!(err, Error::TooLarge { limit: 100 }, "{kind:?}");
        t.reset().unwrap();
    }
}

#[test]
fn decompression_bomb_stops_near_the_limit() {
    let bomb = vec![b' '; 8 << 20];
    for kind in both() {
        let frames = compress_all(kind, &[&bomb]);
        assert!(frames[0].len() < 64 << 10, "bomb compresses well");
        let limit = 256 << 10;
        let mut t = Transport::new(kind, limit).unwrap();
        let mut out = Vec::new();
        // Feed in 256-byte frames: the error must come long before the input ends.
        let mut fed = 0;
        let mut err = None;
        for chunk in frames[0].chunks(256) {
            fed += chunk.len();
            match t.feed(chunk, false, &mut out, 0) {
                Ok(_) => {}
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(err, Some(Error::TooLarge { limit }), "{kind:?}");
        assert!(
            fed < frames[0].len(),
            "{kind:?} stopped after {fed} of {}",
            frames[0].len()
        );
        assert!(
            out.capacity() <= 2 * limit + (64 << 10),
            "{kind:?} grew to {}",
            out.capacity()
        );
    }
}

#[test]
fn names_round_trip() {
    for kind in [Compression::Zlib, Compression::Zstd, Compression::Plain] {
        assert_eq!(Compression::from_name(kind.name()), Some(kind));
    }
    assert_eq!(Compression::from_name(Some("zlib")), None);
}

#[test]
fn empty_messages_are_framed_like_stock_zlib() {
    let frames = compress_all(Compression::Zlib, &[b"", READY, b"", b""]);
    assert!(frames.iter().all(|f| f.ends_with(&ZLIB_SUFFIX)));
    // An empty stored block: 3 header bits, byte alignment, then LEN=0, NLEN=0xffff.
    assert_eq!(frames[2], [0x00, 0x00, 0x00, 0xff, 0xff]);
    let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
    let input: Vec<(&[u8], bool)> = frames.iter().map(|f| (f.as_slice(), true)).collect();
    let got = feed_frames(&mut t, &input);
    assert_eq!(got, vec![vec![], READY.to_vec(), vec![], vec![]]);
}

#[test]
fn zlib_header_is_checked() {
    for header in [[0x78u8, 0x9d], [0x79, 0x9c], [0x78, 0xbb], [0x88, 0x98]] {
        let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
        let mut out = Vec::new();
        // Byte by byte: the header check must work across frame boundaries too.
        assert!(!t.feed(&header[..1], false, &mut out, 0).unwrap());
        let err = t.feed(&header[1..], false, &mut out, 0).unwrap_err();
        assert!(err.to_string().contains("invalid zlib header"), "{err}");
    }
    for level in [1, 6, 9] {
        let mut c = crate::compress::Compressor::new(Compression::Zlib, level).unwrap();
        let frame = c.compress(READY).unwrap();
        let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
        let got = feed_frames(&mut t, &[(&frame[..1], false), (&frame[1..], true)]);
        assert_eq!(got, vec![READY.to_vec()], "level {level}");
    }
}

#[test]
fn an_ended_zlib_stream_accepts_its_trailer_then_nothing() {
    use flate2::{Compress, Compression as Level, FlushCompress};
    let mut c = Compress::new(Level::default(), true);
    let mut frame = Vec::with_capacity(READY.len() + 64);
    c.compress_vec(READY, &mut frame, FlushCompress::Finish)
        .unwrap();
    let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
    let mut out = Vec::new();
    // The finished stream (with its Adler-32 trailer) does not end in the sync marker.
    assert!(!t.feed(&frame, true, &mut out, 0).unwrap());
    assert_eq!(out, READY);
    let err = t.feed(b"x", true, &mut out, 0).unwrap_err();
    assert!(err.to_string().contains("after the end"), "{err}");
}

/// Messages whose back-references reach far: repeats of earlier messages at every size,
/// so a wrongly restored window shows up as corrupt output.
fn window_heavy_messages() -> Vec<Vec<u8>> {
    let mut msgs: Vec<Vec<u8>> = Vec::new();
    let mut seed = 0x1234_5678_u64;
    for n in [5usize, 40, 700, 5_000, 20_000, 40_000, 100, 33_000, 3] {
        let mut m = Vec::with_capacity(n);
        while m.len() < n {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            if seed >> 60 < 9 && !msgs.is_empty() {
                // Copy a slice of an earlier message: a long-distance match.
                let prev = &msgs[(seed >> 8) as usize % msgs.len()];
                let at = (seed >> 20) as usize % prev.len();
                m.extend_from_slice(&prev[at..prev.len().min(at + 300)]);
            } else {
                m.extend_from_slice(
                    format!("{{\"k{}\":\"{}\"}}", seed % 97, seed >> 40).as_bytes(),
                );
            }
        }
        m.truncate(n);
        msgs.push(m);
    }
    msgs
}

#[test]
fn the_window_copy_block_inflates_to_the_window() {
    use flate2::{Decompress, FlushDecompress};
    for w in [
        3, 4, 257, 258, 259, 260, 261, 516, 517, 518, 1000, 32_767, 32_768,
    ] {
        // A stream with exactly `w` bytes (w <= 32 KiB) of known output before the block.
        let data: Vec<u8> = (0..w).map(|i| (i * 7 % 251) as u8).collect();
        let frame = compress_all(Compression::Zlib, &[&data])[0].clone();
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(2 * w + 64);
        d.decompress_vec(&frame[2..], &mut out, FlushDecompress::None)
            .unwrap();
        assert_eq!(out, data);
        out.clear();
        let block = crate::inflate::window_copy_block(w);
        d.decompress_vec(&block, &mut out, FlushDecompress::None)
            .unwrap();
        assert_eq!(out, data, "w = {w}");
    }
}

#[test]
fn hibernating_between_messages_changes_nothing_but_memory() {
    let msgs = window_heavy_messages();
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    let frames = compress_all(Compression::Zlib, &refs);
    // Put the context away before every message, after every message, or never.
    for every in [1, 2, 3] {
        let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
        let mut scratch = Vec::new();
        for (i, (frame, msg)) in frames.iter().zip(&msgs).enumerate() {
            if i % every == 0 {
                assert!(t.hibernate(&mut scratch).unwrap(), "message {i}");
                assert!(t.asleep());
                assert!(!t.hibernate(&mut scratch).unwrap(), "already asleep");
            }
            let mut out = b"prefix".to_vec();
            assert!(t.feed(frame, true, &mut out, 6).unwrap());
            assert!(!t.asleep());
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(&out[6..], &msg[..], "message {i}, every {every}");
        }
    }
}

#[test]
fn hibernate_refuses_mid_message_and_other_transports() {
    let frames = compress_all(Compression::Zlib, &[READY, GUILD_CREATE]);
    let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
    let mut scratch = Vec::new();
    let mut out = Vec::new();
    assert!(t.feed(&frames[0], true, &mut out, 0).unwrap());
    let (a, b) = frames[1].split_at(frames[1].len() / 2);
    assert!(!t.feed(a, false, &mut out, 0).unwrap());
    assert!(!t.hibernate(&mut scratch).unwrap(), "mid-message");
    assert!(t.feed(b, true, &mut out, 0).unwrap());
    assert!(out.ends_with(GUILD_CREATE));
    for kind in [Compression::Zstd, Compression::Plain] {
        assert!(!Transport::new(kind, BIG)
            .unwrap()
            .hibernate(&mut scratch)
            .unwrap());
    }
    // A broken stream stays broken; reset wakes a context with a fresh one.
    let mut t = Transport::new(Compression::Zlib, BIG).unwrap();
    assert!(t.feed(b"\x78\x9cgarbage", true, &mut out, 0).is_err());
    assert!(!t.hibernate(&mut scratch).unwrap());
    t.reset().unwrap();
    assert!(t.hibernate(&mut scratch).unwrap(), "fresh: nothing to keep");
    t.reset().unwrap();
    assert!(!t.asleep());
    out.clear();
    assert!(t.feed(&frames[0], true, &mut out, 0).unwrap());
    assert_eq!(out, READY);
}

/// A zstd-stream (one message, flushed, frame never ended) whose frame declares a
/// `2^window_log` window, made the way an encoder that wants a big window makes it:
/// an explicit window log and long-distance matching.
fn zstd_stream_with_window(window_log: u32, msg: &[u8]) -> Vec<u8> {
    use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};
    let mut e = Encoder::new(3).unwrap();
    e.set_parameter(CParameter::WindowLog(window_log)).unwrap();
    e.set_parameter(CParameter::EnableLongDistanceMatching(true))
        .unwrap();
    let mut out: Vec<u8> = Vec::with_capacity(msg.len() + 4096);
    let mut inb = InBuffer::around(msg);
    while inb.pos() < msg.len() {
        let pos = out.len();
        let mut outb = OutBuffer::around_pos(&mut out, pos);
        e.run(&mut inb, &mut outb).unwrap();
    }
    loop {
        let pos = out.len();
        let mut outb = OutBuffer::around_pos(&mut out, pos);
        if e.flush(&mut outb).unwrap() == 0 {
            break;
        }
        out.reserve(4096);
    }
    // Frame header: magic, descriptor without the single-segment flag, then the window
    // descriptor (exponent in the high 5 bits: window log - 10, mantissa 0).
    assert_eq!(&out[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    assert_eq!(
        out[4] & 0x20,
        0,
        "not single-segment: a window descriptor follows"
    );
    assert_eq!(
        u32::from(out[5] >> 3) + 10,
        window_log,
        "declared window log"
    );
    out
}

#[test]
fn zstd_windows_above_8_mib_are_refused_before_allocating_them() {
    // 128 MiB (27, zstd's default decoder limit) and 16 MiB: a CompressionError, not a
    // window allocated per shard whatever max_message_size says.
    for window_log in [27, 24] {
        let frame = zstd_stream_with_window(window_log, GUILD_CREATE);
        let mut t = Transport::new(Compression::Zstd, BIG).unwrap();
        let mut out = Vec::new();
        let err = t.feed(&frame, true, &mut out, 0).unwrap_err();
        assert!(matches!(err, Error::Compression(_)), "{window_log}: {err}");
        assert!(err.to_string().contains("window"), "{err}");
        // Broken until reset, and reset keeps the cap.
        t.reset().unwrap();
        assert!(t.feed(&frame, true, &mut out, 0).is_err());
    }
    // 8 MiB, what zstd levels up to 19 choose, still decodes (at every level).
    for window_log in [10, 21, 23] {
        let frame = zstd_stream_with_window(window_log, GUILD_CREATE);
        let mut t = Transport::new(Compression::Zstd, BIG).unwrap();
        let mut out = Vec::new();
        assert!(t.feed(&frame, true, &mut out, 0).unwrap());
        assert_eq!(out, GUILD_CREATE);
    }
    for level in [1, 3, 19] {
        let mut c = crate::compress::Compressor::new(Compression::Zstd, level).unwrap();
        let mut t = Transport::new(Compression::Zstd, BIG).unwrap();
        for msg in ALL {
            let mut out = Vec::new();
            assert!(t
                .feed(&c.compress(msg).unwrap(), true, &mut out, 0)
                .unwrap());
            assert_eq!(&out, msg);
        }
    }
}
