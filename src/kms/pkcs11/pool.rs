//! The PKCS#11 module, the token's slot, a bounded pool of logged-in sessions, and the
//! one place that turns PKCS#11 return values into [`KmsError`]s.
//!
//! cryptoki's `Session` is `Send` but not `Sync`: a session is taken out of the pool by
//! one blocking task at a time (`tokio::task::spawn_blocking`), used, and put back. A
//! semaphore bounds the sessions (and so the HSM calls) in flight. A session that
//! failed in a way that says it, the token or the library is gone is closed, and so is
//! every idle one; the next call opens (and logs in) a new one, finding the token again
//! by its label if its slot id changed.
//!
//! Does not: know key labels, deletion records or the wrapped-key format (the parent
//! module and `keys.rs` do).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use tokio::sync::Semaphore;

use crate::kms::KmsError;

/// A failed step of a PKCS#11 operation: a raw PKCS#11 error (classified by
/// [`Token::run`], which knows the key it was about) or an answer already decided.
pub(super) enum Fail {
    /// cryptoki's error, not yet classified.
    P11(P11Error),
    /// The answer.
    Kms(KmsError),
}

impl From<P11Error> for Fail {
    fn from(e: P11Error) -> Self {
        Fail::P11(e)
    }
}

impl From<KmsError> for Fail {
    fn from(e: KmsError) -> Self {
        Fail::Kms(e)
    }
}

/// The PKCS#11 return values after which a session (or every session) is no use: the
/// session, the token, the device or the library's state went away.
fn is_gone(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceError
            | RvError::DeviceRemoved
            | RvError::DeviceMemory
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid
            | RvError::GeneralError
            | RvError::FunctionFailed
            | RvError::HostMemory
    )
}

/// The PIN return values of `C_Login`: the token refused the PIN itself.
fn is_pin_refusal(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange | RvError::PinLocked
    )
}

/// Modules loaded by this process, by canonical path. PKCS#11 allows one
/// `C_Initialize` per process and module; every [`Token`] of one module shares its
/// context, and none calls `C_Finalize` (that would end every other's sessions). The
/// modules stay loaded until the process exits: unloading one that registered exit
/// handlers (SoftHSM2 does) without finalizing it is unsafe.
static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// Loads (once per process) and initializes the PKCS#11 module at `path`.
pub(super) fn load_module(path: &Path) -> Result<Pkcs11, KmsError> {
    let canonical = path.canonicalize().map_err(|e| {
        KmsError::Misconfigured(format!("PKCS#11 module {} not found: {e}", path.display()))
    })?;
    let modules = MODULES.get_or_init(Default::default);
    let mut modules = modules
        .lock()
        .map_err(|_| KmsError::Misconfigured("PKCS#11 module registry poisoned".into()))?;
    if let Some(m) = modules.get(&canonical) {
        return Ok(m.clone());
    }
    let module = Pkcs11::new(&canonical).map_err(|e| {
        KmsError::Misconfigured(format!(
            "cannot load PKCS#11 module {}: {e}",
            canonical.display()
        ))
    })?;
    initialize(&module).map_err(|e| {
        KmsError::Misconfigured(format!(
            "PKCS#11 module {}: C_Initialize failed: {e}",
            canonical.display()
        ))
    })?;
    modules.insert(canonical, module.clone());
    Ok(module)
}

/// `C_Initialize` with the OS's locking (the pool calls from several threads); a module
/// already initialized in this process (by another user of it) is fine.
fn initialize(module: &Pkcs11) -> Result<(), P11Error> {
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The slot holding the one initialized token labelled `label`: `Ok(None)` if there is
/// none; [`KmsError::Misconfigured`] if several have the label. A slot whose token
/// cannot be described (a token removed under the library) is passed over.
pub(super) fn find_slot(module: &Pkcs11, label: &str) -> Result<Option<Slot>, Fail> {
    let mut found = Vec::new();
    for slot in module.get_slots_with_token()? {
        let Ok(info) = module.get_token_info(slot) else {
            continue;
        };
        if info.token_initialized() && info.label().trim_end() == label {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [slot] => Ok(Some(*slot)),
        _ => Err(Fail::Kms(KmsError::Misconfigured(format!(
            "{} PKCS#11 tokens are labelled {label:?}; fieldkey needs exactly one",
            found.len()
        )))),
    }
}

/// One token of one module, logged in as its user, with a pool of sessions.
pub(super) struct Token {
    module: Pkcs11,
    module_path: PathBuf,
    label: String,
    slot: Mutex<Slot>,
    pin: SecretString,
    /// Set when the token refused the PIN: it is never offered again by this process
    /// (each wrong attempt counts towards locking the token's user PIN).
    pin_refused: AtomicBool,
    /// Serializes `C_Login`, so that concurrent new sessions do not each offer a PIN
    /// that turns out to be wrong.
    login_lock: Mutex<()>,
    idle: Mutex<Vec<Session>>,
    permits: Arc<Semaphore>,
    size: usize,
    timeout: Duration,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.module_path)
            .field("label", &self.label)
            .field("sessions", &self.size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why `C_Login` refused: the message of [`KmsError::Misconfigured`]. Never contains
/// the PIN.
fn pin_refused_message(label: &str, rv: RvError) -> String {
    match rv {
        RvError::PinLocked => format!(
            "the user PIN of PKCS#11 token {label:?} is locked (CKR_PIN_LOCKED); the token's security officer must unlock it"
        ),
        _ => format!(
            "PKCS#11 token {label:?} refused the PIN ({}); fieldkey does not offer a refused PIN again (each wrong attempt counts towards locking the token): correct the PIN source and restart",
            rv_name(rv)
        ),
    }
}

fn rv_name(rv: RvError) -> &'static str {
    match rv {
        RvError::PinIncorrect => "CKR_PIN_INCORRECT",
        RvError::PinInvalid => "CKR_PIN_INVALID",
        RvError::PinLenRange => "CKR_PIN_LEN_RANGE",
        RvError::PinLocked => "CKR_PIN_LOCKED",
        RvError::PinExpired => "CKR_PIN_EXPIRED",
        _ => "a PIN error",
    }
}

impl Token {
    /// The token labelled `label` in `module`, logged in with `pin` on a first session
    /// (kept in the pool, so the login lasts).
    ///
    /// # Errors
    /// [`KmsError::Misconfigured`] if there is no such token (or several), or it
    /// refuses the PIN; others as [`Token::run`].
    pub(super) fn open(
        module: Pkcs11,
        module_path: PathBuf,
        label: String,
        pin: SecretString,
        sessions: usize,
        timeout: Duration,
    ) -> Result<Arc<Self>, KmsError> {
        let slot = find_slot(&module, &label)
            .map_err(|f| classify(f, "(token)"))?
            .ok_or_else(|| {
                KmsError::Misconfigured(format!(
                    "no initialized PKCS#11 token labelled {label:?} in {}",
                    module_path.display()
                ))
            })?;
        let token = Arc::new(Self {
            module,
            module_path,
            label,
            slot: Mutex::new(slot),
            pin,
            pin_refused: AtomicBool::new(false),
            login_lock: Mutex::new(()),
            idle: Mutex::new(Vec::with_capacity(sessions)),
            permits: Arc::new(Semaphore::new(sessions)),
            size: sessions,
            timeout,
        });
        let session = token.open_session().map_err(|f| classify(f, "(token)"))?;
        token.put_back(session);
        Ok(token)
    }

    /// The token's label.
    pub(super) fn label(&self) -> &str {
        &self.label
    }

    /// The module's path as configured.
    pub(super) fn module_path(&self) -> &Path {
        &self.module_path
    }

    /// The pool's size.
    pub(super) fn pool_size(&self) -> usize {
        self.size
    }

    /// Runs `op` on a pooled session in a blocking task, within the call deadline
    /// (waiting for a session included). PKCS#11 errors are classified here, about
    /// `key_id`: a gone session/token/library is [`KmsError::Unavailable`] (the session
    /// and every idle one are closed, the next call opens new ones); a session that
    /// lost its login is logged in again once and `op` repeated.
    ///
    /// A call that passes its deadline returns [`KmsError::Timeout`]; its blocking task
    /// finishes in the background and puts its session back.
    pub(super) async fn run<T, F>(self: &Arc<Self>, key_id: &str, op: F) -> Result<T, KmsError>
    where
        T: Send + 'static,
        F: Fn(&Token, &Session) -> Result<T, Fail> + Send + 'static,
    {
        let token = Arc::clone(self);
        let key_id = key_id.to_owned();
        let call = async move {
            let permit = Arc::clone(&token.permits)
                .acquire_owned()
                .await
                .map_err(|e| KmsError::Unavailable(Arc::new(e)))?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                token.run_blocking(&key_id, &op)
            })
            .await
            .map_err(|e| KmsError::Unavailable(Arc::new(e)))?
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| KmsError::Timeout)?
    }

    fn run_blocking<T>(
        &self,
        key_id: &str,
        op: &dyn Fn(&Token, &Session) -> Result<T, Fail>,
    ) -> Result<T, KmsError> {
        let session = match self.take_idle() {
            Some(s) => s,
            None => self
                .open_session()
                .map_err(|f| self.failed(None, f, key_id))?,
        };
        let mut logged_in_again = false;
        loop {
            match op(self, &session) {
                Ok(v) => {
                    self.put_back(session);
                    return Ok(v);
                }
                Err(Fail::P11(P11Error::Pkcs11(RvError::UserNotLoggedIn, _)))
                    if !logged_in_again =>
                {
                    logged_in_again = true;
                    tracing::info!(token = %self.label, "PKCS#11 session lost its login; logging in again");
                    if let Err(f) = self.login(&session) {
                        return Err(self.failed(Some(session), f, key_id));
                    }
                }
                Err(f) => return Err(self.failed(Some(session), f, key_id)),
            }
        }
    }

    /// Classifies a failure; closes the session (and the idle ones) if it is gone,
    /// else puts it back.
    fn failed(&self, session: Option<Session>, f: Fail, key_id: &str) -> KmsError {
        let gone = matches!(&f, Fail::P11(P11Error::Pkcs11(rv, _)) if is_gone(*rv))
            || matches!(
                &f,
                Fail::P11(P11Error::LibraryLoading(_) | P11Error::NullFunctionPointer)
            );
        match session {
            Some(s) if gone => {
                drop(s);
                let idle = self
                    .idle
                    .lock()
                    .map(|mut v| std::mem::take(&mut *v))
                    .unwrap_or_default();
                drop(idle);
                tracing::warn!(token = %self.label, "PKCS#11 session or token gone; sessions closed, new ones are opened on the next call");
            }
            Some(s) => self.put_back(s),
            None => {}
        }
        classify(f, key_id)
    }

    fn take_idle(&self) -> Option<Session> {
        self.idle.lock().ok().and_then(|mut v| v.pop())
    }

    fn put_back(&self, session: Session) {
        if let Ok(mut v) = self.idle.lock() {
            v.push(session);
        }
    }

    /// Opens a read-write session and logs it in. A slot that no longer holds the
    /// token (re-plugged, or the library re-initialized: slot ids change) is looked up
    /// again by the token's label; a library finalized under us is initialized again.
    fn open_session(&self) -> Result<Session, Fail> {
        let slot = *self
            .slot
            .lock()
            .map_err(|_| KmsError::Misconfigured("PKCS#11 slot lock poisoned".into()))?;
        let session = match self.module.open_rw_session(slot) {
            Ok(s) => s,
            Err(P11Error::Pkcs11(rv, _))
                if matches!(
                    rv,
                    RvError::CryptokiNotInitialized
                        | RvError::SlotIdInvalid
                        | RvError::TokenNotPresent
                        | RvError::TokenNotRecognized
                        | RvError::DeviceRemoved
                ) =>
            {
                if rv == RvError::CryptokiNotInitialized {
                    initialize(&self.module)?;
                }
                let slot = find_slot(&self.module, &self.label)?.ok_or(Fail::P11(
                    P11Error::Pkcs11(RvError::TokenNotPresent, Function::GetTokenInfo),
                ))?;
                if let Ok(mut s) = self.slot.lock() {
                    *s = slot;
                }
                self.module.open_rw_session(slot)?
            }
            Err(e) => return Err(e.into()),
        };
        self.login(&session)?;
        Ok(session)
    }

    /// `C_Login` as the token's user. Login state is per application and token, so a
    /// session of an application already logged in answers "already logged in". A
    /// refused PIN is remembered and never offered again.
    fn login(&self, session: &Session) -> Result<(), Fail> {
        let _guard = self
            .login_lock
            .lock()
            .map_err(|_| KmsError::Misconfigured("PKCS#11 login lock poisoned".into()))?;
        if self.pin_refused.load(Ordering::SeqCst) {
            return Err(Fail::Kms(KmsError::Misconfigured(format!(
                "PKCS#11 token {:?} refused the PIN earlier; fieldkey does not offer it again: correct the PIN source and restart",
                self.label
            ))));
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(P11Error::Pkcs11(rv, _)) if is_pin_refusal(rv) => {
                self.pin_refused.store(true, Ordering::SeqCst);
                Err(Fail::Kms(KmsError::Misconfigured(pin_refused_message(
                    &self.label,
                    rv,
                ))))
            }
            Err(P11Error::Pkcs11(rv @ RvError::PinExpired, _)) => Err(Fail::Kms(
                KmsError::Misconfigured(pin_refused_message(&self.label, rv)),
            )),
            Err(P11Error::Pkcs11(RvError::UserPinNotInitialized, _)) => {
                Err(Fail::Kms(KmsError::Misconfigured(format!(
                    "PKCS#11 token {:?} has no user PIN yet (CKR_USER_PIN_NOT_INITIALIZED)",
                    self.label
                ))))
            }
            Err(P11Error::Pkcs11(RvError::UserAnotherAlreadyLoggedIn, _)) => {
                Err(Fail::Kms(KmsError::Misconfigured(format!(
                    "another user (the security officer?) is logged in to PKCS#11 token {:?} in this process",
                    self.label
                ))))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Before concluding that an object does not exist: the session must still be
    /// logged in (private objects are invisible to a public session, which would make
    /// every key look deleted) and the token still present under its label (SoftHSM2
    /// answers searches on a removed token with nothing).
    pub(super) fn ensure_live(&self, session: &Session) -> Result<(), Fail> {
        let info = session.get_session_info()?;
        if !matches!(
            info.session_state(),
            SessionState::RwUser | SessionState::RoUser
        ) {
            return Err(Fail::P11(P11Error::Pkcs11(
                RvError::UserNotLoggedIn,
                Function::GetSessionInfo,
            )));
        }
        let token = self.module.get_token_info(info.slot_id())?;
        if token.label().trim_end() != self.label {
            return Err(Fail::P11(P11Error::Pkcs11(
                RvError::TokenNotPresent,
                Function::GetTokenInfo,
            )));
        }
        Ok(())
    }
}

/// The one mapping of a PKCS#11 failure to a [`KmsError`], about key `key_id`. Chosen
/// from the return value (`CKR_*`), never from text.
pub(super) fn classify(f: Fail, key_id: &str) -> KmsError {
    let e = match f {
        Fail::Kms(k) => return k,
        Fail::P11(e) => e,
    };
    let key_id = key_id.to_owned();
    match e {
        P11Error::Pkcs11(rv, function) => match rv {
            rv if is_gone(rv) => KmsError::Unavailable(Arc::new(e)),
            RvError::UserNotLoggedIn | RvError::SessionCount | RvError::CantLock => {
                KmsError::Unavailable(Arc::new(e))
            }
            RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => {
                KmsError::KeyNotFound { key_id }
            }
            RvError::KeyFunctionNotPermitted => KmsError::KeyDisabled { key_id },
            RvError::MechanismInvalid | RvError::MechanismParamInvalid => {
                KmsError::Misconfigured(format!(
                    "the PKCS#11 token does not support AES-GCM as fieldkey uses it ({rv:?} in {function:?})"
                ))
            }
            RvError::TokenWriteProtected | RvError::SessionReadOnly => KmsError::Misconfigured(
                "the PKCS#11 token is write-protected; fieldkey needs read-write sessions".into(),
            ),
            _ => KmsError::Rejected {
                code: format!("PKCS#11 {rv:?} in {function:?}"),
            },
        },
        P11Error::LibraryLoading(_) | P11Error::NullFunctionPointer => {
            KmsError::Unavailable(Arc::new(e))
        }
        other => KmsError::Rejected {
            code: format!("PKCS#11 client: {other}"),
        },
    }
}
