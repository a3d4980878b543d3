//! Admission: may this client key make this request now?
//!
//! The path of one admit:
//! 1. The secret is hashed and looked up in the in-process [`KeyCache`] (no database
//!    query for a key seen before).
//! 2. Static checks, in process, before Redis is touched: unknown, disabled, expired
//!    (at once, from `expires_at`), provider/model/API-format allow-lists, an estimate
//!    larger than the TPM limit itself. The request's quota entries are built
//!    ([`quotas::build`]: the key's day and spend limits, its model entry, its user's and
//!    the user's model entry); an estimate above one of their token limits, or a hold
//!    above one of their spend limits, could never pass and is refused here. A spend
//!    limit, like a balance, needs a price.
//! 3. One call to the counter store ([`Counters::admit`]): balance, RPM, TPM, concurrency,
//!    every quota entry and, with `"select": true`, the provider key, all or nothing, in
//!    one Redis round trip. A refusal by any leaves every counter as it was.
//!
//! Invariant: nothing is counted before step 3, and step 3 counts everything or nothing.
//!
//! The types of a request and its answer are in `request`, the small in-process rules
//! (names, allow-lists, plausible secrets, the hold) in `rules`.
//!
//! (Somewhat over 400 lines: the admit path is kept in one file, in the order it runs,
//! so a reader follows one request from top to bottom.)

pub mod quotas;
mod request;
mod rules;
mod spend_now;

use std::sync::Arc;

use crate::client_keys::cache::KeyCache;
use crate::client_keys::input::MAX_LIMIT;
use crate::client_keys::ClientKey;
use crate::clock::now_ms;
use crate::crypto::{lookup_hash, Keyring};
use crate::lease::SignedLease;
use crate::limits::{
    AdmitRequest, BalanceSnapshot, CounterError, Counters, LeaseId, Pick, SelectRequest, Tenant,
    Verdict,
};
use crate::names;
use crate::pool::cache::{Candidate, Roster, RosterCache};
use crate::pool::valid_provider;
use crate::prices::{Price, PriceCache};
use crate::quota::UserLimits;
use crate::users::cache::UserCache;
use quotas::StaticRefusal;
pub use request::{AdmitBody, AdmitError, Admitted, Defaults};
use rules::{allows, given, hold, plausible_secret};

pub struct Admission {
    cache: Arc<KeyCache>,
    rosters: Arc<RosterCache>,
    /// One reload at a time of a pool that Redis holds a newer version of, so the
    /// requests that meet it together load it from the database once.
    pool_reload: tokio::sync::Mutex<()>,
    counters: Counters,
    /// Signs the lease ids this process issues and verifies the ones it is shown.
    keyring: Arc<Keyring>,
    prices: Arc<PriceCache>,
    /// The limits shared by the keys of one `user_id`, in process like the keys.
    users: Arc<UserCache>,
    defaults: Defaults,
    /// Key id → lookup hash of the keys this process checked, so a report (which names
    /// the key by id) finds its record in the key cache (see `spend_now`).
    hashes: dashmap::DashMap<String, String>,
}

impl Admission {
    pub fn new(
        cache: Arc<KeyCache>,
        rosters: Arc<RosterCache>,
        counters: Counters,
        keyring: Arc<Keyring>,
        prices: Arc<PriceCache>,
        users: Arc<UserCache>,
        defaults: Defaults,
    ) -> Self {
        Self {
            cache,
            rosters,
            pool_reload: tokio::sync::Mutex::new(()),
            counters,
            keyring,
            prices,
            users,
            defaults,
            hashes: dashmap::DashMap::new(),
        }
    }

    /// The price a request is admitted at: its model's own (or its longest priced
    /// prefix's, see [`crate::prices::lookup`]), else `KEYWARD_DEFAULT_PRICE`, else
    /// none. Prices come from the in-process cache (no database query once loaded; a
    /// provider's prices are served past their TTL while the database is away). A price
    /// that cannot be loaded is an error only where it matters: for a key with a
    /// balance.
    async fn price(
        &self,
        provider: Option<&str>,
        model: Option<&str>,
        needed: bool,
    ) -> Result<Option<Price>, AdmitError> {
        let own = match (provider.filter(|p| valid_provider(p)), model) {
            (Some(provider), Some(model)) => match self.prices.get(provider).await {
                Ok(prices) => crate::prices::lookup(&prices, model).copied(),
                Err(e) if needed => return Err(e.into()),
                Err(_) => None,
            },
            _ => None,
        };
        let price = own.or(self.defaults.price);
        if needed && price.is_none() {
            let what = match (provider, model) {
                (Some(p), Some(m)) => format!("model `{m}` of provider `{p}`"),
                (None, Some(m)) => format!("model `{m}` (no provider named)"),
                _ => "a request that names no model".to_string(),
            };
            return Err(AdmitError::PriceUnknown(what));
        }
        Ok(price)
    }

    /// The provider of a key in one of the rosters this process holds, or `None`; never
    /// reads the database. A scan of the held rosters: only upstream 429/401/403 reports
    /// ask.
    pub fn held_provider_of(&self, key_id: &str) -> Option<String> {
        self.rosters.find_held(|roster| {
            roster
                .iter()
                .find(|c| c.id == key_id)
                .map(|c| c.provider.clone())
        })
    }

    pub fn lease_ttl_ms(&self) -> i64 {
        self.defaults.lease_ttl_ms
    }

    /// The lease a lease id names, when this deployment issued it (any replica, any
    /// time, before or after a key rotation); `None` for a forged or altered one.
    pub fn verify_lease(&self, text: &str) -> Option<SignedLease> {
        SignedLease::verify(text, &self.keyring)
    }

    /// The limits of the key's user (the `users` row of `key.user_id`), when it has one:
    /// from the in-process user cache (no database query on a hit; a user without a row
    /// is remembered as such).
    async fn user_limits(&self, key: &ClientKey) -> Result<Option<Arc<UserLimits>>, AdmitError> {
        match key.user_id.as_deref() {
            Some(user_id) => Ok(self.users.get(user_id).await?),
            None => Ok(None),
        }
    }

    /// The key a secret names, after the static checks.
    pub async fn check_key(&self, secret: Option<&str>) -> Result<Arc<ClientKey>, AdmitError> {
        let secret = secret
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(AdmitError::MissingKey)?;
        if !plausible_secret(secret) {
            return Err(AdmitError::InvalidKey);
        }
        let hash = lookup_hash(secret);
        let key = self.cache.get(&hash).await?.ok_or(AdmitError::InvalidKey)?;
        spend_now::remember(&self.hashes, &key.id, hash);
        // Expiry first: the expiry job disables an expired key later, and its answer
        // stays KEY_EXPIRED then.
        if key.is_expired_at(now_ms()) {
            return Err(AdmitError::KeyExpired);
        }
        if !key.is_active {
            return Err(AdmitError::KeyDisabled);
        }
        Ok(key)
    }

    fn estimate(&self, given: Option<i64>) -> Result<i64, AdmitError> {
        match given {
            Some(n) if !(0..=MAX_LIMIT).contains(&n) => Err(AdmitError::BadRequest(format!(
                "estimated_tokens must be a whole number from 0 to {MAX_LIMIT}"
            ))),
            Some(n) => Ok(n),
            None => Ok(self.defaults.tokens),
        }
    }

    /// The provider's active keys, in the order selection tries them; never empty.
    async fn candidates(&self, provider: Option<&str>) -> Result<Arc<Roster>, AdmitError> {
        let provider = names::optional("provider", provider)
            .map_err(|e| AdmitError::BadRequest(e.to_string()))?
            .ok_or_else(|| {
                AdmitError::BadRequest("selecting a provider key needs a provider".into())
            })?;
        if !valid_provider(provider) {
            return Err(AdmitError::BadRequest(
                "provider must be 1 to 64 of A-Z, a-z, 0-9, ., _ and -".into(),
            ));
        }
        let candidates = self.rosters.get(provider).await?;
        if candidates.is_empty() {
            return Err(AdmitError::NoProviderKey(provider.to_string()));
        }
        Ok(candidates)
    }

    /// The provider's active keys when it has any; `None` for no provider, a name that
    /// cannot be a pool's, or a pool without active keys.
    async fn pool_if_any(&self, provider: Option<&str>) -> Result<Option<Arc<Roster>>, AdmitError> {
        let Some(provider) = provider.filter(|p| valid_provider(p)) else {
            return Ok(None);
        };
        let candidates = self.rosters.get(provider).await?;
        Ok((!candidates.is_empty()).then_some(candidates))
    }

    /// The provider's pool after Redis answered that it holds one stamped `newer` than
    /// `used` (this replica missed an invalidation): held or loaded later than that, and
    /// never empty. Reloaded from the database at most once per such meeting; the
    /// requests that meet it together wait for that one load.
    async fn newer_pool(&self, used: &Roster, newer: i64) -> Result<Arc<Roster>, AdmitError> {
        let provider = used.first().map_or("", |c| c.provider.as_str());
        let _one_at_a_time = self.pool_reload.lock().await;
        let held = self.rosters.get(provider).await?;
        let fresh = if held.stamp() > newer {
            held
        } else {
            self.rosters.reload(provider).await?
        };
        if fresh.is_empty() {
            return Err(AdmitError::NoProviderKey(provider.to_string()));
        }
        // Loaded after Redis showed `newer`, so at least as recent as what is there:
        // stamped so, even when this replica's clock is behind the writer's.
        Ok(fresh.stamped_after(newer))
    }

    /// Picks a provider key without a client key (`POST /v1/select`).
    pub async fn select(
        &self,
        provider: Option<&str>,
        estimated_tokens: Option<i64>,
    ) -> Result<Candidate, AdmitError> {
        let tokens = self.estimate(estimated_tokens)?;
        let mut candidates = self.candidates(provider).await?;
        let request = SelectRequest {
            provider: &candidates[0].provider,
            candidates: &candidates,
            tokens,
        };
        let mut pick = self.counters.select(&request).await;
        if let Err(CounterError::PoolOutdated { newer }) = pick {
            // Refused before anything was taken: once more with the newer pool.
            candidates = self.newer_pool(&candidates, newer).await?;
            let request = SelectRequest {
                provider: &candidates[0].provider,
                candidates: &candidates,
                tokens,
            };
            pick = self.counters.select(&request).await;
        }
        match pick? {
            Pick::Picked(i) => {
                crate::metrics::get()
                    .provider_selections
                    .with_label_values(&[&candidates[i].provider])
                    .inc();
                Ok(candidates[i].clone())
            }
            Pick::Exhausted { retry_after_ms } => Err(AdmitError::PoolExhausted {
                provider: candidates[0].provider.clone(),
                retry_after_ms,
            }),
        }
    }

    pub async fn admit(&self, body: &AdmitBody) -> Result<Admitted, AdmitError> {
        self.admit_as(None, body).await
    }

    /// [`Admission::admit`], for the key its caller already has from
    /// [`Admission::check_key`] (`/authz` looks it up before it reads the body), so the
    /// secret is hashed and looked up once; `None` looks up `body.key`.
    pub async fn admit_as(
        &self,
        key: Option<Arc<ClientKey>>,
        body: &AdmitBody,
    ) -> Result<Admitted, AdmitError> {
        let (provider, model, api_format) = (
            given("provider", &body.provider)?,
            given("model", &body.model)?,
            given("api_format", &body.api_format)?,
        );
        let estimate = self.estimate(body.estimated_tokens)?;
        let key = match key {
            Some(key) => key,
            None => self.check_key(body.key.as_deref()).await?,
        };
        if !allows(&key.allowed_providers, provider) {
            return Err(AdmitError::ProviderNotAllowed(
                provider.unwrap_or_default().to_string(),
            ));
        }
        if !allows(&key.allowed_models, model) {
            return Err(AdmitError::ModelNotAllowed(
                model.unwrap_or_default().to_string(),
            ));
        }
        if !allows(&key.allowed_api_formats, api_format) {
            return Err(AdmitError::ApiFormatNotAllowed(
                api_format.unwrap_or_default().to_string(),
            ));
        }
        if let Some(limit) = key.tpm_limit.filter(|l| estimate > *l) {
            return Err(AdmitError::TokensExceedLimit { estimate, limit });
        }
        let user = self.user_limits(&key).await?;
        let quotas = quotas::build(&key, user.as_deref(), model);
        if let Some(StaticRefusal::Tokens(quota)) = quotas::static_refusal(&quotas, estimate, 0) {
            return Err(AdmitError::TokensExceedQuota {
                estimate,
                quota: Box::new(quota),
            });
        }
        let candidates = if body.select {
            Some(self.candidates(provider).await?)
        } else if body.select_if_pooled {
            self.pool_if_any(provider).await?
        } else {
            None
        };

        // On its tenant's shard (its user's, else its own), carried in the signed lease.
        let shard = self
            .counters
            .shard_of(Tenant::of(&key.id, key.user_id.as_deref()));
        let lease = LeaseId::new(&key.id).on_shard(shard);
        let balance = match (key.is_standalone, key.balance_micros) {
            (true, Some(credited)) => Some(BalanceSnapshot {
                credited,
                used: key.balance_used_micros,
                version: key.balance_version,
            }),
            _ => None,
        };
        let price = self
            .price(provider, model, balance.is_some() || quotas.has_spend())
            .await?;
        if (balance.is_some() || quotas.has_spend()) && body.usage_unstated {
            // Its answer is charged its hold, and without a limit the hold is the
            // default estimate's, whatever the answer's length: a balance or a spend
            // limit would then be charged less than the upstream really cost.
            let whose = if balance.is_some() {
                "a prepaid key's"
            } else {
                "a stream under a spend limit: its"
            };
            return Err(AdmitError::BadRequest(format!(
                "{whose} stream must state its usage or its limit: set stream_options.include_usage to true, or max_tokens (in the first 64 KiB of the body: a proxy passes no more, so put them, and stream, before the messages of a long prompt)"
            )));
        }
        let hold_micros = price.map_or(0, |p| hold(&p, body.input_estimate, estimate));
        if let Some(StaticRefusal::Spend(quota)) = quotas::static_refusal(&quotas, 0, hold_micros) {
            return Err(AdmitError::HoldExceedsSpendLimit {
                hold: hold_micros,
                quota: Box::new(quota),
            });
        }
        let request = AdmitRequest {
            lease: &lease,
            rpm: key.rate_limit,
            tpm: key.tpm_limit,
            concurrency: key.concurrent_limit,
            tokens: estimate,
            lease_ttl_ms: self.defaults.lease_ttl_ms,
            provider: provider.unwrap_or_default(),
            model: model.unwrap_or_default(),
            api_format: api_format.unwrap_or_default(),
            balance,
            hold_micros,
            pool: candidates.as_deref(),
            quotas: &quotas.entries,
        };
        let mut fresh = None;
        let decision = match (self.counters.admit(&request).await, request.pool) {
            // Refused with nothing kept (in Redis, what the client's side took is given
            // back under the first lease id, which is then spent): once more with the
            // newer pool, under a new lease id.
            (Err(CounterError::PoolOutdated { newer }), Some(used)) => {
                let pool = self.newer_pool(used, newer).await?;
                let again = LeaseId::new(&key.id).on_shard(shard);
                let retried = AdmitRequest {
                    lease: &again,
                    pool: Some(&pool),
                    ..request.clone()
                };
                let decision = self.counters.admit(&retried).await?;
                fresh = Some((pool, again));
                decision
            }
            (other, _) => other?,
        };
        let (candidates, lease) = match fresh {
            Some((pool, again)) => (Some(pool), again),
            None => (candidates, lease),
        };
        let quotas = quotas.with_uses(&decision.quotas);
        let picked = |i: Option<usize>| {
            let key = candidates.as_ref()?.get(i?)?.clone();
            crate::metrics::get()
                .provider_selections
                .with_label_values(&[&key.provider])
                .inc();
            Some(key)
        };
        match decision.verdict {
            Verdict::Admitted { expires_at_ms } => {
                let provider_key = picked(decision.picked);
                let signed = SignedLease {
                    // Where the pick took its units, for the report (the Redis shape).
                    lease: LeaseId {
                        taken: decision.taken.filter(|_| provider_key.is_some()),
                        // What a light admission's report settles (no record of it).
                        light: decision.light.clone(),
                        // Its pool's tag, for the report (no lookup of the key's provider).
                        pool: provider_key
                            .as_ref()
                            .filter(|_| decision.taken.is_some())
                            .map(|k| k.provider.clone()),
                        ..lease
                    },
                    provider_key_id: provider_key.as_ref().map(|k| k.id.clone()),
                    expires_at_ms,
                    hold_micros,
                    price,
                };
                Ok(Admitted {
                    lease_id: signed.encode(&self.keyring),
                    lease: signed.lease,
                    key,
                    expires_at_ms,
                    usage: decision.usage,
                    provider_key,
                    degraded: decision.degraded,
                    quotas,
                })
            }
            Verdict::Denied {
                reason,
                retry_after_ms,
            } => Err(AdmitError::Limited {
                reason,
                retry_after_ms,
                key,
                usage: decision.usage,
                quotas: quotas.into(),
            }),
        }
    }
}
