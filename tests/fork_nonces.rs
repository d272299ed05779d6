//! A forked child never draws its parent's nonces (review finding 5, issue 19).
//!
//! `ThreadRng` is not reseeded on `fork`: without the envelope's process check, a child
//! would draw the very nonces its parent draws next, under the same keys (a nonce reused
//! under one key is the one thing AES-GCM cannot survive). This test process forks (it
//! runs without the test harness, single-threaded, as `safe_fork` requires), has parent
//! and child encrypt the same value under the same key, and compares the ciphertexts:
//! equal nonces would give equal ciphertexts.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;

use fieldkey::crypto::{Aad, FieldCipher, SecretKey, seal};

/// Ciphertexts each side makes after the fork.
const N: usize = 32;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = SecretKey::generate()?;
    let cipher = FieldCipher::for_tenant(&key, "acme", "email");
    let aad = Aad {
        tenant: "acme",
        subject: None,
        field: "email",
        context: b"row-1",
    };
    // The parent's generator is in use before the fork, as in a serving process.
    seal(&cipher, 1, &aad, b"warm-up")?;
    let (mut parent_end, mut child_end) = UnixStream::pair()?;
    let Some(child) = safe_fork::fork()? else {
        // The child: N ciphertexts of the same value, sent to the parent.
        drop(parent_end);
        let mut out = Vec::new();
        for _ in 0..N {
            match seal(&cipher, 1, &aad, b"the same value") {
                Ok(ct) => out.extend_from_slice(&ct),
                Err(_) => std::process::exit(2),
            }
        }
        let sent = child_end.write_all(&out).is_ok();
        std::process::exit(if sent { 0 } else { 1 });
    };
    drop(child_end);
    let mut mine = Vec::with_capacity(N);
    for _ in 0..N {
        mine.push(seal(&cipher, 1, &aad, b"the same value")?);
    }
    let mut theirs = Vec::new();
    parent_end.read_to_end(&mut theirs)?;
    let status = child.join()?;
    if !status.success() {
        return Err(format!("the child failed: {status}").into());
    }
    let len = mine.first().map_or(0, Vec::len);
    if len == 0 || theirs.len() != N * len {
        return Err(format!("the child sent {} bytes, not {N} x {len}", theirs.len()).into());
    }
    let shared = theirs
        .chunks(len)
        .filter(|t| mine.iter().any(|m| m.as_slice() == *t))
        .count();
    if shared > 0 {
        return Err(format!(
            "the child drew {shared} of {N} nonces its parent drew too (same ciphertexts)"
        )
        .into());
    }
    println!("fork_nonces: parent and child drew {N} nonces each, none shared");
    Ok(())
}
