//! Leases that prove themselves.
//!
//! A lease id is the only thing a report or a renewal needs, so it must not be
//! forgeable: whoever can make up a lease id could charge any key, or cool down any
//! provider key, from anywhere on the pod network. A lease id therefore carries what it
//! authorizes, signed:
//!
//! ```text
//! <client key id>.<32 hex: lease token>.<provider key id, or ->.<expiry, Unix ms>
//!     .<hold, micro-USD>.<price: input-output-cached input-cache write, micro-USD per
//!      million tokens, or ->[.<tenant shard>[.<pick second>-<pick tokens>[-<provider>]]]
//!     .<32 hex: MAC>
//! ```
//!
//! The tenant shard (the Redis shape only: `KeySpace`) is where the admission counted
//! the request, so its report, renewal or release goes there even if the key's user
//! changed since. Lease ids without it (the release before, or the embedded shape) use
//! the key's current shard. With a pick, the second whose bucket took the provider key's
//! units and the tokens reserved there follow (`limits::PickTaken`), then the provider
//! whose pool it picked from: the pick is its own step in Redis, and its report settles
//! them under that pool's tag, found without a lookup on any replica. (Lease ids of the
//! release before, without the provider, still verify.)
//!
//! The hold and the price are the admission's: a report charges the tokens it names at
//! the price the request was admitted at, and an answer whose usage cannot be read its
//! hold, on any replica and after the lease expired, without a lookup. (Lease ids of the
//! release before, without hold and price, still verify, as holding nothing unpriced.)
//!
//! The MAC is HMAC-SHA256 (truncated to 128 bits) of everything before it, under a key
//! derived from the encryption keyring ([`Keyring::sign_lease`]). Every replica holds the
//! same keyring, so any replica verifies any lease, after it expired too; after a key
//! rotation, leases signed with the old key verify while it is among
//! `KEYWARD_ENCRYPTION_KEYS_PREVIOUS`.
//!
//! Invariants:
//! - A text that does not verify yields nothing: no field of an unverified lease is
//!   ever used.
//! - Counters, duplicate guards and usage records are keyed by the inner [`LeaseId`]
//!   (`<key id>.<token>`), which one admission fixes, so a lease has one identity
//!   whatever key signed it.
//! - The expiry is the one the admission set; a renewal does not change the lease id.

use crate::crypto::{Keyring, LEASE_MAC_LEN};
use crate::limits::{LeaseId, PickTaken};
use crate::prices::Price;

/// Longer texts are refused before any parsing or MAC (a real one is at most 337
/// characters: 153 without hold and price, 13 digits for each amount, 5 for the shard,
/// 37 for the pick, 65 for its provider).
const MAX_LEN: usize = 353;

/// A lease id whose signature verified, or that this process just issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedLease {
    pub lease: LeaseId,
    /// The provider key picked in the same step, if any: the only one a report of this
    /// lease may cool down or suspend.
    pub provider_key_id: Option<String>,
    /// When the lease lapses unless renewed (the admission's expiry).
    pub expires_at_ms: i64,
    /// The micro-USD the admission held on the key's balance: what an answer whose usage
    /// cannot be read is charged.
    pub hold_micros: i64,
    /// The price the request was admitted at; `None` when its model had none.
    pub price: Option<Price>,
}

fn encode_price(out: &mut String, price: Option<&Price>) {
    use std::fmt::Write;
    match price {
        None => out.push('-'),
        Some(p) => {
            let _ = write!(
                out,
                "{}-{}-{}-{}",
                p.input,
                p.output,
                p.cached_input(),
                p.cache_write()
            );
        }
    }
}

/// The amounts this code writes: digits only, no sign, no leading zero, within
/// `0..=max`.
fn amount(text: &str, max: i64) -> Option<i64> {
    let canonical = !text.is_empty()
        && text.len() <= 19
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical
        .then(|| text.parse().ok())
        .flatten()
        .filter(|n| (0..=max).contains(n))
}

fn decode_price(text: &str) -> Option<Option<Price>> {
    if text == "-" {
        return Some(None);
    }
    let max = crate::prices::MAX_PRICE_MICROS;
    let mut parts = text.split('-').map(|p| amount(p, max));
    let price = Price {
        input: parts.next()??,
        output: parts.next()??,
        cached_input: Some(parts.next()??),
        cache_write: Some(parts.next()??),
    };
    parts.next().is_none().then_some(Some(price))
}

/// `<second>-<tokens>[-<provider>]`: where a pick took its units, and from whose pool.
fn decode_taken(text: &str) -> Option<(PickTaken, Option<String>)> {
    let (second, rest) = text.split_once('-')?;
    let (tokens, pool) = match rest.split_once('-') {
        Some((tokens, pool)) => (tokens, Some(pool)),
        None => (rest, None),
    };
    let taken = PickTaken {
        second: amount(second, i64::MAX)?,
        tokens: amount(tokens, crate::money::MAX_TOTAL)?,
    };
    match pool {
        Some(p) if !crate::pool::valid_provider(p) => None,
        pool => Some((taken, pool.map(str::to_string))),
    }
}

impl SignedLease {
    /// The lease id handed to the caller.
    pub fn encode(&self, keyring: &Keyring) -> String {
        use std::fmt::Write;
        // One buffer for the whole text, the MAC appended in place (this runs on every
        // admission: no intermediate strings).
        let mut text = String::with_capacity(MAX_LEN);
        text.push_str(&self.lease.key_id);
        text.push('.');
        text.push_str(&self.lease.token);
        text.push('.');
        text.push_str(self.provider_key_id.as_deref().unwrap_or("-"));
        let _ = write!(text, ".{}.{}.", self.expires_at_ms, self.hold_micros);
        encode_price(&mut text, self.price.as_ref());
        if let Some(shard) = self.lease.shard {
            let _ = write!(text, ".{shard}");
            if let Some(t) = self.lease.taken {
                let _ = write!(text, ".{}-{}", t.second, t.tokens);
                if let Some(pool) = &self.lease.pool {
                    text.push('-');
                    text.push_str(pool);
                }
            }
        }
        let mac = keyring.sign_lease(&text);
        let mut hex = [0u8; 2 * LEASE_MAC_LEN];
        if hex::encode_to_slice(mac, &mut hex).is_ok() {
            text.push('.');
            text.push_str(std::str::from_utf8(&hex).unwrap_or_default());
        }
        text
    }

    /// The lease a text names, if keyring's keys signed exactly that text.
    pub fn verify(text: &str, keyring: &Keyring) -> Option<SignedLease> {
        if text.len() > MAX_LEN {
            return None;
        }
        let (body, mac) = text.rsplit_once('.')?;
        // Exactly the lowercase hex this code writes: one spelling per lease id.
        if mac.len() != 2 * LEASE_MAC_LEN
            || !mac.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        let mac = hex::decode(mac).ok()?;
        if !keyring.verify_lease(body, &mac) {
            return None;
        }
        // Only texts this code wrote verify; parsing stays strict anyway. The pick's
        // provider, last, may hold dots: the 8th part is the rest.
        let parts: Vec<&str> = body.splitn(8, '.').collect();
        let max_shard = i64::from(crate::limits::scripts::MAX_SHARDS) - 1;
        let (hold_micros, price, shard, taken) = match parts[..] {
            [_, _, _, _] => (0, None, None, None),
            [_, _, _, _, hold, price] => (
                amount(hold, crate::money::MAX_REPORT_MICROS)?,
                decode_price(price)?,
                None,
                None,
            ),
            [_, _, _, _, hold, price, shard] => (
                amount(hold, crate::money::MAX_REPORT_MICROS)?,
                decode_price(price)?,
                Some(amount(shard, max_shard)? as u16),
                None,
            ),
            [_, _, _, _, hold, price, shard, taken] => (
                amount(hold, crate::money::MAX_REPORT_MICROS)?,
                decode_price(price)?,
                Some(amount(shard, max_shard)? as u16),
                Some(decode_taken(taken)?),
            ),
            _ => return None,
        };
        let mut lease = LeaseId::parse(&format!("{}.{}", parts[0], parts[1]))?.on_shard(shard);
        (lease.taken, lease.pool) = taken.map_or((None, None), |(t, pool)| (Some(t), pool));
        let provider_key_id = match parts[2] {
            "-" => None,
            id => Some(uuid::Uuid::try_parse(id).ok()?.hyphenated().to_string()),
        };
        Some(SignedLease {
            lease,
            provider_key_id,
            expires_at_ms: parts[3].parse().ok()?,
            hold_micros,
            price,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "6f1c2f7e-3a55-4c2e-9a55-2f0d5c1e9b10";
    const PK: &str = "0b5e8a3c-1d2f-4e6a-8b9c-0d1e2f3a4b5c";

    fn lease(pk: Option<&str>) -> SignedLease {
        SignedLease {
            lease: LeaseId::new(KEY),
            provider_key_id: pk.map(str::to_string),
            expires_at_ms: 1_790_000_000_000,
            hold_micros: 0,
            price: None,
        }
    }

    /// The longest lease there is: every amount at its bound.
    fn priced(pk: Option<&str>) -> SignedLease {
        let max = crate::prices::MAX_PRICE_MICROS;
        SignedLease {
            hold_micros: crate::money::MAX_REPORT_MICROS,
            price: Some(Price {
                input: max,
                output: max - 1,
                cached_input: Some(7),
                cache_write: Some(0),
            }),
            ..lease(pk)
        }
    }

    #[test]
    fn issued_leases_verify_on_any_holder_of_the_keyring() {
        let ring = Keyring::new(&[1; 32], &[]);
        let replica = Keyring::new(&[1; 32], &[]);
        let sharded = |l: SignedLease, shard| SignedLease {
            lease: l.lease.clone().on_shard(Some(shard)),
            ..l
        };
        let mut picked = sharded(priced(Some(PK)), 1023);
        picked.lease.taken = Some(PickTaken {
            second: 1_790_000_000,
            tokens: crate::money::MAX_TOTAL,
        });
        // The longest provider name, with the dots and dashes it may hold.
        let mut pooled = picked.clone();
        pooled.lease.pool = Some(format!("a.b-c_{}", "x".repeat(58)));
        for l in [
            pooled,
            lease(None),
            lease(Some(PK)),
            priced(None),
            priced(Some(PK)),
            sharded(priced(Some(PK)), 1023),
            sharded(lease(None), 0),
            picked,
        ] {
            let text = l.encode(&ring);
            assert!(text.len() <= MAX_LEN, "{}", text.len());
            assert_eq!(SignedLease::verify(&text, &replica), Some(l));
        }
    }

    #[test]
    fn forged_and_altered_leases_do_not_verify() {
        let ring = Keyring::new(&[1; 32], &[]);
        let mut l = priced(Some(PK));
        l.lease.shard = Some(7);
        let text = l.encode(&ring);
        // Every single-character change, anywhere.
        for i in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(bytes).unwrap_or_default();
            if altered != text {
                assert_eq!(SignedLease::verify(&altered, &ring), None, "{altered}");
            }
        }
        // The same MAC in upper case: one spelling per lease.
        let (body, mac) = text.rsplit_once('.').unwrap_or_default();
        let upper = format!("{body}.{}", mac.to_uppercase());
        assert_eq!(SignedLease::verify(&upper, &ring), None);
        // A real key id with random bytes, the old unsigned format, another keyring's
        // signature, and garbage.
        let unsigned = LeaseId::new(KEY).to_string();
        let other = lease(Some(PK)).encode(&Keyring::new(&[2; 32], &[]));
        let long = format!("{text}{}", "0".repeat(200));
        for bad in [
            unsigned.as_str(),
            other.as_str(),
            long.as_str(),
            "",
            ".",
            "....",
        ] {
            assert_eq!(SignedLease::verify(bad, &ring), None, "{bad}");
        }
    }

    #[test]
    fn leases_of_the_release_before_verify_without_hold_or_price() {
        let ring = Keyring::new(&[1; 32], &[]);
        let l = lease(Some(PK));
        let body = format!("{}.{PK}.{}", l.lease, l.expires_at_ms);
        let text = format!("{body}.{}", hex::encode(ring.sign_lease(&body)));
        assert_eq!(SignedLease::verify(&text, &ring), Some(l));
    }

    #[test]
    fn only_canonical_amounts_verify() {
        let ring = Keyring::new(&[1; 32], &[]);
        let l = lease(None);
        let max = crate::prices::MAX_PRICE_MICROS;
        for (hold, price) in [
            ("01", "-".to_string()),
            ("+1", "-".to_string()),
            ("", "-".to_string()),
            ("1000000000001", "-".to_string()),
            ("0", "1-2-3".to_string()),
            ("0", "1-2-3-4-5".to_string()),
            ("0", format!("{}-0-0-0", max + 1)),
            ("0", "1--2-3".to_string()),
        ] {
            let body = format!("{}.-.{}.{hold}.{price}", l.lease, l.expires_at_ms);
            let text = format!("{body}.{}", hex::encode(ring.sign_lease(&body)));
            assert_eq!(SignedLease::verify(&text, &ring), None, "{text}");
        }
    }

    #[test]
    fn a_picks_provider_verifies_only_as_a_provider_name() {
        let ring = Keyring::new(&[1; 32], &[]);
        let l = lease(Some(PK));
        for (pool, ok) in [
            ("openai", true),
            ("eu.openai-2", true),
            ("", false),
            ("bad name", false),
            ("a/b", false),
        ] {
            let body = format!("{}.{PK}.{}.0.-.3.17-5-{pool}", l.lease, l.expires_at_ms);
            let text = format!("{body}.{}", hex::encode(ring.sign_lease(&body)));
            let got = SignedLease::verify(&text, &ring).map(|v| v.lease.pool);
            assert_eq!(got, ok.then(|| Some(pool.to_string())), "{text}");
        }
    }

    #[test]
    fn shards_verify_only_in_range_and_canonical() {
        let ring = Keyring::new(&[1; 32], &[]);
        let l = lease(None);
        for (shard, ok) in [
            ("0", true),
            ("1023", true),
            ("1024", false),
            ("07", false),
            ("-", false),
            ("", false),
        ] {
            let body = format!("{}.-.{}.0.-.{shard}", l.lease, l.expires_at_ms);
            let text = format!("{body}.{}", hex::encode(ring.sign_lease(&body)));
            let got = SignedLease::verify(&text, &ring).map(|v| v.lease.shard);
            assert_eq!(got.is_some(), ok, "{text}");
        }
    }

    #[test]
    fn a_rotation_keeps_old_leases_valid_while_the_old_key_is_kept() {
        let before = Keyring::new(&[1; 32], &[]);
        let text = lease(None).encode(&before);
        let after = Keyring::new(&[2; 32], &[[1; 32]]);
        assert!(SignedLease::verify(&text, &after).is_some());
        let forgotten = Keyring::new(&[2; 32], &[]);
        assert!(SignedLease::verify(&text, &forgotten).is_none());
    }
}
