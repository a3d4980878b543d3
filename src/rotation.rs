//! `POST /admin/encryption/rotate`: re-encrypts every stored secret (client keys and
//! provider keys) with the current encryption key.
//!
//! A secret that no configured key can decrypt disables its key and counts as failed:
//! it can never be used again, and a disabled key says so where a silently broken one
//! would not. A ciphertext changed concurrently (another replica rotating, an admin
//! edit) is left to that change. Running it twice is harmless.

use serde::Serialize;

use crate::client_keys;
use crate::clock::now_ms;
use crate::crypto::Keyring;
use crate::db::{Db, SecretTable, StoreError};
use crate::invalidation::Bus;
use crate::pool;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rotated {
    /// Secrets now encrypted with the current key.
    pub reencrypted: usize,
    /// Secrets no configured key could decrypt; their keys are disabled.
    pub failed: usize,
}

pub async fn rotate(db: &Db, keyring: &Keyring, bus: &Bus) -> Result<Rotated, StoreError> {
    let mut done = Rotated::default();
    for (id, hash, encrypted) in client_keys::store::secrets(db).await? {
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
                bus.key_changed(&hash).await;
                tracing::warn!(key_id = %id, "client key secret cannot be decrypted: key disabled");
                done.failed += 1;
            }
        }
    }
    for key in pool::store::list_all(db).await? {
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
                bus.pool_changed(&key.provider).await;
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
