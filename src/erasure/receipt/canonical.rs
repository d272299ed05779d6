//! The canonical JSON encoding that receipt signatures cover.
//!
//! A pure function of a `serde_json::Value`; it knows nothing of receipts, keys or
//! signatures.

use serde_json::Value;

/// Deterministic JSON encoding used for signing.
///
/// Object members are sorted by the UTF-8 bytes of their keys at every level (done
/// here explicitly, so the result does not depend on whether serde_json's
/// `preserve_order` feature is enabled anywhere in the build); there is no whitespace;
/// strings are escaped exactly as serde_json writes them (`\"`, `\\`, `\b`, `\f`, `\n`,
/// `\r`, `\t`, other control characters as lowercase `\u00xx`, everything else
/// including non-ASCII written as-is); numbers are written as serde_json writes them.
///
/// For the values a receipt contains (strings, integers of magnitude at most 2^53,
/// booleans, null, arrays and objects whose keys are ASCII) this is exactly the
/// RFC 8785 JSON Canonicalization Scheme (JCS). Outside that domain it stays
/// deterministic but may differ from JCS: JCS sorts keys by UTF-16 code units (differs
/// from UTF-8 order only for keys mixing characters U+E000..U+FFFF with characters above
/// U+FFFF), writes integers beyond 2^53 and floats in ECMAScript number form. Receipts
/// contain no floats.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(key, out);
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
    }
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{08}' => out.extend_from_slice(b"\\b"),
            '\u{0c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if u32::from(c) < 0x20 => {
                let b = u32::from(c);
                out.extend_from_slice(b"\\u00");
                for nibble in [b >> 4, b & 0xf] {
                    let digit = HEX.get(nibble as usize).copied().unwrap_or(b'0');
                    out.push(digit);
                }
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}
