//! The operator's "now": the local clock corrected by how far it is from STS's own (the
//! `Date` header of every successful STS and ECR answer; until the first one since the
//! process started, the local clock as it is). Credentials' issue and expiry times are STS's,
//! so comparing them with a local clock that is wrong (ahead by more than a lifetime, say)
//! would make every credential look due or expired at once and refresh in a loop.

use std::sync::atomic::{AtomicI64, Ordering};

use aws_sdk_sts::config::{
    ConfigBag, Intercept, RuntimeComponents, interceptors::BeforeDeserializationInterceptorContextRef,
};
use jiff::{SignedDuration, Timestamp};

/// Offsets this small are the `Date` header's one-second resolution and the request's
/// travel time, not a wrong clock: ignored, so timestamps the operator writes stay stable.
const NOISE_SECONDS: i64 = 2;

/// STS's time as seen from here.
#[derive(Debug, Default)]
pub struct Clock {
    offset_seconds: AtomicI64,
}

impl Clock {
    /// Now, in STS's time (whole seconds, like every time the operator writes).
    pub fn now(&self) -> Timestamp {
        let local = Timestamp::now().as_second();
        Timestamp::from_second(local + self.offset_seconds.load(Ordering::Relaxed)).unwrap_or_else(|_| Timestamp::now())
    }

    /// How far STS's clock is ahead of the local one (negative: behind).
    pub fn offset(&self) -> SignedDuration {
        SignedDuration::from_secs(self.offset_seconds.load(Ordering::Relaxed))
    }

    /// Records an answer's `Date` (STS's time) received at local time `local`.
    pub fn observe(&self, server: Timestamp, local: Timestamp) {
        let offset = server.as_second() - local.as_second();
        let offset = if offset.abs() <= NOISE_SECONDS { 0 } else { offset };
        let before = self.offset_seconds.swap(offset, Ordering::Relaxed);
        if before != offset {
            tracing::info!(
                offset_seconds = offset,
                "STS's clock differs from the local clock; times follow STS's"
            );
        }
    }
}

/// Parses an HTTP `Date` header (RFC 7231 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_http_date(value: &str) -> Option<Timestamp> {
    jiff::fmt::rfc2822::parse(value).ok().map(|zoned| zoned.timestamp())
}

/// Feeds the `Date` of every answer to a [`Clock`].
#[derive(Debug)]
pub struct DateObserver(pub std::sync::Arc<Clock>);

impl Intercept for DateObserver {
    fn name(&self) -> &'static str {
        "kube-sts-clock"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_sts::error::BoxError> {
        // Only answers STS itself gave: an error page of a proxy in between says nothing of
        // STS's clock.
        let response = context.response();
        if !response.status().is_success() {
            return Ok(());
        }
        if let Some(date) = response.headers().get("date").and_then(parse_http_date) {
            self.0.observe(date, Timestamp::now());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_sts_beyond_the_noise() {
        let clock = Clock::default();
        let local: Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        // The local clock is two hours ahead of STS.
        clock.observe(parse_http_date("Sun, 29 Nov 2026 08:00:00 GMT").unwrap(), local);
        assert_eq!(clock.offset(), SignedDuration::from_hours(-2));
        let now = clock.now();
        let expected = Timestamp::now() - SignedDuration::from_hours(2);
        assert!(
            (now.as_second() - expected.as_second()).abs() <= 1,
            "{now} vs {expected}"
        );
        // A second apart is the header's resolution, not a wrong clock.
        clock.observe(parse_http_date("Sun, 29 Nov 2026 10:00:01 GMT").unwrap(), local);
        assert_eq!(clock.offset(), SignedDuration::ZERO);
        assert_eq!(parse_http_date("not a date"), None);
    }
}
