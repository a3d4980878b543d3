//! Settling a finished request: the report path's domain home, beside
//! [`crate::admission`] (which opens what this closes).
//!
//! A report reaches [`Reports::settle`] after its proof was checked by the HTTP layer
//! (a lease this deployment signed, or the data-plane token). From there:
//!
//! 1. the lease binds the report: it charges the lease's key, and an upstream status acts
//!    only on the provider key picked for that lease ([`ReportError::NotTheLeasePick`]
//!    otherwise);
//! 2. the body is validated ([`body::ReportBody::validate`]) into a [`Report`], with the
//!    [`body::ProviderKeyPolicy`] deciding what a 429 or 401/403 does to the provider key;
//! 3. the charging rules fill in the cost ([`Reports::settle`] lists them);
//! 4. the counter store settles the lease and queues the usage record for accounting in
//!    one atomic step ([`Counters::report`]); the embedded shape refuses first when its
//!    accounting writer cannot write, so nothing is acknowledged that cannot be stored.
//!    The report carries the spend entries its key counts under now
//!    ([`Admission::spend_now`]): when the lease's data is gone (a report accepted after
//!    its lease was purged), its cost is added to those counters instead of the lease's.
//!
//! - [`body`]: `POST /v1/report`'s body and its validation.
//! - [`upstream`]: the proxies' report (`POST /v1/report/upstream`), read into the same
//!   body.

pub mod body;
pub mod upstream;

use std::sync::Arc;

use crate::accounting::embedded::{WriterFailing, WriterHealth};
use crate::admission::Admission;
use crate::lease::SignedLease;
use crate::limits::{CounterError, Counters, Report, Reported};
use crate::prices::{self, Prices};
use crate::provider_keys::{ProviderKeyError, ProviderKeys};
use crate::usage::parse::Usage;
use crate::usage::UsageSource;
use body::{ProviderKeyPolicy, ReportBody};

/// Statuses without usage after which the upstream may still have worked on the request:
/// nginx's 499 (the client closed the connection before the answer) and 504 (the proxy
/// gave up waiting while the upstream went on). They are charged the hold, like a
/// success whose usage could not be read.
const MAY_HAVE_WORKED: [i64; 2] = [499, 504];

/// How a report that was accepted ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Recorded,
    /// The lease was already reported: nothing changed.
    Duplicate,
}

/// Why a report was not settled.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The body is malformed or out of bounds; the message says what.
    #[error("{0}")]
    Invalid(String),
    /// A lease's report named another provider key than the one picked for the lease.
    #[error("provider_key_id is not the provider key picked for this lease")]
    NotTheLeasePick,
    /// The lease expired longer ago than the duplicate guard lasts: nothing changed.
    #[error("the lease expired longer ago than KEYWARD_REPORT_DEDUPE_TTL_S: a repeat could no longer be told apart, so nothing was recorded")]
    TooLate,
    #[error(transparent)]
    Counters(#[from] CounterError),
    #[error(transparent)]
    Accounting(#[from] WriterFailing),
}

/// The report operations; cheap to clone.
#[derive(Clone)]
pub struct Reports {
    admission: Arc<Admission>,
    provider_keys: ProviderKeys,
    prices: Prices,
    counters: Counters,
    /// Whether the in-process accounting writer can write.
    accounting: WriterHealth,
    policy: ProviderKeyPolicy,
}

impl Reports {
    pub fn new(
        admission: Arc<Admission>,
        provider_keys: ProviderKeys,
        prices: Prices,
        counters: Counters,
        accounting: WriterHealth,
        policy: ProviderKeyPolicy,
    ) -> Self {
        Self {
            admission,
            provider_keys,
            prices,
            counters,
            accounting,
            policy,
        }
    }

    /// Settles a report whose proof was checked: `lease` is the lease it names, `None`
    /// for one with the data-plane token. `origin` says where its tokens come from (the
    /// caller, or keyward's reading of the upstream's answer).
    ///
    /// What the request is charged (the books match what happened):
    /// - an explicit `cost_usd`: that;
    /// - tokens: their cost at the price the lease was admitted at (signed into it), else
    ///   at the report's model's price now (`Reports::priced_cost`);
    /// - no usage and an upstream status that is not 2xx: nothing (the upstream served
    ///   nothing), but for `MAY_HAVE_WORKED` (499, 504);
    /// - no usage otherwise (a successful answer whose usage could not be read): the
    ///   lease's hold, marked `estimated`, never zero.
    pub async fn settle(
        &self,
        mut body: ReportBody,
        lease: Option<SignedLease>,
        origin: UsageSource,
    ) -> Result<Settled, ReportError> {
        if let Some(lease) = &lease {
            let named = body
                .provider_key_id
                .as_deref()
                .map(|id| uuid::Uuid::try_parse(id).map(|u| u.hyphenated().to_string()));
            if named.is_some_and(|named| named.ok() != lease.provider_key_id) {
                return Err(ReportError::NotTheLeasePick);
            }
            body.provider_key_id.clone_from(&lease.provider_key_id);
        }
        let explicit_cost = body.cost_usd.is_some();
        let (price, hold) = lease
            .as_ref()
            .map_or((None, None), |l| (l.price, Some(l.hold_micros)));
        // The pick's provider, signed into the lease: no lookup.
        let carried = lease.as_ref().and_then(|l| l.lease.pool.clone());
        let mut report = body
            .validate(self.policy, lease)
            .map_err(ReportError::Invalid)?;
        report.usage_source = origin;
        // The provider key's provider: the pool's keys are under its hash tag, and it
        // names the price list. Looked up only when the lease does not carry it (a
        // report without a lease, or a lease of the release before).
        let provider = match (carried, report.provider_key_id.as_deref()) {
            (Some(provider), _) => Ok(Some(provider)),
            (None, Some(id)) => self.provider_of(id).await,
            (None, None) => Ok(None),
        };
        // An upstream's refusal spent nothing (but see [`MAY_HAVE_WORKED`]).
        let failed = report
            .upstream_status
            .is_some_and(|s| !(200..300).contains(&s) && !MAY_HAVE_WORKED.contains(&s));
        match (explicit_cost, report.tokens, price, hold) {
            (true, _, _, _) => {}
            (false, Some(_), Some(price), _) => {
                report.cost_micros = prices::cost_micros(&price, &usage_of(&report))
                    .map_err(|e| ReportError::Invalid(e.to_string()))?;
            }
            (false, Some(_), None, _) => {
                report.cost_micros = self.priced_cost(&report, &provider).await?;
            }
            (false, None, _, Some(hold)) if !failed => {
                report.cost_micros = hold;
                report.usage_source = UsageSource::Estimated;
            }
            (false, None, _, _) => {}
        }
        let event = if report.cooldown_ms > 0 {
            Some("cooldown")
        } else if report.suspend_ms > 0 {
            Some("suspension")
        } else if report.learned_cooldown_ms() > 0 {
            Some("learned_cooldown")
        } else {
            None
        };
        report.provider = provider.ok().flatten();
        if let Counters::Memory(_) = self.counters {
            // The in-process queue is only as good as its writer: refuse before anything
            // changes rather than acknowledge a report that cannot be stored.
            self.accounting.check()?;
        }
        if let Some(lease) = report.lease.take() {
            report.lease = Some(self.admission.on_its_shard(lease).await);
        }
        if let Some(lease) = &report.lease {
            // Used only if the lease's data is gone (a late report): see `Report::spend_now`.
            report.spend_now = self
                .admission
                .spend_now(&lease.key_id, report.model.as_deref())
                .await;
        }
        let outcome = self.counters.report(&report).await?;
        let m = crate::metrics::get();
        match outcome {
            Reported::Recorded => {
                m.reports.with_label_values(&["recorded"]).inc();
                if let Some(event) = event.filter(|_| report.provider_key_id.is_some()) {
                    let provider = report.provider.as_deref().unwrap_or("unknown");
                    m.provider_key_events
                        .with_label_values(&[provider, event])
                        .inc();
                }
                Ok(Settled::Recorded)
            }
            Reported::Duplicate => {
                m.reports.with_label_values(&["duplicate"]).inc();
                Ok(Settled::Duplicate)
            }
            Reported::TooLate => {
                m.reports.with_label_values(&["too_late"]).inc();
                Err(ReportError::TooLate)
            }
        }
    }

    /// The provider of a provider key the lease does not carry: from the rosters this
    /// process holds, else from the database (a key it never loaded); `None` for a key
    /// that does not exist.
    async fn provider_of(&self, key_id: &str) -> Result<Option<String>, ProviderKeyError> {
        if let Some(provider) = self.admission.held_provider_of(key_id) {
            return Ok(Some(provider));
        }
        match self.provider_keys.get(key_id).await {
            Ok(key) => Ok(Some(key.provider)),
            Err(ProviderKeyError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What a report's tokens cost at its model's price (see [`crate::prices`]), for a
    /// report without `cost_usd`: it needs tokens, a `model`, and the provider key that
    /// served the request (the lease's, or `provider_key_id`), whose provider (`provider`,
    /// found by the caller) names the price list. Without any of these, or without a
    /// price, the cost is 0, as before prices existed.
    ///
    /// A report must settle (release its slot, settle its tokens) while the database is
    /// away, like every other report: prices held in memory are used then (the cache
    /// serves them past their TTL), and a price that cannot be loaded leaves the cost at
    /// 0 with a warning, rather than refusing the report.
    async fn priced_cost(
        &self,
        report: &Report,
        provider: &Result<Option<String>, ProviderKeyError>,
    ) -> Result<i64, ReportError> {
        let (Some(_), Some(model)) = (report.tokens, report.model.as_deref()) else {
            return Ok(0);
        };
        let provider = match provider {
            Ok(Some(provider)) => provider,
            Ok(None) => return Ok(0),
            Err(e) => return Ok(unpriced(e)),
        };
        let price = match self.prices.price_of(provider, model).await {
            Ok(Some(price)) => price,
            Ok(None) => return Ok(0),
            Err(e) => return Ok(unpriced(&e)),
        };
        prices::cost_micros(&price, &usage_of(report))
            .map_err(|e| ReportError::Invalid(e.to_string()))
    }
}

/// A report's tokens as the price list counts them.
fn usage_of(report: &Report) -> Usage {
    let (input_tokens, output_tokens) = report.tokens.unwrap_or((0, 0));
    Usage {
        input_tokens,
        cached_input_tokens: report.token_classes.cached,
        cache_write_tokens: report.token_classes.cache_write,
        output_tokens,
        reasoning_tokens: report.token_classes.reasoning,
    }
}

/// The cost of a report whose price could not be loaded: 0, logged at most once a
/// second (an outage would otherwise log every report).
fn unpriced(error: &dyn std::error::Error) -> i64 {
    static LOG: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
    if LOG.ready().is_some() {
        tracing::warn!(error = %error, "cannot load a price for a report's tokens; recorded with cost 0");
    }
    0
}
