//! Compiles proto/ with protox (pure Rust: no protoc needed) and generates the tonic
//! server and client code, plus the descriptor set served by gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["fieldkey/v1/fieldkey.proto", "fieldkey/bench/v1/echo.proto"],
        ["proto"],
    )?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("fieldkey_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // A request that does not decode is the caller's fault (INVALID_ARGUMENT,
        // DECODE_FAILED), not prost's INTERNAL.
        .codec_path("crate::proto::codec::Codec")
        // A decrypted value leaves the service as `Bytes` that own the keyring's
        // self-wiping plaintext buffer: wiped once tonic has encoded the reply, with no
        // unwiped copy in between (review finding 5).
        .bytes(".fieldkey.v1.DecryptResponse.plaintext")
        // Read repair's new envelope: the reseal's buffer, handed over without a copy.
        .bytes(".fieldkey.v1.DecryptResponse.repaired_ciphertext")
        // Item batches: an item's values are slices of the request buffer (no copy or
        // allocation per item), an EncryptBatch's ciphertexts slices of one buffer.
        .bytes(".fieldkey.v1.EncryptRequest")
        .bytes(".fieldkey.v1.DecryptRequest")
        .bytes(".fieldkey.v1.EncryptResponse")
        // Columnar batches: values are slices of the request buffer, results slices of
        // one buffer per call (no allocation per value on either side).
        .bytes(".fieldkey.v1.EncryptColumnRequest")
        .bytes(".fieldkey.v1.EncryptColumnResponse")
        .bytes(".fieldkey.v1.DecryptColumnRequest")
        .bytes(".fieldkey.v1.DecryptColumnResponse")
        .bytes(".fieldkey.v1.RewrapColumnRequest")
        .bytes(".fieldkey.v1.RewrapColumnResponse")
        .bytes(".fieldkey.v1.BlindIndexColumnRequest")
        .bytes(".fieldkey.v1.BlindIndexColumnResponse")
        .compile_fds(fds)?;
    Ok(())
}
