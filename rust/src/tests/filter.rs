//! editedMessages: drop only updates that change neither content nor edited_timestamp.
use crate::filter::{hash64, EditFilter, Verdict};

const C1: &[u8] = br#""hello https:\/\/example.com""#;
const C2: &[u8] = br#""hello, edited""#;
const NULL: &[u8] = b"null";
const T1: &[u8] = br#""2026-01-01T00:01:00.000000+00:00""#;

fn h(content: &[u8], edited: &[u8]) -> u64 {
    EditFilter::hash_fields(Some(content), Some(edited))
}

#[test]
fn unfurl_is_dropped_real_edit_passes() {
    let mut f = EditFilter::new(1024, 60_000);
    f.remember(1, h(C1, NULL), 0);
    assert_eq!(f.update(1, h(C1, NULL), 10), Verdict::Drop, "embed unfurl");
    assert_eq!(f.update(1, h(C2, T1), 20), Verdict::Pass, "real edit");
    assert_eq!(
        f.update(1, h(C2, T1), 30),
        Verdict::Drop,
        "unfurl of the edited message"
    );
    assert_eq!(
        f.update(1, h(C1, NULL), 40),
        Verdict::Pass,
        "back to old content is a change"
    );
}

#[test]
fn same_content_with_new_edited_timestamp_passes() {
    let mut f = EditFilter::new(1024, 60_000);
    f.remember(1, h(C1, NULL), 0);
    assert_eq!(f.update(1, h(C1, T1), 1), Verdict::Pass);
}

#[test]
fn missing_keys_are_unknown_and_never_match() {
    let mut f = EditFilter::new(1024, 60_000);
    f.remember(1, h(C1, NULL), 0);
    let no_content = EditFilter::hash_fields(None, Some(NULL));
    let no_edited = EditFilter::hash_fields(Some(C1), None);
    assert_eq!(f.update(1, no_content, 1), Verdict::Pass);
    // The passed partial update made the stored state unknown: even identical bytes pass.
    assert_eq!(f.update(1, h(C1, NULL), 2), Verdict::Pass);
    assert_eq!(f.update(1, no_edited, 3), Verdict::Pass);
    assert_eq!(
        f.update(1, no_edited, 4),
        Verdict::Pass,
        "unknown never equals unknown"
    );
    // A create without the keys (no MESSAGE_CONTENT intent) never causes drops either.
    f.remember(2, EditFilter::hash_fields(None, None), 0);
    assert_eq!(
        f.update(2, EditFilter::hash_fields(None, None), 1),
        Verdict::Pass
    );
}

#[test]
fn a_forgotten_or_unknown_message_passes_and_is_remembered() {
    let mut f = EditFilter::new(1024, 60_000);
    assert_eq!(f.update(7, h(C1, NULL), 0), Verdict::Pass, "never seen");
    assert_eq!(
        f.update(7, h(C1, NULL), 1),
        Verdict::Drop,
        "remembered from the passed update"
    );
}

#[test]
fn delete_forgets() {
    let mut f = EditFilter::new(1024, 60_000);
    f.remember(1, h(C1, NULL), 0);
    f.forget(1);
    assert_eq!(f.update(1, h(C1, NULL), 1), Verdict::Pass);
    f.forget(12345); // unknown id: nothing happens
}

#[test]
fn entries_expire_after_max_age() {
    let mut f = EditFilter::new(1024, 1000);
    f.remember(1, h(C1, NULL), 0);
    assert_eq!(f.update(1, h(C1, NULL), 1000), Verdict::Drop);
    f.remember(2, h(C1, NULL), 0);
    assert_eq!(
        f.update(2, h(C1, NULL), 1001),
        Verdict::Pass,
        "too old: forgotten"
    );
    assert_eq!(f.len(5000), 0);
}

#[test]
fn capacity_is_fixed_and_the_oldest_entry_is_evicted() {
    // One set of 8 ways: the 9th message evicts the oldest.
    let mut f = EditFilter::new(8, u64::MAX);
    assert_eq!(f.capacity(), 8);
    for id in 1..=8u64 {
        f.remember(id, h(C1, NULL), id);
    }
    assert_eq!(f.len(100), 8);
    f.remember(9, h(C1, NULL), 9);
    assert_eq!(f.len(100), 8, "memory does not grow");
    assert_eq!(
        f.update(1, h(C1, NULL), 10),
        Verdict::Pass,
        "oldest was evicted"
    );
    assert_eq!(f.update(9, h(C1, NULL), 11), Verdict::Drop);
    assert_eq!(f.update(8, h(C1, NULL), 12), Verdict::Drop);
}

#[test]
fn many_messages_stay_within_capacity() {
    let mut f = EditFilter::new(1000, u64::MAX);
    assert_eq!(
        f.capacity(),
        1024,
        "rounded up to a power of two of 8-way sets"
    );
    let base = 1_456_074_444_472_168_448u64;
    for i in 0..100_000u64 {
        f.remember(base + (i << 22), h(C1, NULL), i);
    }
    assert!(f.len(u64::MAX - 1) <= 1024);
    // The most recent messages are still known.
    let recent = (99_990..100_000u64)
        .filter(|i| f.update(base + (i << 22), h(C1, NULL), 100_001) == Verdict::Drop)
        .count();
    assert!(recent >= 9, "{recent} of the 10 newest remembered");
}

#[test]
fn hash_separates_close_inputs() {
    let inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 0],
        b"a".to_vec(),
        b"a\0".to_vec(),
        b"ab".to_vec(),
        b"ba".to_vec(),
        b"0123456789abcdef".to_vec(),
        b"0123456789abcdeg".to_vec(),
        b"0123456789abcdef0".to_vec(),
        b"\"hello\"".to_vec(),
        b"\"hellp\"".to_vec(),
    ];
    let hashes: std::collections::HashSet<u64> = inputs.iter().map(|i| hash64(i, 1)).collect();
    assert_eq!(hashes.len(), inputs.len());
    // Field boundaries matter: ("ab","c") != ("a","bc").
    assert_ne!(h(b"ab", b"c"), h(b"a", b"bc"));
    // Single-bit flips anywhere change the hash.
    let base = vec![0x5au8; 100];
    for i in 0..100 {
        for bit in 0..8 {
            let mut x = base.clone();
            x[i] ^= 1 << bit;
            assert_ne!(hash64(&x, 1), hash64(&base, 1));
        }
    }
}
