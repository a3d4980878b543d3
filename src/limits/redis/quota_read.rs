//! The live figures of quota counters (`lua/quota_read.lua`, one round trip), for the
//! admin quota views.

use super::RedisCounters;
use crate::limits::live::{LiveCounter, LiveFigures};
use crate::limits::scripts::quota_read::{parse, QuotaReadArgs, QuotaReadEntryArgs, QuotaReadKey};
use crate::limits::{CounterError, Tenant};

impl RedisCounters {
    /// Reads `counters` (no fallback to the outage twin: its figures are not Redis's;
    /// while the breaker is open this fails at once).
    /// `tenant`'s shard holds them all.
    pub async fn read_quotas(
        &self,
        tenant: Tenant<'_>,
        counters: &[LiveCounter],
    ) -> Result<LiveFigures, CounterError> {
        self.guarded(self.read_quotas_redis(self.space.shard_of(tenant), counters))
            .await
    }

    async fn read_quotas_redis(
        &self,
        shard: u16,
        counters: &[LiveCounter],
    ) -> Result<LiveFigures, CounterError> {
        let mut call = self.scripts.quota_read.prepare_invoke();
        for counter in counters {
            QuotaReadKey::new(&self.space, shard, counter).push(&mut call);
        }
        let clock = self.shift.script_clock();
        QuotaReadArgs {
            time_shift_ms: clock.shift_ms,
            now_ms: clock.pinned_ms,
        }
        .push(&mut call);
        for counter in counters {
            QuotaReadEntryArgs::new(counter).push(&mut call);
        }
        let reply: Vec<redis::Value> = self.lanes.invoke("quota_read", &call).await?;
        parse(&reply, counters.len())
    }
}
