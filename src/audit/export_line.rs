//! Reading one line of an audit export strictly, so that what verifies is exactly what
//! the line says to any JSON reader.
//!
//! A record line must have exactly the members the export writes, each once; its hashes
//! must be spelled as the export spells them (64 lowercase hex digits); and no object,
//! however deep in `details`, may repeat a member. Otherwise a verified export could
//! carry text that nothing verified: a member the record hash does not cover (ignored by
//! a lenient parser, shown by a log viewer), a repeated member read as its last value
//! here and as its first by another reader, or a second spelling of a hash that a
//! textual comparison (a receipt's `audit_prev_hash`, a grep) would not match. Found by
//! the `audit_export` fuzz target (docs/FUZZING.md).
//!
//! Must not: check hashes or signatures (that is [`super::verify`]).

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{AuditEvent, AuditRecord};
use crate::audit::verify::Trailer;

/// A record line: exactly the members an export writes, none unknown, none twice.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordLine {
    seq: u64,
    ts: i64,
    action: String,
    resource_type: String,
    resource_id: String,
    actor: String,
    tenant_id: Option<String>,
    caller_ip: Option<String>,
    details: StrictValue,
    prev_hash: LowerHex32,
    hash: LowerHex32,
}

/// The trailer line: `{"export_end": {...}}` and nothing beside it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrailerLine {
    export_end: Trailer,
}

/// What a line of an export holds.
pub(super) enum Line {
    /// An audit record.
    Record(AuditRecord),
    /// The export's trailer.
    Trailer(Trailer),
}

/// Reads one (non-blank) line of an export.
///
/// # Errors
/// A reason naming what is wrong with the line.
pub(super) fn parse(line: &str) -> Result<Line, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if value.get("export_end").is_some() {
        let t: TrailerLine = serde_json::from_str(line).map_err(|e| format!("bad trailer: {e}"))?;
        return Ok(Line::Trailer(t.export_end));
    }
    let r: RecordLine =
        serde_json::from_str(line).map_err(|e| format!("not an audit record: {e}"))?;
    Ok(Line::Record(AuditRecord {
        seq: r.seq,
        ts: r.ts,
        event: AuditEvent {
            action: r.action,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            actor: r.actor,
            tenant_id: r.tenant_id,
            caller_ip: r.caller_ip,
            details: r.details.0,
        },
        prev_hash: r.prev_hash.0,
        hash: r.hash.0,
    }))
}

/// 32 bytes as the export writes them: 64 lowercase hex digits, no other spelling.
struct LowerHex32([u8; 32]);

impl<'de> Deserialize<'de> for LowerHex32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let lower = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !lower {
            return Err(de::Error::custom("expected 64 lowercase hex digits"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(de::Error::custom)?;
        Ok(Self(out))
    }
}

/// A JSON value in which no object repeats a member, at any depth.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value whose objects name each member once")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // JSON text has no NaN or infinity; serde_json gives only finite floats here.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if members.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "the member {key:?} appears twice in one object"
                )));
            }
            members.insert(key, v);
        }
        Ok(Value::Object(members))
    }
}
