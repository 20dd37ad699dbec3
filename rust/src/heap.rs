//! Giving the heap pages that hibernated codecs freed back to the OS.
//!
//! A hibernating codec frees its 45 KiB inflate state, but glibc keeps freed blocks in
//! the middle of the heap resident (only the top is trimmed on free), so the process's
//! RSS would not shrink until something reuses them. `malloc_trim(0)` releases the free
//! pages of every arena (a few milliseconds for a 100 MiB heap); it is called at most
//! once per [`MIN_INTERVAL`] per thread, after a hibernation. Elsewhere than glibc this
//! does nothing.
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Shortest time between two trims.
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);

thread_local! {
    static LAST_TRIM: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Trims the heap unless that was done less than [`MIN_INTERVAL`] ago; returns whether
/// it did.
pub fn trim_soon() -> bool {
    let now = Instant::now();
    let due = LAST_TRIM.with(|last| match last.get() {
        Some(t) if now.duration_since(t) < MIN_INTERVAL => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        trim();
    }
    due
}

/// Trims the heap now, whatever the last trim; returns whether there is a trim to call
/// (glibc).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> bool {
    // SAFETY: malloc_trim only inspects and releases free memory of glibc's own arenas;
    // it takes the arena locks itself and has no preconditions on the caller.
    unsafe {
        libc::malloc_trim(0);
    }
    true
}

/// Nothing to trim elsewhere than glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}
