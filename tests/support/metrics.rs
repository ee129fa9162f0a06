//! A capturing `metrics` recorder for assertions: counters, gauges and every
//! histogram sample, by name and labels. Include with
//! `#[path = "support/metrics.rs"] mod metrics_capture;` in a test file built
//! with the `metrics` feature.
//!
//! The recorder is global (the cache registers its handles in `build()`, on
//! whatever thread): [`recorder`] installs it once per test binary; tests keep
//! apart by giving their caches unique names (the `cache` label).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// `name{label=value,...}` with labels sorted.
pub type SeriesKey = String;

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(value);
    }
}

/// Every series registered so far.
#[derive(Default)]
pub struct Captured {
    counters: Mutex<BTreeMap<SeriesKey, Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<SeriesKey, Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<SeriesKey, Arc<Samples>>>,
}

fn series(key: &Key) -> SeriesKey {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Captured {
    /// The counter `name` with exactly these labels (0 if never registered).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let key = series_of(name, labels);
        let counters = self.counters.lock().unwrap();
        counters.get(&key).map_or(0, |c| c.load(Ordering::SeqCst))
    }

    /// The gauge `name` with exactly these labels.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let key = series_of(name, labels);
        let gauges = self.gauges.lock().unwrap();
        gauges
            .get(&key)
            .map(|g| f64::from_bits(g.load(Ordering::SeqCst)))
    }

    /// The samples of histogram `name` with exactly these labels.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let key = series_of(name, labels);
        let histograms = self.histograms.lock().unwrap();
        histograms.get(&key).map_or_else(Vec::new, |h| {
            h.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
        })
    }

    /// Every series key registered whose labels include `label=value`.
    pub fn series_with(&self, label: &str, value: &str) -> Vec<SeriesKey> {
        let needle = format!("{label}={value}");
        let mut all: Vec<SeriesKey> = Vec::new();
        all.extend(self.counters.lock().unwrap().keys().cloned());
        all.extend(self.gauges.lock().unwrap().keys().cloned());
        all.extend(self.histograms.lock().unwrap().keys().cloned());
        all.retain(|k| {
            k.split_once('{')
                .map(|(_, l)| l.trim_end_matches('}').split(',').any(|p| p == needle))
                .unwrap_or(false)
        });
        all
    }
}

fn series_of(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

struct CapturingRecorder(Arc<Captured>);

impl Recorder for CapturingRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.0.counters.lock().unwrap();
        let c = counters.entry(series(key)).or_default();
        Counter::from_arc(Arc::clone(c))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let mut gauges = self.0.gauges.lock().unwrap();
        let g = gauges
            .entry(series(key))
            .or_insert_with(|| Arc::new(AtomicU64::new(0f64.to_bits())));
        Gauge::from_arc(Arc::clone(g))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.0.histograms.lock().unwrap();
        let h = histograms.entry(series(key)).or_default();
        Histogram::from_arc(Arc::clone(h))
    }
}

/// The process-wide capturing recorder, installed on first use.
pub fn recorder() -> Arc<Captured> {
    static CAPTURED: OnceLock<Arc<Captured>> = OnceLock::new();
    Arc::clone(CAPTURED.get_or_init(|| {
        let captured = Arc::new(Captured::default());
        metrics::set_global_recorder(CapturingRecorder(Arc::clone(&captured)))
            .expect("no other metrics recorder in this test binary");
        captured
    }))
}
