//! Prometheus metrics (the `prometheus-client` crate, OpenMetrics text),
//! served on the admin listener (`ops::admin`), away from the public port.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

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

/// Every metric, cheap to clone into the parts that record them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Requests answered and their latency, by route.
    requests: Arc<RequestTallies>,
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

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("authgate");
        let metrics = Metrics {
            registry: Arc::new(Registry::default()),
            requests: Arc::default(),
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
        registry.register_collector(Box::new(metrics.requests.clone()));
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

    /// The request metrics of `route`, for the requests served by one
    /// thread (see [`RouteMetrics::for_worker`]).
    pub fn route(&self, route: &str) -> RouteMetrics {
        self.requests.tally(route.into())
    }
}

/// 0.5 ms … ~16 s, doubling.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192, 16.384,
];

/// Requests answered, by route and status, and their latency, by route.
/// Each worker thread counts in tallies of its own, summed at each
/// scrape: a request then writes only memory its own core holds, where a
/// counter family's lock, its shared label and a histogram's mutex, each
/// shared by every core, had cost every request.
#[derive(Debug, Default)]
struct RequestTallies(Mutex<Vec<Arc<Tally>>>);

/// One thread's counts for one route.
#[derive(Debug)]
struct Tally {
    route: Arc<str>,
    counts: Mutex<Counts>,
}

#[derive(Debug, Clone, Default)]
struct Counts {
    /// Requests by status, in the order first answered.
    statuses: Vec<(u16, u64)>,
    /// Latencies in each of `LATENCY_BUCKETS`, then beyond the last.
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    latency_sum: f64,
}

impl Counts {
    fn record(&mut self, status: u16, seconds: f64) {
        match self.statuses.iter_mut().find(|(s, _)| *s == status) {
            Some((_, count)) => *count += 1,
            None => self.statuses.push((status, 1)),
        }
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.latency_sum += seconds;
    }

    fn add(&mut self, other: &Counts) {
        for &(status, count) in &other.statuses {
            match self.statuses.iter_mut().find(|(s, _)| *s == status) {
                Some((_, sum)) => *sum += count,
                None => self.statuses.push((status, count)),
            }
        }
        for (sum, count) in self.buckets.iter_mut().zip(other.buckets) {
            *sum += count;
        }
        self.latency_sum += other.latency_sum;
    }
}

impl RequestTallies {
    fn tally(self: &Arc<Self>, route: Arc<str>) -> RouteMetrics {
        let tally = Arc::new(Tally {
            route: route.clone(),
            counts: Mutex::default(),
        });
        lock(&self.0).push(tally.clone());
        RouteMetrics {
            route,
            tally,
            tallies: self.clone(),
        }
    }

    /// Every route's counts, summed over threads, in the routes' order.
    fn summed(&self) -> Vec<(Arc<str>, Counts)> {
        let mut by_route: Vec<(Arc<str>, Counts)> = Vec::new();
        for tally in lock(&self.0).iter() {
            let counts = lock(&tally.counts).clone();
            match by_route.iter_mut().find(|(route, _)| *route == tally.route) {
                Some((_, sum)) => sum.add(&counts),
                None => by_route.push((tally.route.clone(), counts)),
            }
        }
        by_route
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Collector for RequestTallies {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let by_route = self.summed();
        let mut requests = encoder.encode_descriptor(
            "requests",
            // `register` ends a help text with a full stop; a collector
            // writes its own.
            "Requests answered, by route and status.",
            None,
            MetricType::Counter,
        )?;
        for (route, counts) in &by_route {
            for &(status, count) in &counts.statuses {
                let labels = ([("route", &**route)], [("status", status)]);
                ConstCounter::new(count).encode(requests.encode_family(&labels)?)?;
            }
        }
        let mut latency = encoder.encode_descriptor(
            "upstream_latency_seconds",
            "Time from request to response headers, by route.",
            None,
            MetricType::Histogram,
        )?;
        for (route, counts) in &by_route {
            let bounds = LATENCY_BUCKETS.into_iter().chain([f64::INFINITY]);
            let buckets: Vec<(f64, u64)> = bounds.zip(counts.buckets).collect();
            let count = counts.buckets.iter().sum();
            latency
                .encode_family(&[("route", &**route)])?
                .encode_histogram::<NoLabelSet>(counts.latency_sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// One route's request metrics, counted by one thread (or by the
/// listeners sharing the gateway's own).
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    pub route: Arc<str>,
    tally: Arc<Tally>,
    tallies: Arc<RequestTallies>,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, latency: Duration) {
        lock(&self.tally.counts).record(status, latency.as_secs_f64());
    }

    /// The same route's metrics, counted apart for one worker thread.
    pub fn for_worker(&self) -> RouteMetrics {
        self.tallies.tally(self.route.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_threads_requests_are_summed_in_the_exposition() {
        let metrics = Metrics::default();
        let gateway = metrics.route("/");
        let workers: Vec<RouteMetrics> = (0..2).map(|_| gateway.for_worker()).collect();
        std::thread::scope(|scope| {
            for worker in &workers {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        worker.record(200, Duration::from_micros(700));
                    }
                    worker.record(502, Duration::from_secs(20));
                });
            }
        });
        metrics.route("/api").record(404, Duration::from_millis(3));

        let text = metrics.render();
        for line in [
            "authgate_requests_total{route=\"/\",status=\"200\"} 2000",
            "authgate_requests_total{route=\"/\",status=\"502\"} 2",
            "authgate_requests_total{route=\"/api\",status=\"404\"} 1",
            "authgate_upstream_latency_seconds_count{route=\"/\"} 2002",
            "authgate_upstream_latency_seconds_bucket{le=\"0.0005\",route=\"/\"} 0",
            "authgate_upstream_latency_seconds_bucket{le=\"0.001\",route=\"/\"} 2000",
            "authgate_upstream_latency_seconds_bucket{le=\"16.384\",route=\"/\"} 2000",
            "authgate_upstream_latency_seconds_bucket{le=\"+Inf\",route=\"/\"} 2002",
            "authgate_upstream_latency_seconds_count{route=\"/api\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert_eq!(text.matches("# TYPE authgate_requests counter").count(), 1);
        assert!(text.contains("# HELP authgate_requests Requests answered, by route and status.\n"));
    }
}
