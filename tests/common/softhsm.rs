//! [`SoftHsm`]: a SoftHSM2 token of its own for one test, with a default AES-256 key,
//! for the PKCS#11 KMS provider ([`fieldkey::kms::pkcs11`]).
//!
//! SoftHSM2 reads its configuration (`SOFTHSM2_CONF`) once, when the process first
//! initializes the library, and sees only the tokens that exist then and those made
//! through the library itself. So: the process's environment must name a
//! softhsm2.conf whose `directories.tokendir` is a private directory (scripts/test.sh
//! makes one per run and exports `SOFTHSM2_CONF`; a test cannot set it for its own
//! process: `std::env::set_var` is unsafe, and this crate forbids unsafe code), and
//! each [`SoftHsm`] initializes a token of its own in the library's free slot, under a
//! unique label (tests of one binary run in parallel threads; token creation is
//! serialized). On drop the token is deleted with `softhsm2-util --delete-token`.
//!
//! Environment: `FIELDKEY_TEST_PKCS11_MODULE` (else `/usr/lib/softhsm/libsofthsm2.so`),
//! `FIELDKEY_TEST_SOFTHSM2_UTIL` (else `softhsm2-util` on the PATH), `SOFTHSM2_CONF`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use fieldkey::kms::pkcs11::{Pkcs11Kms, Pkcs11Settings};

/// `CKA_LABEL` of the default key each token gets.
pub const DEFAULT_KEY_LABEL: &str = "fieldkey-default";

const HOW: &str = "run the tests through scripts/test.sh, which installs SoftHSM2 and exports FIELDKEY_TEST_PKCS11_MODULE, FIELDKEY_TEST_SOFTHSM2_UTIL and SOFTHSM2_CONF";

/// The PKCS#11 module under test.
pub fn module_path() -> PathBuf {
    let path = std::env::var_os("FIELDKEY_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
    assert!(
        path.is_file(),
        "SoftHSM2's PKCS#11 module {} not found: {HOW}",
        path.display()
    );
    path
}

fn util_path() -> PathBuf {
    std::env::var_os("FIELDKEY_TEST_SOFTHSM2_UTIL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("softhsm2-util"))
}

/// Checks (once) that `SOFTHSM2_CONF` names a configuration with a private token
/// directory, and creates that directory if missing.
fn check_conf() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let conf = std::env::var_os("SOFTHSM2_CONF").unwrap_or_else(|| {
            panic!(
                "SOFTHSM2_CONF is not set: the PKCS#11 tests need SoftHSM2 to keep its tokens in a private directory, and a test cannot set the variable for its own process; {HOW} (or export SOFTHSM2_CONF=<a softhsm2.conf with `directories.tokendir = <an empty private directory>`, `objectstore.backend = file`, `log.level = ERROR`>)"
            )
        });
        let text = std::fs::read_to_string(&conf).unwrap_or_else(|e| {
            panic!("cannot read SOFTHSM2_CONF {}: {e}", Path::new(&conf).display())
        });
        let dir = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == "directories.tokendir")
            .map(|(_, v)| PathBuf::from(v.trim()))
            .unwrap_or_else(|| panic!("SOFTHSM2_CONF has no directories.tokendir"));
        assert!(
            !dir.starts_with("/var/lib/softhsm"),
            "SOFTHSM2_CONF points at the system's token directory {}; the tests make and delete tokens: give them a private one ({HOW})",
            dir.display()
        );
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create token directory {}: {e}", dir.display()));
    });
}

/// The process's context of the module (loaded and initialized once; never finalized,
/// the provider under test shares the library's state).
pub fn context() -> &'static Pkcs11 {
    static CTX: OnceLock<Pkcs11> = OnceLock::new();
    CTX.get_or_init(|| {
        check_conf();
        let ctx = Pkcs11::new(module_path()).expect("load the SoftHSM2 module");
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("C_Initialize of SoftHSM2 failed: {e}"),
        }
        ctx
    })
}

fn pin(s: &str) -> AuthPin {
    AuthPin::from(s.to_owned())
}

/// What a test key may be, beyond the AES-256 default.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// Bytes (32: AES-256).
    pub len: u64,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
    /// `CKA_MODIFIABLE`.
    pub modifiable: bool,
}

impl Default for KeySpec {
    fn default() -> Self {
        Self {
            len: 32,
            extractable: false,
            sensitive: true,
            modifiable: true,
        }
    }
}

/// One SoftHSM2 token of one test, deleted on drop.
pub struct SoftHsm {
    label: String,
    serial: String,
    user_pin: String,
    dir: tempfile::TempDir,
    deleted: bool,
}

impl std::fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftHsm")
            .field("label", &self.label)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl SoftHsm {
    /// A new token (unique label, random SO and user PINs) with the default key
    /// [`DEFAULT_KEY_LABEL`], and a PIN file for [`SoftHsm::settings`].
    pub fn init() -> SoftHsm {
        static CREATE: Mutex<()> = Mutex::new(());
        let ctx = context();
        let label = format!("fk-test-{}", hex::encode(super::rand_bytes::<6>()));
        let so_pin = hex::encode(super::rand_bytes::<8>());
        let user_pin = hex::encode(super::rand_bytes::<8>());
        let slot = {
            let _one_at_a_time = CREATE.lock().unwrap_or_else(|e| e.into_inner());
            let free = ctx
                .get_all_slots()
                .expect("C_GetSlotList")
                .into_iter()
                .find(|s| {
                    ctx.get_token_info(*s)
                        .map(|t| !t.token_initialized())
                        .unwrap_or(false)
                })
                .expect("SoftHSM2 offers no free slot");
            ctx.init_token(free, &pin(&so_pin), &label)
                .expect("C_InitToken");
            let so = ctx.open_rw_session(free).expect("C_OpenSession");
            so.login(UserType::So, Some(&pin(&so_pin)))
                .expect("C_Login as SO");
            so.init_pin(&pin(&user_pin)).expect("C_InitPIN");
            so.logout().expect("C_Logout");
            free
        };
        let serial = ctx
            .get_token_info(slot)
            .expect("C_GetTokenInfo")
            .serial_number()
            .trim_end()
            .to_owned();
        let dir = tempfile::tempdir().expect("temporary directory");
        let hsm = SoftHsm {
            label,
            serial,
            user_pin,
            dir,
            deleted: false,
        };
        std::fs::write(hsm.dir.path().join("pin"), format!("{}\n", hsm.user_pin))
            .expect("write the PIN file");
        hsm.create_key(DEFAULT_KEY_LABEL, KeySpec::default());
        hsm
    }

    /// The token's label.
    pub fn token_label(&self) -> &str {
        &self.label
    }

    /// The user PIN.
    pub fn user_pin(&self) -> &str {
        &self.user_pin
    }

    /// Provider settings for this token: default key [`DEFAULT_KEY_LABEL`], the PIN
    /// from a file in the fixture's temporary directory, 4 sessions.
    pub fn settings(&self) -> Pkcs11Settings {
        let mut s = Pkcs11Settings::new(module_path(), &self.label, DEFAULT_KEY_LABEL);
        s.pin_file = Some(self.dir.path().join("pin"));
        s
    }

    /// [`SoftHsm::settings`] with another PIN (written to a file of its own).
    pub fn settings_with_pin(&self, other_pin: &str) -> Pkcs11Settings {
        let path = self
            .dir
            .path()
            .join(format!("pin-{}", hex::encode(super::rand_bytes::<4>())));
        std::fs::write(&path, other_pin).expect("write the PIN file");
        let mut s = self.settings();
        s.pin_file = Some(path);
        s
    }

    /// The provider on this token with [`SoftHsm::settings`].
    pub async fn kms(&self) -> Pkcs11Kms {
        Pkcs11Kms::open(&self.settings())
            .await
            .expect("open the PKCS#11 KMS on the SoftHSM2 token")
    }

    /// The token's current slot.
    pub fn slot(&self) -> Slot {
        let ctx = context();
        ctx.get_slots_with_token()
            .expect("C_GetSlotList")
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|t| t.label().trim_end() == self.label)
                    .unwrap_or(false)
            })
            .expect("the test's token is gone")
    }

    /// A read-write session of the test itself, logged in as the token's user (login
    /// state is shared by every session of the process on the token, the provider's
    /// included).
    pub fn session(&self) -> Session {
        let s = context()
            .open_rw_session(self.slot())
            .expect("C_OpenSession");
        match s.login(UserType::User, Some(&pin(&self.user_pin))) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("C_Login: {e}"),
        }
        s
    }

    /// Generates a token AES key labelled `label` as `spec` says.
    pub fn create_key(&self, label: &str, spec: KeySpec) {
        self.session()
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(spec.len.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(spec.sensitive),
                    Attribute::Extractable(spec.extractable),
                    Attribute::Modifiable(spec.modifiable),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .expect("C_GenerateKey");
    }

    /// The secret keys labelled `label` on the token, found by a session of the test.
    /// SoftHSM2 keeps object handles only while the process has a session open on the
    /// token (the provider's pool, or one from [`SoftHsm::session`]).
    pub fn find_keys(&self, label: &str) -> Vec<ObjectHandle> {
        self.session()
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .expect("C_FindObjects")
    }

    /// The data objects labelled `label` on the token, with their values.
    pub fn find_data(&self, label: &str) -> Vec<(ObjectHandle, Vec<u8>)> {
        let s = self.session();
        s.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .expect("C_FindObjects")
        .into_iter()
        .map(|h| {
            let v = s
                .get_attributes(h, &[AttributeType::Value])
                .expect("C_GetAttributeValue")
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Value(v) => Some(v),
                    _ => None,
                })
                .unwrap_or_default();
            (h, v)
        })
        .collect()
    }

    /// Deletes the token now, under the running library (as an HSM taken away).
    pub fn remove_token(&mut self) {
        self.delete_token();
    }

    fn delete_token(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        match std::process::Command::new(util_path())
            .args(["--delete-token", "--serial", &self.serial])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "softhsm2-util --delete-token {}: {}",
                self.serial,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot run {}: {e} ({HOW})", util_path().display()),
        }
    }
}

impl Drop for SoftHsm {
    fn drop(&mut self) {
        self.delete_token();
    }
}
