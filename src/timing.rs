//! When to refresh credentials, how long to back off after a failure, and how long a watch
//! lives. Pure functions (`now` and randomness come in as arguments), and the watch
//! configuration built from one.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// How every watch of the operator and the webhook is opened: a watcher's requests live
/// 5 to 10 minutes, drawn at random when the watcher starts (kube-rs reuses its
/// configuration for each request of a watcher), where kube-rs would end each after 290 s.
/// client-go's reflectors draw from the same range. Renewed half as often, the watches keep
/// an operator at rest under one request a minute whatever its size, and the draws keep
/// watchers (and replicas) from renewing in step. The cost: a connection that dies silently
/// (no close from the apiserver, which a restart of it does send) is noticed after the
/// watch's time plus 5 s rather than after 295 s; the apiserver's bookmarks (about one a
/// minute) keep a live quiet watch from looking idle.
pub fn watch_config() -> kube::runtime::watcher::Config {
    kube::runtime::watcher::Config::default().timeout(watch_timeout_seconds(rand::random()))
}

/// [`watch_config`] for the one object named `name` (a field selector), or for all.
pub fn watch_config_of(name: Option<&str>) -> kube::runtime::watcher::Config {
    match name {
        Some(name) => watch_config().fields(&format!("metadata.name={name}")),
        None => watch_config(),
    }
}

/// The watch timeout for a uniform draw `r` in [0, 1): 300 to 599 seconds.
fn watch_timeout_seconds(r: f64) -> u32 {
    MIN_WATCH_SECONDS + (r.clamp(0.0, 1.0) * f64::from(MIN_WATCH_SECONDS)) as u32 % MIN_WATCH_SECONDS
}

const MIN_WATCH_SECONDS: u32 = 300;

/// SDKs refresh `credential_process` credentials about 15 minutes ahead of expiry.
const SDK_REFRESH_LEAD: SignedDuration = SignedDuration::from_secs(15 * 60);
const MIN_EXPLICIT_LEAD: SignedDuration = SignedDuration::from_secs(60);
const MAX_JITTER: SignedDuration = SignedDuration::from_secs(5 * 60);
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const BACKOFF_CAP: Duration = Duration::from_secs(5 * 60);
/// A retry is never scheduled later than this before expiry, so failures keep being retried
/// while the current credentials are still valid.
const RETRY_MARGIN_BEFORE_EXPIRY: Duration = Duration::from_secs(10);

/// The refresh lead `R` for credentials of lifetime `lifetime`.
///
/// With `refresh_before` set: clamped to `[60 s, L/2]`. Otherwise `min(max(L/3, 15 min), L/2)`.
pub fn refresh_lead(lifetime: SignedDuration, refresh_before: Option<SignedDuration>) -> SignedDuration {
    let half = lifetime / 2;
    match refresh_before {
        Some(lead) => lead.max(MIN_EXPLICIT_LEAD).min(half),
        None => (lifetime / 3).max(SDK_REFRESH_LEAD).min(half),
    }
}

/// Largest jitter (always applied earlier, never later): `min(L/20, 5 min)`.
pub fn max_jitter(lifetime: SignedDuration) -> SignedDuration {
    (lifetime / 20).min(MAX_JITTER)
}

/// When credentials issued at `issued_at` and expiring at `expiration` should be refreshed.
/// `jitter_fraction` in `[0, 1)` moves the time earlier by up to [`max_jitter`].
pub fn refresh_at(
    issued_at: Timestamp,
    expiration: Timestamp,
    refresh_before: Option<SignedDuration>,
    jitter_fraction: f64,
) -> Timestamp {
    let lifetime = expiration.duration_since(issued_at).max(SignedDuration::ZERO);
    // Whole seconds, like every timestamp the operator writes: a fraction (L/3 of an odd
    // lifetime) would never compare equal to the status read back, and rewrite it each time.
    let lead = SignedDuration::from_secs(refresh_lead(lifetime, refresh_before).as_secs());
    let jitter = SignedDuration::from_secs(max_jitter(lifetime).mul_f64(jitter_fraction.clamp(0.0, 1.0)).as_secs());
    expiration - lead - jitter
}

/// A stable jitter fraction in `[0, 1)` for one subject and issue time, so a restart
/// computes the same refresh time the previous process planned.
pub fn stable_jitter_fraction(key: &str) -> f64 {
    let hash = crate::naming::short_hash(key);
    let n = u32::from_str_radix(&hash, 16).unwrap_or(0);
    f64::from(n) / (f64::from(u32::MAX) + 1.0)
}

/// Delay before retry number `failures` (1-based) with full jitter: uniform in
/// `[0, min(cap, base * 2^(failures-1))]`, taken from `random_fraction` in `[0, 1)`.
/// When credentials still valid until `expiration` exist, the retry lands before expiry.
pub fn backoff_delay(failures: u32, random_fraction: f64, now: Timestamp, expiration: Option<Timestamp>) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_CAP);
    let mut delay = ceiling.mul_f64(random_fraction.clamp(0.0, 1.0));
    if let Some(expiration) = expiration {
        let left = expiration.duration_since(now);
        if left > SignedDuration::ZERO {
            let left = Duration::try_from(left).unwrap_or_default();
            // Leave room for another try before the credentials run out.
            let latest = left.saturating_sub(RETRY_MARGIN_BEFORE_EXPIRY).max(left / 2);
            delay = delay.min(latest);
        }
    }
    delay.max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_live_five_to_ten_minutes() {
        assert_eq!(watch_timeout_seconds(0.0), 300);
        assert_eq!(watch_timeout_seconds(0.5), 450);
        assert_eq!(watch_timeout_seconds(0.999_999), 599);
        assert_eq!(watch_timeout_seconds(1.0), 300, "a draw of 1 wraps, never past 599");
        assert_eq!(watch_timeout_seconds(-1.0), 300);
        assert_eq!(watch_timeout_seconds(f64::NAN), 300);
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }
    fn secs(s: i64) -> SignedDuration {
        SignedDuration::from_secs(s)
    }

    #[test]
    fn default_lead_table() {
        // (lifetime, expected lead)
        let table = [
            (900, 450),     // 15 min: L/2 caps the 15-min SDK lead
            (1800, 900),    // 30 min: 15 min = L/2
            (3600, 1200),   // 1 h: L/3 = 20 min
            (2700, 900),    // 45 min: L/3 = 15 min = SDK lead
            (43200, 14400), // 12 h: L/3 = 4 h
        ];
        for (lifetime, want) in table {
            assert_eq!(
                refresh_lead(secs(lifetime), None).as_secs(),
                want,
                "lifetime {lifetime}"
            );
        }
    }

    #[test]
    fn explicit_lead_is_clamped() {
        assert_eq!(refresh_lead(secs(3600), Some(secs(10))).as_secs(), 60);
        assert_eq!(refresh_lead(secs(3600), Some(secs(600))).as_secs(), 600);
        assert_eq!(refresh_lead(secs(3600), Some(secs(3000))).as_secs(), 1800);
    }

    #[test]
    fn refresh_time_without_and_with_jitter() {
        let issued = ts("2026-11-26T09:00:00Z");
        let exp = ts("2026-11-26T10:00:00Z");
        assert_eq!(refresh_at(issued, exp, None, 0.0), ts("2026-11-26T09:40:00Z"));
        // Max jitter for 1 h is 3 min, applied earlier only.
        assert_eq!(refresh_at(issued, exp, None, 0.999_999_999), ts("2026-11-26T09:37:01Z"));
        let mid = refresh_at(issued, exp, None, 0.5);
        assert_eq!(mid, ts("2026-11-26T09:38:30Z"));
    }

    #[test]
    fn jitter_is_capped_at_five_minutes() {
        assert_eq!(max_jitter(secs(43200)).as_secs(), 300);
        assert_eq!(max_jitter(secs(900)).as_secs(), 45);
    }

    #[test]
    fn stable_jitter_is_deterministic_and_in_range() {
        let a = stable_jitter_fraction("ns/binding/sa/2026-11-26T09:00:00Z");
        assert_eq!(a, stable_jitter_fraction("ns/binding/sa/2026-11-26T09:00:00Z"));
        assert!((0.0..1.0).contains(&a));
        assert_ne!(a, stable_jitter_fraction("ns/binding/other/2026-11-26T09:00:00Z"));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let now = ts("2026-11-26T09:00:00Z");
        assert_eq!(backoff_delay(1, 0.999_999, now, None).as_secs(), 4);
        assert_eq!(backoff_delay(2, 0.999_999, now, None).as_secs(), 9);
        assert_eq!(backoff_delay(3, 0.999_999, now, None).as_secs(), 19);
        assert_eq!(backoff_delay(20, 0.999_999, now, None).as_secs(), 299);
        // Full jitter: a low draw gives a short delay, never zero.
        assert_eq!(backoff_delay(20, 0.0, now, None).as_secs(), 1);
    }

    #[test]
    fn backoff_leaves_retries_before_expiry() {
        let now = ts("2026-11-26T09:00:00Z");
        let exp = ts("2026-11-26T09:01:00Z");
        let d = backoff_delay(20, 0.999, now, Some(exp));
        assert!(d <= Duration::from_secs(50), "{d:?}");
        // Expired credentials do not constrain the delay.
        let past = ts("2026-11-26T08:00:00Z");
        assert_eq!(backoff_delay(20, 0.999_999, now, Some(past)).as_secs(), 299);
    }

    #[test]
    fn refresh_time_is_whole_seconds_for_odd_lifetimes() {
        let issued: Timestamp = "2026-11-26T09:00:00Z".parse().unwrap();
        for lifetime in [901, 3599, 3601, 43_199] {
            let at = refresh_at(issued, issued + SignedDuration::from_secs(lifetime), None, 0.37);
            assert_eq!(at.subsec_nanosecond(), 0, "lifetime {lifetime}: {at}");
        }
    }
}
