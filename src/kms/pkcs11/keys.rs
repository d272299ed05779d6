//! Keys on the token, found by label, and the key lifecycle an HSM lacks: pending
//! deletion with a waiting period, built from token objects.
//!
//! A key pending deletion has a **deletion record** on the token: a private token data
//! object (`CKO_DATA`, `CKA_APPLICATION` = `fieldkey`, `CKA_LABEL` =
//! `fieldkey-deletion:<key label>`) whose `CKA_VALUE` is JSON:
//! `{"format":"fieldkey-pkcs11-deletion/v1","key_label":…,"deletion_date_unix_ms":…,
//! "check_value":"<hex of the key's CKA_CHECK_VALUE>"|null,"disabled_on_token":bool}`.
//! A record applies to a key when the labels match and, where both are known, the
//! check values too (so a record left behind cannot condemn a later key that reuses
//! the label). Every use of a key through fieldkey looks for its record first and
//! refuses a pending key ([`KmsError::KeyInvalidState`]); fieldkey also turns the key's
//! `CKA_ENCRYPT`/`CKA_DECRYPT` off where the token allows it, which stops every other
//! application of the token too. When the waiting period is over, the key is destroyed
//! (`C_DestroyObject`), then its record: lazily, by the next use or status of the key,
//! and by a sweep of all records at open, at every epoch-key creation and every
//! scheduled deletion (as the local KMS's `keys.rs`).
//!
//! Order of the steps, so that a crash between two leaves a safe state: scheduling
//! writes the record, then disables the key (crash: pending for fieldkey); cancelling
//! enables the key, then removes the record (crash: still pending, cancel again);
//! destroying removes the key, then the record (crash: a record without key, which the
//! next sweep removes).
//!
//! Does not: wrap or unwrap (the parent module does), or hold sessions (the pool does).

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use serde::{Deserialize, Serialize};

use super::pool::{Fail, Token};
use crate::kms::{KeyDeletion, KeyStatus, KmsError};

/// `CKA_APPLICATION` of fieldkey's data objects.
pub(super) const RECORD_APPLICATION: &[u8] = b"fieldkey";
/// `CKA_LABEL` prefix of deletion records.
pub(super) const RECORD_LABEL_PREFIX: &str = "fieldkey-deletion:";
/// `format` of a deletion record.
pub(super) const RECORD_FORMAT: &str = "fieldkey-pkcs11-deletion/v1";
/// Longest key label fieldkey uses or looks up (bytes).
pub(super) const MAX_LABEL_LEN: usize = 200;
/// Longest deletion window (days), as AWS KMS.
pub(super) const MAX_WINDOW_DAYS: u32 = 30;

const DAY_MS: i64 = 86_400_000;

/// Whether `label` can name a key fieldkey uses: non-empty, at most
/// [`MAX_LABEL_LEN`] bytes, no control characters.
pub(super) fn valid_label(label: &str) -> bool {
    !label.is_empty() && label.len() <= MAX_LABEL_LEN && !label.chars().any(char::is_control)
}

/// A deletion record's value.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct DeletionRecord {
    format: String,
    key_label: String,
    deletion_date_unix_ms: i64,
    check_value: Option<String>,
    /// Whether fieldkey turned the key's `CKA_ENCRYPT`/`CKA_DECRYPT` off (a cancel
    /// turns them on again only then).
    disabled_on_token: bool,
}

/// What fieldkey reads of a key.
#[derive(Debug, Default)]
pub(super) struct KeyAttrs {
    key_type: Option<KeyType>,
    value_len: Option<usize>,
    sensitive: Option<bool>,
    extractable: Option<bool>,
    never_extractable: Option<bool>,
    encrypt: Option<bool>,
    decrypt: Option<bool>,
    destroyable: Option<bool>,
    check_value: Option<Vec<u8>>,
}

impl KeyAttrs {
    fn usable(&self) -> bool {
        self.encrypt == Some(true) && self.decrypt == Some(true)
    }
}

fn key_attrs(session: &Session, key: ObjectHandle) -> Result<KeyAttrs, Fail> {
    let mut out = KeyAttrs::default();
    for attr in session.get_attributes(
        key,
        &[
            AttributeType::KeyType,
            AttributeType::ValueLen,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::NeverExtractable,
            AttributeType::Encrypt,
            AttributeType::Decrypt,
            AttributeType::Destroyable,
            AttributeType::CheckValue,
        ],
    )? {
        match attr {
            Attribute::KeyType(t) => out.key_type = Some(t),
            Attribute::ValueLen(n) => out.value_len = Some(usize::from(n)),
            Attribute::Sensitive(b) => out.sensitive = Some(b),
            Attribute::Extractable(b) => out.extractable = Some(b),
            Attribute::NeverExtractable(b) => out.never_extractable = Some(b),
            Attribute::Encrypt(b) => out.encrypt = Some(b),
            Attribute::Decrypt(b) => out.decrypt = Some(b),
            Attribute::Destroyable(b) => out.destroyable = Some(b),
            Attribute::CheckValue(v) if !v.is_empty() => out.check_value = Some(v),
            _ => {}
        }
    }
    Ok(out)
}

/// fieldkey's rule for a key it wraps under: AES, 256 bits, and unable to leave the
/// token (`CKA_SENSITIVE` true, `CKA_EXTRACTABLE` false). An attribute the token does
/// not report counts as a violation.
pub(super) fn check_policy(label: &str, a: &KeyAttrs) -> Result<(), KmsError> {
    let bad = |why: &str| {
        Err(KmsError::Misconfigured(format!(
            "PKCS#11 key {label:?} {why}; fieldkey uses only AES-256 keys that cannot leave the token"
        )))
    };
    if a.key_type != Some(KeyType::AES) {
        return bad("is not an AES key");
    }
    if a.value_len != Some(32) {
        return bad("is not 256 bits long");
    }
    if a.sensitive != Some(true) {
        return bad("is not sensitive (CKA_SENSITIVE false: its value can be read off the token)");
    }
    if a.extractable != Some(false) {
        return bad("is extractable (CKA_EXTRACTABLE true: it can be wrapped off the token)");
    }
    if a.never_extractable == Some(false) {
        tracing::warn!(
            key_label = label,
            "PKCS#11 key was extractable at some time (CKA_NEVER_EXTRACTABLE false): copies of it may exist outside the token"
        );
    }
    Ok(())
}

/// The one secret key labelled `label`: `None` if there is none (the session checked
/// to be logged in and the token present first); [`KmsError::Misconfigured`] if
/// several keys have the label.
pub(super) fn find_key(
    token: &Token,
    session: &Session,
    label: &str,
) -> Result<Option<ObjectHandle>, Fail> {
    if !valid_label(label) {
        return Ok(None);
    }
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [] => {
            token.ensure_live(session)?;
            Ok(None)
        }
        [key] => Ok(Some(*key)),
        _ => Err(Fail::Kms(KmsError::Misconfigured(format!(
            "{} secret keys on PKCS#11 token {:?} are labelled {label:?}; fieldkey needs exactly one",
            found.len(),
            token.label()
        )))),
    }
}

fn record_label(key_label: &str) -> Vec<u8> {
    format!("{RECORD_LABEL_PREFIX}{key_label}").into_bytes()
}

/// Deletion records found, each parsed or with why it could not be.
type Records = Vec<(ObjectHandle, Result<DeletionRecord, String>)>;

/// Deletion records: of one key label, or all of fieldkey's.
fn find_records(session: &Session, key_label: Option<&str>) -> Result<Records, Fail> {
    let mut template = vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(RECORD_APPLICATION.to_vec()),
    ];
    if let Some(l) = key_label {
        template.push(Attribute::Label(record_label(l)));
    }
    let mut out = Vec::new();
    for h in session.find_objects(&template)? {
        let value = session
            .get_attributes(h, &[AttributeType::Value])?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .unwrap_or_default();
        let parsed = serde_json::from_slice::<DeletionRecord>(&value)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                if r.format == RECORD_FORMAT {
                    Ok(r)
                } else {
                    Err(format!("unknown format {:?}", r.format))
                }
            });
        out.push((h, parsed));
    }
    Ok(out)
}

fn applies_to(record: &DeletionRecord, label: &str, attrs: &KeyAttrs) -> bool {
    record.key_label == label
        && match (&record.check_value, &attrs.check_value) {
            (Some(r), Some(k)) => r.eq_ignore_ascii_case(&hex::encode(k)),
            _ => true,
        }
}

/// A key found on the token, with its attributes and pending deletion (if any).
pub(super) struct FoundKey {
    pub(super) handle: ObjectHandle,
    pub(super) attrs: KeyAttrs,
    /// The deletion date of the record that applies to the key.
    pub(super) pending: Option<i64>,
    disabled_by_fieldkey: bool,
}

/// The key labelled `label` as fieldkey sees it, after applying a deletion whose
/// waiting period is over (then `None`, as for a key that never was).
pub(super) fn lookup(
    token: &Token,
    session: &Session,
    label: &str,
) -> Result<Option<FoundKey>, Fail> {
    let Some(handle) = find_key(token, session, label)? else {
        return Ok(None);
    };
    let attrs = key_attrs(session, handle)?;
    let mut pending: Option<i64> = None;
    let mut disabled_by_fieldkey = false;
    for (_, record) in find_records(session, Some(label))? {
        let record = record.map_err(|e| {
            KmsError::Misconfigured(format!(
                "the deletion record of PKCS#11 key {label:?} is unreadable ({e}); remove it or the key"
            ))
        })?;
        if applies_to(&record, label, &attrs) {
            let d = record.deletion_date_unix_ms;
            pending = Some(pending.map_or(d, |p| p.min(d)));
            disabled_by_fieldkey |= record.disabled_on_token;
        }
    }
    if pending.is_some_and(|d| crate::model::now_ms() >= d) {
        destroy(session, handle, label)?;
        return Ok(None);
    }
    Ok(Some(FoundKey {
        handle,
        attrs,
        pending,
        disabled_by_fieldkey,
    }))
}

/// The key labelled `label`, ready to encrypt and decrypt: it exists, obeys
/// [`check_policy`], is not pending deletion ([`KmsError::KeyInvalidState`]) and is
/// enabled ([`KmsError::KeyDisabled`]).
pub(super) fn usable_key(
    token: &Token,
    session: &Session,
    label: &str,
) -> Result<ObjectHandle, Fail> {
    let key_id = || label.to_owned();
    let key =
        lookup(token, session, label)?.ok_or_else(|| KmsError::KeyNotFound { key_id: key_id() })?;
    check_policy(label, &key.attrs)?;
    if key.pending.is_some() {
        return Err(KmsError::KeyInvalidState { key_id: key_id() }.into());
    }
    if !key.attrs.usable() {
        return Err(KmsError::KeyDisabled { key_id: key_id() }.into());
    }
    Ok(key.handle)
}

/// Destroys the key, then every deletion record of its label.
fn destroy(session: &Session, key: ObjectHandle, label: &str) -> Result<(), Fail> {
    match session.destroy_object(key) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::ObjectHandleInvalid, _)) => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(
        key_label = label,
        "PKCS#11 KMS: destroyed a key at the end of its deletion window"
    );
    for (h, _) in find_records(session, Some(label))? {
        remove_record(session, h)?;
    }
    Ok(())
}

fn remove_record(session: &Session, record: ObjectHandle) -> Result<(), Fail> {
    match session.destroy_object(record) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::ObjectHandleInvalid, _)) => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Applies every deletion whose waiting period is over and removes records that apply
/// to no key. Failures are logged: a sweep never fails the call it runs in.
pub(super) fn sweep(token: &Token, session: &Session) {
    if let Err(f) = try_sweep(token, session) {
        let e = super::pool::classify(f, "(sweep)");
        tracing::warn!(token = token.label(), error = %e, "PKCS#11 KMS: cannot check deletion records");
    }
}

fn try_sweep(token: &Token, session: &Session) -> Result<(), Fail> {
    for (h, record) in find_records(session, None)? {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    token = token.label(),
                    error = e,
                    "PKCS#11 KMS: unreadable deletion record left alone"
                );
                continue;
            }
        };
        let label = record.key_label.as_str();
        let Some(key) = find_key(token, session, label)? else {
            remove_record(session, h)?;
            continue;
        };
        let attrs = key_attrs(session, key)?;
        if !applies_to(&record, label, &attrs) {
            tracing::info!(
                key_label = label,
                "PKCS#11 KMS: removed a deletion record of an earlier key with this label"
            );
            remove_record(session, h)?;
        } else if crate::model::now_ms() >= record.deletion_date_unix_ms {
            destroy(session, key, label)?;
        }
    }
    Ok(())
}

/// Schedules the deletion of the key labelled `label` (see the module note).
pub(super) fn schedule_deletion(
    token: &Token,
    session: &Session,
    label: &str,
    days: u32,
) -> Result<KeyDeletion, Fail> {
    sweep(token, session);
    let not_found = || KmsError::KeyNotFound {
        key_id: label.to_owned(),
    };
    let key = lookup(token, session, label)?.ok_or_else(not_found)?;
    if let Some(d) = key.pending {
        return Ok(KeyDeletion::AlreadyPending {
            deletion_date_unix_ms: Some(d),
        });
    }
    if key.attrs.destroyable == Some(false) {
        return Err(KmsError::Misconfigured(format!(
            "PKCS#11 key {label:?} cannot be destroyed (CKA_DESTROYABLE false); fieldkey cannot delete it"
        ))
        .into());
    }
    let date = crate::model::now_ms().saturating_add(i64::from(days).saturating_mul(DAY_MS));
    if days == 0 {
        destroy(session, key.handle, label)?;
        return Ok(KeyDeletion::Scheduled {
            pending_window_days: 0,
            deletion_date_unix_ms: Some(date),
        });
    }
    let disable = key.attrs.usable();
    let record = DeletionRecord {
        format: RECORD_FORMAT.into(),
        key_label: label.to_owned(),
        deletion_date_unix_ms: date,
        check_value: key.attrs.check_value.as_deref().map(hex::encode),
        disabled_on_token: disable,
    };
    let value = serde_json::to_vec(&record)
        .map_err(|e| KmsError::Misconfigured(format!("cannot encode a deletion record: {e}")))?;
    session.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Application(RECORD_APPLICATION.to_vec()),
        Attribute::Label(record_label(label)),
        Attribute::Value(value),
    ])?;
    if disable {
        set_usable(session, key.handle, label, false)?;
    }
    tracing::info!(
        key_label = label,
        days,
        deletion_date_unix_ms = date,
        "PKCS#11 KMS: key scheduled for deletion"
    );
    Ok(KeyDeletion::Scheduled {
        pending_window_days: days,
        deletion_date_unix_ms: Some(date),
    })
}

/// Turns `CKA_ENCRYPT` and `CKA_DECRYPT` on or off. A token that does not allow it
/// (`CKA_MODIFIABLE` false, or its policy) is logged: fieldkey's own refusal rests on
/// the deletion record, but other applications of the token can then still use the
/// key.
fn set_usable(session: &Session, key: ObjectHandle, label: &str, on: bool) -> Result<(), Fail> {
    use cryptoki::error::{Error, RvError};
    match session.update_attributes(key, &[Attribute::Encrypt(on), Attribute::Decrypt(on)]) {
        Ok(()) => Ok(()),
        Err(Error::Pkcs11(
            rv @ (RvError::AttributeReadOnly
            | RvError::ActionProhibited
            | RvError::AttributeTypeInvalid
            | RvError::AttributeValueInvalid
            | RvError::TemplateInconsistent),
            _,
        )) => {
            tracing::warn!(
                key_label = label,
                refused = ?rv,
                "PKCS#11 token does not let fieldkey change the key's CKA_ENCRYPT/CKA_DECRYPT; fieldkey refuses the key pending deletion, other applications of the token can still use it"
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Cancels a pending deletion and makes the key usable again.
pub(super) fn cancel_deletion(token: &Token, session: &Session, label: &str) -> Result<(), Fail> {
    let key_id = || label.to_owned();
    let key =
        lookup(token, session, label)?.ok_or_else(|| KmsError::KeyNotFound { key_id: key_id() })?;
    if key.pending.is_none() {
        return if key.attrs.usable() {
            Ok(())
        } else {
            Err(KmsError::KeyDisabled { key_id: key_id() }.into())
        };
    }
    if key.disabled_by_fieldkey {
        set_usable(session, key.handle, label, true)?;
    }
    for (h, _) in find_records(session, Some(label))? {
        remove_record(session, h)?;
    }
    tracing::info!(key_label = label, "PKCS#11 KMS: key deletion cancelled");
    Ok(())
}

/// The state of the key labelled `label`.
pub(super) fn status(token: &Token, session: &Session, label: &str) -> Result<KeyStatus, Fail> {
    Ok(match lookup(token, session, label)? {
        None => KeyStatus::Deleted,
        Some(k) => match k.pending {
            Some(d) => KeyStatus::PendingDeletion {
                deletion_date_unix_ms: Some(d),
            },
            None if k.attrs.usable() => KeyStatus::Enabled,
            None => KeyStatus::Disabled,
        },
    })
}

/// Generates a token AES-256 key for key epoch `epoch` of store `store_tag`, under a
/// label of its own: `fieldkey/<store_tag>/epoch-<epoch>-<16 hex digits>`. A key
/// already carrying a label is never adopted (another store's, or an operator's):
/// adopting it would let this store delete it.
pub(super) fn create_epoch_key(
    token: &Token,
    session: &Session,
    epoch: u64,
    store_tag: &str,
) -> Result<String, Fail> {
    sweep(token, session);
    let mut id = [0u8; 8];
    getrandom::fill(&mut id)
        .map_err(|_| KmsError::Misconfigured("system random number generator failed".into()))?;
    let label = format!("fieldkey/{store_tag}/epoch-{epoch}-{}", hex::encode(id));
    if !valid_label(&label) {
        return Err(KmsError::Misconfigured(format!(
            "epochs.store_tag {store_tag:?} makes a PKCS#11 key label that is too long or has control characters"
        ))
        .into());
    }
    if find_key(token, session, &label)?.is_some()
        || !find_records(session, Some(&label))?.is_empty()
    {
        return Err(KmsError::Rejected {
            code: format!("PKCS#11 key label {label:?} is taken; not adopting it"),
        }
        .into());
    }
    session.generate_key(
        &cryptoki::mechanism::Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )?;
    tracing::info!(key_label = %label, epoch, "PKCS#11 KMS: created an epoch key");
    Ok(label)
}

/// The checks at open: the default key, if it exists, obeys [`check_policy`]. A
/// missing default key is only logged (it may have been deleted on purpose, as the
/// legacy key of key epochs); [`Kms::check`](crate::kms::Kms::check) reports it.
pub(super) fn check_default_key(token: &Token, session: &Session, label: &str) -> Result<(), Fail> {
    match find_key(token, session, label)? {
        Some(key) => Ok(check_policy(label, &key_attrs(session, key)?)?),
        None => {
            tracing::warn!(
                token = token.label(),
                key_label = label,
                "PKCS#11 default key not found on the token; readiness will fail until it exists"
            );
            Ok(())
        }
    }
}
