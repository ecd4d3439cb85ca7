//! Prometheus metrics of the proxy.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a request ended, as far as the proxy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Forwarded; the status is the backend's.
    Forwarded,
    /// Backend answered 101 and the connection was spliced.
    Upgraded,
    /// No usable Host, or CONNECT.
    BadRequest,
    UnknownHost,
    NotRunning,
    BadGateway,
    Internal,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Upgraded => "upgraded",
            Self::BadRequest => "bad_request",
            Self::UnknownHost => "unknown_host",
            Self::NotRunning => "not_running",
            Self::BadGateway => "bad_gateway",
            Self::Internal => "internal",
        }
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    outcome: &'static str,
    status_class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

type HistogramFamily = Family<OutcomeLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s: covers plain forwards as well as waking a VM.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

#[derive(Debug)]
struct Inner {
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    active: Gauge,
}

/// Proxy metrics. Cheap to clone (shared state).
///
/// Registered names (use the root registry, or a sub-registry without prefix):
/// - `hatch_proxy_requests_total{outcome, status_class}`: requests answered, where
///   `outcome` is one of `forwarded`, `upgraded`, `bad_request`, `unknown_host`,
///   `not_running`, `bad_gateway`, `internal` and `status_class` is `1xx`..`5xx`.
/// - `hatch_proxy_response_latency_seconds{outcome}`: time from receiving the
///   request head to having the response head (includes [`crate::Resolver::resolve`],
///   so a wake-up shows here).
/// - `hatch_proxy_active_requests`: requests to backends not yet finished
///   (including upgraded connections).
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    inner: Arc<Inner>,
}

impl ProxyMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        registry.register(
            "hatch_proxy_requests",
            "Requests answered by the proxy, by outcome and status class",
            metrics.inner.requests.clone(),
        );
        registry.register(
            "hatch_proxy_response_latency_seconds",
            "Time from request head received to response head available",
            metrics.inner.latency.clone(),
        );
        registry.register(
            "hatch_proxy_active_requests",
            "Requests (and upgraded connections) currently open to backends",
            metrics.inner.active.clone(),
        );
        metrics
    }

    /// Creates metrics that are not exported anywhere.
    pub fn unregistered() -> Self {
        Self {
            inner: Arc::new(Inner {
                requests: Family::default(),
                latency: Family::new_with_constructor(latency_histogram),
                active: Gauge::default(),
            }),
        }
    }

    pub(crate) fn observe(&self, outcome: Outcome, status: StatusCode, elapsed: Duration) {
        self.inner
            .requests
            .get_or_create(&RequestLabels {
                outcome: outcome.as_str(),
                status_class: status_class(status),
            })
            .inc();
        self.inner
            .latency
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn active_inc(&self) {
        self.inner.active.inc();
    }

    pub(crate) fn active_dec(&self) {
        self.inner.active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn encodes_registered_metrics() {
        let mut registry = Registry::default();
        let metrics = ProxyMetrics::register(&mut registry);
        metrics.observe(Outcome::Forwarded, StatusCode::OK, Duration::from_millis(3));
        metrics.observe(Outcome::UnknownHost, StatusCode::NOT_FOUND, Duration::ZERO);
        metrics.active_inc();
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"hatch_proxy_requests_total{outcome="forwarded",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"hatch_proxy_requests_total{outcome="unknown_host",status_class="4xx"} 1"#
        ));
        assert!(
            text.contains(r#"hatch_proxy_response_latency_seconds_count{outcome="forwarded"} 1"#)
        );
        assert!(text.contains("hatch_proxy_active_requests 1"));
    }
}
