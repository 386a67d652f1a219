//! Device password checks that cost a slow hash once, not once per block.
//!
//! After a password verifies against the stored bcrypt hash, the service remembers an HMAC-SHA256
//! of it under a key that lives only in this process's memory, together with a fingerprint of the
//! credentials it was checked against. The next request with the same password is recognised by
//! recomputing the HMAC and comparing in constant time; changing the device's credentials voids
//! the entry. Neither the password nor anything that could be brute-forced offline is kept.

use crate::context::DeviceContext;
use ajour_registry::{verify_password, Key, PasswordCheck};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::RwLock;
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Unknown device, or a password that does not match. Deliberately the same answer.
    #[error("authentication failed")]
    Denied,
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

struct Verified {
    tag: [u8; 32],
    fingerprint: [u8; 32],
}

pub(crate) struct CredentialCache {
    key: [u8; 32],
    verified: RwLock<HashMap<Key, Verified>>,
    /// One slow hash per core at a time: a thousand devices connecting at once (or a flood of wrong
    /// passwords) queue here instead of starting a thousand blocking threads.
    verifying: tokio::sync::Semaphore,
}

impl CredentialCache {
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Self {
            key,
            verified: RwLock::default(),
            verifying: tokio::sync::Semaphore::new(cores),
        }
    }

    fn tag(&self, key: &Key, username: &str, password: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        // Length-prefixed, so no two (key, username, password) triples feed the same bytes.
        for part in [key.to_string().as_str(), username, password] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    pub async fn check(
        &self,
        key: &Key,
        context: &DeviceContext,
        username: &str,
        password: &str,
    ) -> Result<(), AuthError> {
        let tag = self.tag(key, username, password);
        if let Some(verified) = self.verified.read().unwrap().get(key) {
            let same_tag: bool = verified.tag.ct_eq(&tag).into();
            if same_tag && verified.fingerprint == context.credentials_fingerprint {
                return Ok(());
            }
        }
        let spec = context.spec.clone();
        let (username_owned, password_owned) = (username.to_string(), password.to_string());
        let _permit = self
            .verifying
            .acquire()
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        // bcrypt takes tens of milliseconds by design; keep it off the async workers.
        let check =
            tokio::task::spawn_blocking(move || verify_password(&spec, &username_owned, &password_owned))
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        if check != PasswordCheck::Valid {
            return Err(AuthError::Denied);
        }
        self.verified.write().unwrap().insert(
            key.clone(),
            Verified {
                tag,
                fingerprint: context.credentials_fingerprint,
            },
        );
        Ok(())
    }

    pub fn invalidate(&self, key: &Key) {
        let mut verified = self.verified.write().unwrap();
        match key {
            Key::Device(..) => {
                verified.remove(key);
            }
            Key::App(app) => verified.retain(|k, _| k.app() != app),
        }
    }
}
