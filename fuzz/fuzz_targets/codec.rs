//! AFL++ entry point: `make fuzz` (see the crate's lib.rs for what is checked).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        shardgate_fuzz::check(data);
    });
}
