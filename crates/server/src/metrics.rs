//! `GET /metrics`: a small hand-rolled Prometheus text exposition (format 0.0.4). Counters
//! the server keeps itself (requests, latency, bytes in, seal latency) live here; store-wide
//! figures (dedup ratio, cache hits, tier queue, gc runs) are read from the engine at scrape
//! time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histograms, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// The server's own counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    seal: Mutex<Histogram>,
    pub ingest_bytes: AtomicU64,
    pub upload_bytes: AtomicU64,
}

/// Store-wide figures read at scrape time.
pub struct StoreFigures {
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub stored_bytes: u64,
    pub runs_open: u64,
    pub runs_sealed: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub tier_pending: Option<u64>,
    pub gc_runs: u64,
    pub disk_free_bytes: u64,
    pub reserve_held: bool,
    pub lost_chunks: u64,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *r.entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        drop(r);
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(route.to_owned())
            .or_default()
            .observe(took);
    }

    pub fn seal(&self, took: Duration) {
        self.seal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(took);
    }

    pub fn render(&self, f: &StoreFigures) -> String {
        let mut out = String::new();
        let o = &mut out;
        let gauge = |o: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(
            o,
            "artifactfs_http_ingest_bytes_total",
            "Bytes of file content received by PUT file requests.",
            "counter",
            self.ingest_bytes.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            o,
            "artifactfs_http_upload_bytes_total",
            "Bytes received by resumable-upload PATCH requests.",
            "counter",
            self.upload_bytes.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            o,
            "artifactfs_logical_bytes",
            "Bytes of all sealed runs' files.",
            "gauge",
            f.logical_bytes.to_string(),
        );
        gauge(
            o,
            "artifactfs_unique_bytes",
            "Bytes of distinct chunks before compression.",
            "gauge",
            f.unique_bytes.to_string(),
        );
        gauge(
            o,
            "artifactfs_stored_bytes",
            "Bytes of distinct chunks as stored (compressed).",
            "gauge",
            f.stored_bytes.to_string(),
        );
        let ratio = if f.unique_bytes == 0 {
            1.0
        } else {
            f.logical_bytes as f64 / f.unique_bytes as f64
        };
        gauge(
            o,
            "artifactfs_dedup_ratio",
            "Logical bytes over unique chunk bytes.",
            "gauge",
            format!("{ratio}"),
        );
        let _ = writeln!(
            o,
            "# HELP artifactfs_runs Runs by state.\n# TYPE artifactfs_runs gauge\n\
             artifactfs_runs{{state=\"open\"}} {}\nartifactfs_runs{{state=\"sealed\"}} {}",
            f.runs_open, f.runs_sealed
        );
        gauge(
            o,
            "artifactfs_chunk_cache_hits_total",
            "Reads served from the decompressed-chunk cache.",
            "counter",
            f.cache_hits.to_string(),
        );
        gauge(
            o,
            "artifactfs_chunk_cache_misses_total",
            "Reads that loaded a chunk.",
            "counter",
            f.cache_misses.to_string(),
        );
        if let Some(p) = f.tier_pending {
            gauge(
                o,
                "artifactfs_tier_queue",
                "Packs and manifests waiting for upload to the remote tier.",
                "gauge",
                p.to_string(),
            );
        }
        gauge(
            o,
            "artifactfs_disk_free_bytes",
            "Bytes still free on the store's disk.",
            "gauge",
            f.disk_free_bytes.to_string(),
        );
        gauge(
            o,
            "artifactfs_reserve_held",
            "1 while the store's reserve for deletions on a full disk is in place, 0 after a deletion used it.",
            "gauge",
            u8::from(f.reserve_held).to_string(),
        );
        gauge(
            o,
            "artifactfs_lost_chunks",
            "Chunks sealed runs name that no readable pack holds (after a rebuild over damage); 0 when whole.",
            "gauge",
            f.lost_chunks.to_string(),
        );
        gauge(
            o,
            "artifactfs_gc_runs_total",
            "Garbage collections recorded in the events log.",
            "counter",
            f.gc_runs.to_string(),
        );
        let _ = writeln!(
            o,
            "# HELP artifactfs_seal_seconds Seal latency of seals requested over HTTP.\n\
             # TYPE artifactfs_seal_seconds histogram"
        );
        self.seal.lock().unwrap_or_else(|p| p.into_inner()).render(
            o,
            "artifactfs_seal_seconds",
            "",
        );
        let _ = writeln!(
            o,
            "# HELP artifactfs_http_requests_total HTTP requests by method, route and status.\n\
             # TYPE artifactfs_http_requests_total counter"
        );
        for ((m, r, s), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "artifactfs_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{s}\"}} {n}",
                escape(m),
                escape(r)
            );
        }
        let _ = writeln!(
            o,
            "# HELP artifactfs_http_request_seconds HTTP request latency by route.\n\
             # TYPE artifactfs_http_request_seconds histogram"
        );
        for (r, h) in self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            h.render(
                o,
                "artifactfs_http_request_seconds",
                &format!("route=\"{}\"", escape(r)),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_requests_and_histograms() {
        let m = Metrics::default();
        m.request("GET", "/health", 200, Duration::from_millis(2));
        m.request("GET", "/health", 200, Duration::from_millis(200));
        m.seal(Duration::from_millis(30));
        let text = m.render(&StoreFigures {
            logical_bytes: 200,
            unique_bytes: 100,
            stored_bytes: 50,
            runs_open: 1,
            runs_sealed: 2,
            cache_hits: 3,
            cache_misses: 4,
            tier_pending: None,
            gc_runs: 0,
            disk_free_bytes: 1 << 30,
            reserve_held: false,
            lost_chunks: 3,
        });
        assert!(text.contains(
            "artifactfs_http_requests_total{method=\"GET\",route=\"/health\",status=\"200\"} 2"
        ));
        assert!(
            text.contains(
                "artifactfs_http_request_seconds_bucket{route=\"/health\",le=\"0.0025\"} 1"
            )
        );
        assert!(text.contains("artifactfs_http_request_seconds_count{route=\"/health\"} 2"));
        assert!(text.contains("artifactfs_seal_seconds_count 1"));
        assert!(text.contains("artifactfs_dedup_ratio 2"));
        assert!(text.contains("artifactfs_disk_free_bytes 1073741824"));
        assert!(text.contains("artifactfs_reserve_held 0"));
        assert!(text.contains("artifactfs_lost_chunks 3"));
    }
}
