//! Per-client rate limiting for the read and admin APIs (governor's GCRA, keyed by client IP).

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper::StatusCode;

use super::http::{self, Resp};

pub struct Limiter {
    inner: DefaultKeyedRateLimiter<IpAddr>,
}

impl Limiter {
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Limiter {
        Limiter {
            inner: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Resp> {
        self.inner.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            http::with_header(
                http::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("too many requests; retry in {secs}s"),
                ),
                "retry-after",
                &secs.max(1).to_string(),
            )
        })
    }

    /// Forgets idle clients so the table does not grow without bound.
    pub fn prune(&self) {
        self.inner.retain_recent();
    }
}
