//! The PKCS#11 library is reset under the running provider (`C_Finalize` by another
//! user of the module in the process: every session and the login are gone, and
//! SoftHSM2 gives the token a new slot id when it is initialized again). The provider
//! answers [`KmsError::Unavailable`], drops its dead sessions, and on the next call
//! initializes the library again, finds the token by its label and logs in again.
//!
//! A test binary of its own: `C_Finalize` ends the sessions of every test in the
//! process.

mod common;

use common::softhsm::{DEFAULT_KEY_LABEL, SoftHsm, module_path};
use fieldkey::kms::{EncryptionContext, KeyStatus, Kms, KmsError};

#[tokio::test]
async fn a_reset_library_is_unavailable_once_then_reopened_and_logged_in_again() {
    let hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    let c = EncryptionContext::tenant_key("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY_LABEL, &c).await.unwrap();
    let slot_before = hsm.slot();

    cryptoki::context::Pkcs11::new(module_path())
        .unwrap()
        .finalize()
        .unwrap();

    let r = kms.unwrap(DEFAULT_KEY_LABEL, &dk.wrapped, &c).await;
    assert!(matches!(r, Err(KmsError::Unavailable(_))), "{r:?}");
    // The next call opens a new session (library initialized again, token found
    // under its new slot id, logged in again).
    let back = kms
        .unwrap(DEFAULT_KEY_LABEL, &dk.wrapped, &c)
        .await
        .unwrap();
    assert!(back.ct_eq(&dk.secret));
    assert_ne!(
        hsm.slot(),
        slot_before,
        "SoftHSM2 kept the slot id: the re-lookup went untested"
    );
    assert_eq!(
        kms.key_status(DEFAULT_KEY_LABEL).await.unwrap(),
        KeyStatus::Enabled
    );
    kms.check().await.unwrap();
}
