//! Prometheus metrics: requests by route and status, latency, queue depth, batch sizes, time per
//! pipeline stage and device memory.

use prometheus::{Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use sgl_core::PerfMetrics;
use sgl_scheduler::Engine;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    stage_seconds: HistogramVec,
    queue_depth: IntGauge,
    batches: IntCounterVec,
    peak_memory_mb: Gauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("sgl_diffusion".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route and status"),
            &["route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency by route")
                .buckets(vec![0.005, 0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0]),
            &["route"],
        )?;
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new("pipeline_stage_duration_seconds", "Time per pipeline stage of each batch")
                .buckets(vec![0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 120.0]),
            &["stage"],
        )?;
        let queue_depth = IntGauge::new("queue_depth", "Requests waiting in the queue")?;
        let batches = IntCounterVec::new(Opts::new("batches_total", "Batches run, by number of requests"), &["size"])?;
        let peak_memory_mb = Gauge::new("device_peak_memory_mb", "Peak device memory of the last batch (MiB)")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(stage_seconds.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(batches.clone()))?;
        registry.register(Box::new(peak_memory_mb.clone()))?;
        Ok(Self { registry, requests, latency, stage_seconds, queue_depth, batches, peak_memory_mb })
    }

    pub fn observe_request(&self, route: &str, status: u16, seconds: f64) {
        self.requests.with_label_values(&[route, &status.to_string()]).inc();
        self.latency.with_label_values(&[route]).observe(seconds);
    }

    pub fn observe_perf(&self, perf: &PerfMetrics) {
        for stage in &perf.steps {
            self.stage_seconds.with_label_values(&[stage.name.as_str()]).observe(stage.duration_ms / 1000.0);
        }
        self.peak_memory_mb.set(perf.peak_memory_mb);
    }

    /// The Prometheus text exposition, with the scheduler's live numbers filled in.
    pub fn render(&self, engine: Option<&Engine>) -> String {
        if let Some(engine) = engine {
            self.queue_depth.set(i64::try_from(engine.queue().depth()).unwrap_or(i64::MAX));
            for (size, count) in engine.stats().batch_sizes() {
                let counter = self.batches.with_label_values(&[&size.to_string()]);
                let delta = count.saturating_sub(counter.get());
                counter.inc_by(delta);
            }
        }
        let mut buffer = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}
