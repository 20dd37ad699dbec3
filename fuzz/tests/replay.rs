//! Replays every kept input (seeds/ and regressions/) through the fuzz checks, without AFL:
//! what a fuzz run found stays fixed.
use std::fs;
use std::path::Path;

#[test]
fn every_kept_input_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() && path.extension().is_none_or(|e| e != "md") {
                let data = fs::read(&path).expect("readable input");
                eprintln!("{}", path.display());
                shardgate_fuzz::check(&data);
                n += 1;
            }
        }
    }
    assert!(n > 0, "no inputs found");
}
