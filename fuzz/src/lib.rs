//! Shared by the fuzz targets (docs/FUZZING.md): the genuine artifacts their properties
//! compare against, made by the real code, and the seed corpus made from them.
//!
//! Every target's `init` calls [`write_seeds`]: with `FIELDKEY_FUZZ_WRITE_SEEDS=<dir>`
//! set, the target's seeds are written there (that is how `fuzz/corpus/<target>` was
//! made: `scripts/fuzz.sh --write-seeds`); without it, nothing happens.
//!
//! This is test tooling: it panics on setup errors (a panic is a fuzzer finding).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod audit;
pub mod envelope;
pub mod receipts;

use std::path::PathBuf;

/// Writes `seeds` (name, bytes) into `$FIELDKEY_FUZZ_WRITE_SEEDS` if it is set.
pub fn write_seeds(seeds: &[(String, Vec<u8>)]) {
    let Some(dir) = std::env::var_os("FIELDKEY_FUZZ_WRITE_SEEDS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("seed directory");
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).expect("seed file");
    }
    eprintln!("wrote {} seeds to {}", seeds.len(), dir.display());
}

/// Seeds from files of the repository (configuration, job specs), embedded at build time.
#[macro_export]
macro_rules! file_seed {
    ($name:literal, $path:literal) => {
        (
            $name.to_owned(),
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../", $path)).to_vec(),
        )
    };
}

/// Seeds given as text.
pub fn text_seeds(items: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    items
        .iter()
        .map(|(n, t)| ((*n).to_owned(), t.as_bytes().to_vec()))
        .collect()
}
