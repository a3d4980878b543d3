//! `POST /admin/encryption/rotate`: re-encrypts every stored secret (client keys and
//! provider keys) with the current encryption key.
//!
//! A secret that no configured key can decrypt disables its key and counts as failed:
//! it can never be used again, and a disabled key says so where a silently broken one
//! would not. A ciphertext changed concurrently (another replica rotating, an admin
//! edit) is left to that change. Running it twice is harmless.
//!
//! When secrets are stored and the keyring decrypts none of them, the keyring is wrong
//! (a lost key file replaced, a mistyped key), not the secrets: rotating would disable
//! every key. That is refused ([`RotateError::KeyringMismatch`]) before anything changes.

use serde::Serialize;

use crate::client_keys;
use crate::clock::now_ms;
use crate::crypto::Keyring;
use crate::db::{Db, SecretTable, StoreError};
use crate::invalidation::Invalidate;
use crate::pool;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rotated {
    /// Secrets now encrypted with the current key.
    pub reencrypted: usize,
    /// Secrets no configured key could decrypt; their keys are disabled.
    pub failed: usize,
}

/// Why a rotation did not run.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("none of the {stored} stored secrets can be decrypted with the configured encryption keys; nothing was changed (is KEYWARD_ENCRYPTION_KEY, or the key file, the one they were encrypted with?)")]
    KeyringMismatch { stored: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub async fn rotate(
    db: &Db,
    keyring: &Keyring,
    invalidator: &dyn Invalidate,
) -> Result<Rotated, RotateError> {
    let client_secrets = client_keys::store::secrets(db).await?;
    let provider_keys = pool::store::list_all(db).await?;
    // Decide before the first write: a keyring that decrypts nothing changes nothing.
    let stored = client_secrets.len() + provider_keys.len();
    let readable = client_secrets
        .iter()
        .map(|(_, _, encrypted)| encrypted)
        .chain(provider_keys.iter().map(|k| &k.key_encrypted))
        .any(|encrypted| keyring.decrypt(encrypted).is_ok());
    if stored > 0 && !readable {
        tracing::error!(
            stored,
            "rotation refused: the keyring decrypts none of the stored secrets"
        );
        return Err(RotateError::KeyringMismatch { stored });
    }

    let mut done = Rotated::default();
    for (id, hash, encrypted) in client_secrets {
        match keyring.decrypt(&encrypted) {
            Ok(secret) => {
                let fresh = keyring.encrypt(&secret);
                if db
                    .replace_secret(SecretTable::ClientKeys, &id, &encrypted, &fresh, now_ms())
                    .await?
                {
                    done.reencrypted += 1;
                }
            }
            Err(_) => {
                client_keys::store::disable(db, &id, now_ms()).await?;
                invalidator.key_changed(&hash).await;
                tracing::warn!(key_id = %id, "client key secret cannot be decrypted: key disabled");
                done.failed += 1;
            }
        }
    }
    for key in provider_keys {
        match keyring.decrypt(&key.key_encrypted) {
            Ok(value) => {
                let fresh = keyring.encrypt(&value);
                if db
                    .replace_secret(
                        SecretTable::ProviderKeys,
                        &key.id,
                        &key.key_encrypted,
                        &fresh,
                        now_ms(),
                    )
                    .await?
                {
                    done.reencrypted += 1;
                }
            }
            Err(_) => {
                pool::store::disable(db, &key.id, now_ms()).await?;
                invalidator.roster_changed(&key.provider).await;
                tracing::warn!(provider_key_id = %key.id, "provider key cannot be decrypted: key disabled");
                done.failed += 1;
            }
        }
    }
    tracing::info!(
        reencrypted = done.reencrypted,
        failed = done.failed,
        "encryption keys rotated"
    );
    Ok(done)
}
