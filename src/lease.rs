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
//!      million tokens, or ->[.<tenant shard>[.<pick second>-<pick tokens>[-<hex of the
//!      pick's provider>]]].<32 hex: MAC>
//! ```
//!
//! or, for a light admission (no lease record in the store, `limits::LightLease`):
//!
//! ```text
//! <... price>.<tenant shard, or ->.<pick second>-<pick tokens, or ->
//!     .<second>-<client tokens reserved, or n>-<hex of provider|model|api_format>.<MAC>
//! ```
//!
//! A light lease carries what its report settles, since nothing in the store does: the
//! second of its admission, the tokens its key's token window took then (`n`: the key
//! had no TPM limit) and its names, hex-encoded so they hold no `.` (at most
//! [`LIGHT_META_MAX`] bytes, so at most twice that in hex: longer names keep a record).
//!
//! The tenant shard (the Redis shape only: `KeySpace`) is where the admission counted
//! the request, so its report, renewal or release goes there even if the key's user
//! changed since. Lease ids without it (the release before, or the embedded shape) use
//! the key's current shard. With a pick, the second whose bucket took the provider key's
//! units and the tokens reserved there follow (`limits::PickTaken`), then the provider
//! whose pool it picked from (hex-encoded: a provider name may hold dots; a light lease's
//! names carry it already): the pick is its own step in Redis, and its report settles
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
//!
//! (Over 400 lines: about half are its tests, one per way a text may fail to verify.)

use crate::crypto::{hex_push, Keyring, LEASE_MAC_LEN};
use crate::limits::{LeaseId, LightLease, PickTaken, LIGHT_META_MAX};
use crate::prices::Price;

/// Longer texts are refused before any parsing or MAC (a real one is at most 401
/// characters, 153 without hold and price, 13 digits for each amount, 5 for the shard,
/// 37 for the pick, 129 for its provider in hex; a light one, whose names hold the
/// provider, at most 502: 272 and 38 for its second and tokens, twice [`LIGHT_META_MAX`]
/// for its names).
const MAX_LEN: usize = 512;

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

/// `<second>-<tokens>[-<hex provider>]`: where a pick took its units, and from whose
/// pool.
fn decode_taken(text: &str) -> Option<(PickTaken, Option<String>)> {
    let mut parts = text.splitn(3, '-');
    let taken = PickTaken {
        second: amount(parts.next()?, i64::MAX)?,
        tokens: amount(parts.next()?, crate::money::MAX_TOTAL)?,
    };
    let pool = match parts.next() {
        None => None,
        // Exactly the lowercase hex this code writes, of a provider name.
        Some(hex) => {
            if hex.len() > 128 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return None;
            }
            let name = String::from_utf8(hex::decode(hex).ok()?).ok()?;
            if !crate::pool::valid_provider(&name) {
                return None;
            }
            Some(name)
        }
    };
    Some((taken, pool))
}

/// `<second>-<tokens, or n>-<hex names>`: a light lease's data (its expiry is the
/// lease's own).
fn encode_light(out: &mut String, light: &LightLease) {
    use std::fmt::Write;
    let _ = write!(out, ".{}-", light.second);
    match light.kt {
        Some(kt) => {
            let _ = write!(out, "{kt}-");
        }
        None => out.push_str("n-"),
    }
    hex_push(out, light.meta.as_bytes());
}

fn decode_light(text: &str, expires_at_ms: i64) -> Option<LightLease> {
    let mut parts = text.splitn(3, '-');
    let second = amount(parts.next()?, i64::MAX)?;
    let kt = match parts.next()? {
        "n" => None,
        kt => Some(amount(kt, crate::money::MAX_TOTAL)?),
    };
    let names = parts.next()?;
    // Exactly the lowercase hex this code writes, within the bound, of three names.
    if names.len() > 2 * LIGHT_META_MAX
        || !names
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let meta = String::from_utf8(hex::decode(names).ok()?).ok()?;
    (meta.split('|').count() == 3).then_some(LightLease {
        second,
        kt,
        meta,
        expires_at_ms,
    })
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
        if let Some(light) = &self.lease.light {
            // Every field, placeholders for the shard and the pick when absent (the
            // embedded shape has no shard, and its report settles the pick from here).
            match self.lease.shard {
                Some(shard) => {
                    let _ = write!(text, ".{shard}");
                }
                None => text.push_str(".-"),
            }
            match self.lease.taken {
                Some(t) => {
                    let _ = write!(text, ".{}-{}", t.second, t.tokens);
                }
                None => text.push_str(".-"),
            }
            encode_light(&mut text, light);
        } else if let Some(shard) = self.lease.shard {
            let _ = write!(text, ".{shard}");
            if let Some(t) = self.lease.taken {
                let _ = write!(text, ".{}-{}", t.second, t.tokens);
                if let Some(pool) = &self.lease.pool {
                    text.push('-');
                    hex_push(&mut text, pool.as_bytes());
                }
            }
        }
        let mac = keyring.sign_lease(&text);
        text.push('.');
        hex_push(&mut text, &mac);
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
        // Only texts this code wrote verify; parsing stays strict anyway.
        let parts: Vec<&str> = body.split('.').collect();
        let max_shard = i64::from(crate::limits::scripts::MAX_SHARDS) - 1;
        let expires_at_ms: i64 = parts.get(3)?.parse().ok()?;
        let mut light = None;
        let (hold_micros, price, shard, taken) = match parts[..] {
            [_, _, _, _] => (0, None, None, None),
            [_, _, _, _, hold, price, shard, taken, data] => {
                light = Some(decode_light(data, expires_at_ms)?);
                (
                    amount(hold, crate::money::MAX_REPORT_MICROS)?,
                    decode_price(price)?,
                    match shard {
                        "-" => None,
                        shard => Some(amount(shard, max_shard)? as u16),
                    },
                    match taken {
                        "-" => None,
                        // Its provider is in its names, not here.
                        taken => match decode_taken(taken)? {
                            (taken, None) => Some((taken, None)),
                            (_, Some(_)) => return None,
                        },
                    },
                )
            }
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
        if let (Some(_), Some(light)) = (lease.taken, &light) {
            // A light lease's pick is from the pool of the provider its names start with.
            lease.pool = light
                .meta
                .split('|')
                .next()
                .filter(|p| crate::pool::valid_provider(p))
                .map(str::to_string);
        }
        lease.light = light;
        let provider_key_id = match parts[2] {
            "-" => None,
            id => Some(uuid::Uuid::try_parse(id).ok()?.hyphenated().to_string()),
        };
        Some(SignedLease {
            lease,
            provider_key_id,
            expires_at_ms,
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
        let light = |l: SignedLease, kt, meta: &str| SignedLease {
            lease: LeaseId {
                light: Some(LightLease {
                    second: i64::MAX,
                    kt,
                    meta: meta.to_string(),
                    expires_at_ms: l.expires_at_ms,
                }),
                ..l.lease.clone()
            },
            ..l
        };
        // The longest: every field at its bound, names of LIGHT_META_MAX bytes.
        let longest_names = format!("{}|{}|", "p".repeat(LIGHT_META_MAX - 4), "é");
        assert_eq!(longest_names.len(), LIGHT_META_MAX);
        let mut embedded_pick = priced(Some(PK));
        embedded_pick.lease.taken = picked.lease.taken;
        // The longest provider name, with the dots and dashes it may hold.
        let mut pooled = picked.clone();
        pooled.lease.pool = Some(format!("a.b-c_{}", "x".repeat(58)));
        // A light lease's pick: its pool is the provider its names start with.
        let mut light_pooled = light(picked.clone(), Some(3), "eu.openai-2|gpt-4o|openai");
        light_pooled.lease.pool = Some("eu.openai-2".into());
        for l in [
            pooled,
            light_pooled,
            lease(None),
            lease(Some(PK)),
            priced(None),
            priced(Some(PK)),
            sharded(priced(Some(PK)), 1023),
            sharded(lease(None), 0),
            picked.clone(),
            light(
                picked.clone(),
                Some(crate::money::MAX_TOTAL),
                &longest_names,
            ),
            light(lease(None), None, "openai|gpt-4.1|openai.chat"),
            light(embedded_pick, Some(0), "||"),
            light(sharded(lease(None), 3), None, "a|b.c|d"),
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
        // A light one too: its tokens and names are signed like the rest.
        let mut light = l.clone();
        light.lease.light = Some(LightLease {
            second: 1_790_000_000,
            kt: Some(100),
            meta: "openai|gpt-4o|chat".into(),
            expires_at_ms: l.expires_at_ms,
        });
        // Every single-character change, anywhere.
        for text in [text.clone(), light.encode(&ring)] {
            for i in 0..text.len() {
                let mut bytes = text.clone().into_bytes();
                bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
                let altered = String::from_utf8(bytes).unwrap_or_default();
                if altered != text {
                    assert_eq!(SignedLease::verify(&altered, &ring), None, "{altered}");
                }
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
    fn a_picks_provider_verifies_only_as_a_provider_name_in_lowercase_hex() {
        let ring = Keyring::new(&[1; 32], &[]);
        let l = lease(Some(PK));
        let hex = |p: &str| hex::encode(p.as_bytes());
        for (pool, ok) in [
            (hex("openai"), Some("openai")),
            (hex("eu.openai-2"), Some("eu.openai-2")),
            (String::new(), None),
            (hex("bad name"), None),
            (hex("a/b"), None),
            (hex(&"x".repeat(65)), None),
            (hex("openai").to_uppercase(), None),
            ("openai".to_string(), None),
        ] {
            let body = format!("{}.{PK}.{}.0.-.3.17-5-{pool}", l.lease, l.expires_at_ms);
            let text = format!("{body}.{}", hex::encode(ring.sign_lease(&body)));
            let got = SignedLease::verify(&text, &ring).map(|v| v.lease.pool);
            assert_eq!(got, ok.map(|p| Some(p.to_string())), "{text}");
        }
    }

    #[test]
    fn light_data_verifies_only_as_this_code_writes_it() {
        let ring = Keyring::new(&[1; 32], &[]);
        let l = lease(None);
        let names = hex::encode("a|b|c");
        for (light, ok) in [
            (format!("5-7-{names}"), true),
            (format!("5-n-{names}"), true),
            (format!("5--{names}"), false),
            (format!("05-7-{names}"), false),
            (format!("5-7-{}", names.to_uppercase()), false),
            (format!("5-7-{}", hex::encode("a|b")), false),
            (format!("5-7-{}", hex::encode("a|b|c|d")), false),
            (format!("5-7-{}", hex::encode([0xff, b'|', b'|'])), false),
            (
                format!("5-7-{}", hex::encode(format!("{}||", "x".repeat(95)))),
                false,
            ),
            ("5-7".to_string(), false),
        ] {
            let body = format!("{}.-.{}.0.-.-.-.{light}", l.lease, l.expires_at_ms);
            let text = format!("{body}.{}", hex::encode(ring.sign_lease(&body)));
            let got = SignedLease::verify(&text, &ring);
            assert_eq!(got.is_some(), ok, "{text}");
            if let Some(got) = got {
                assert_eq!(
                    got.lease.light.map(|x| x.expires_at_ms),
                    Some(l.expires_at_ms)
                );
            }
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
