//! Prometheus metrics (the `prometheus-client` crate, OpenMetrics text),
//! served on the admin listener (`ops::admin`), away from the public port.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `route` is shared: labelling a request copies a pointer, not the name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<String>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<String>,
}

/// A counter per outcome.
pub type Outcomes = Family<Outcome, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

type Latency = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// Every metric, cheap to clone into the parts that record them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Latency,
    pub sign_ins: Family<Outcome, Counter>,
    pub token_validations: Family<Outcome, Counter>,
    pub jwks_fetches: Family<Outcome, Counter>,
    /// Requests to the identity provider, by kind; flat in steady state.
    pub provider_requests: Family<Kind, Counter>,
    pub websockets_active: Gauge,
    pub tls_handshake_failures: Counter,
    /// Sessions read from the store (a cache miss); flat in steady state.
    pub session_store_lookups: Counter,
    pub session_store_errors: Counter,
    pub certificate_expiry: Gauge<i64, AtomicI64>,
    pub acme_orders: Family<Outcome, Counter>,
    pub forward_auths: Outcomes,
    /// Microsoft Graph look-ups of an overage user's groups, by outcome.
    pub graph_lookups: Outcomes,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("authgate");
        let metrics = Metrics {
            registry: Arc::new(Registry::default()),
            requests: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            sign_ins: Family::default(),
            token_validations: Family::default(),
            jwks_fetches: Family::default(),
            provider_requests: Family::default(),
            websockets_active: Gauge::default(),
            tls_handshake_failures: Counter::default(),
            session_store_lookups: Counter::default(),
            session_store_errors: Counter::default(),
            certificate_expiry: Gauge::default(),
            acme_orders: Family::default(),
            graph_lookups: Family::default(),
            forward_auths: Family::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by route and status",
            metrics.requests.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from request to response headers, by route",
            metrics.upstream_latency.clone(),
        );
        registry.register(
            "sign_ins",
            "Finished sign-ins by outcome",
            metrics.sign_ins.clone(),
        );
        registry.register(
            "token_validations",
            "ID and bearer token validations by outcome",
            metrics.token_validations.clone(),
        );
        registry.register(
            "jwks_fetches",
            "Signing key set fetches by outcome",
            metrics.jwks_fetches.clone(),
        );
        registry.register(
            "provider_requests",
            "Requests sent to the identity provider, by kind",
            metrics.provider_requests.clone(),
        );
        registry.register(
            "websockets_active",
            "Upgraded connections open",
            metrics.websockets_active.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Client TLS handshakes that failed or timed out",
            metrics.tls_handshake_failures.clone(),
        );
        registry.register(
            "session_store_lookups",
            "Sessions read from the session store because no cached copy was fresh",
            metrics.session_store_lookups.clone(),
        );
        registry.register(
            "session_store_errors",
            "Session store operations that failed",
            metrics.session_store_errors.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the served certificate expires (Unix time)",
            metrics.certificate_expiry.clone(),
        );
        registry.register(
            "acme_orders",
            "Certificate orders to the ACME CA, by outcome (issued, failed)",
            metrics.acme_orders.clone(),
        );
        registry.register(
            "forward_auths",
            "Forward-auth questions from a proxy in front, by verdict (allowed, passed, \
             unauthenticated, forbidden, step_up_required, invalid_token, store_unavailable, untrusted_peer, no_target)",
            metrics.forward_auths.clone(),
        );
        registry.register(
            "graph_lookups",
            "Microsoft Graph look-ups of the groups of users in more groups than a token lists, \
             by outcome (resolved, refused, throttled, unavailable, no_graph)",
            metrics.graph_lookups.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..metrics
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn outcome(family: &Family<Outcome, Counter>, outcome: &'static str) {
        family.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn provider_request(&self, kind: &'static str) {
        self.provider_requests.get_or_create(&Kind { kind }).inc();
    }

    /// The request metrics of `route`, found once for all its requests.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let route = Arc::new(route.to_owned());
        RouteMetrics {
            latency: self
                .upstream_latency
                .get_or_create(&RouteLabels {
                    route: route.clone(),
                })
                .clone(),
            requests: self.requests.clone(),
            route,
        }
    }
}

/// One route's request metrics. Looking them up by name for every request
/// (two label copies, two map lookups) was a per-request cost; now only the status's counter is looked up.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    pub route: Arc<String>,
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, latency: std::time::Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: self.route.clone(),
                status,
            })
            .inc();
        self.latency.observe(latency.as_secs_f64());
    }
}
