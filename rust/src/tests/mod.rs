//! Module tests on real-shaped gateway payloads (no Python needed).
#![allow(
    clippy::doc_markdown,
    clippy::unwrap_used,
    clippy::too_many_lines,
    clippy::cast_possible_truncation
)]

mod codec;
mod filter;
mod fixtures;
mod inflate;
mod props;
mod route;
mod scan;
