//! The HTTP API frontend (ADR 0011): axum on tokio over the engine's file-system view, the same
//! [`Vfs`] a mount serves, so runs written over HTTP and runs written through the mount are
//! one thing. It translates requests into engine calls and engine errors into statuses
//! ([`error`]); it never touches SQLite or pack files. Engine calls block, so every handler
//! makes them through `spawn_blocking`; request bodies are streamed to the engine in pieces,
//! so memory stays bounded whatever their size.
//!
//! The binary builds the store and the view and calls [`start`]; the server owns its runtime.

pub mod error;
pub mod fsops;
mod handlers;
pub mod metrics;
pub mod paths;
mod run_cache;
pub mod uploads;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use artifactfs_core::vfs::Vfs;
use axum::Router;
use axum::routing::{get, post, put};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

pub use error::ApiError;

/// The OpenAPI document of this API (also checked in as `docs/openapi.json`).
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Every route the router answers, as `(method, path template)`; the OpenAPI document
/// describes exactly these (a test checks both ways).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/runs"),
    ("POST", "/v1/runs"),
    ("GET", "/v1/runs/{namespace}/{run}"),
    ("GET", "/v1/runs/{namespace}/{run}/manifest"),
    ("POST", "/v1/runs/{namespace}/{run}/seal"),
    ("PUT", "/v1/runs/{namespace}/{run}/retention"),
    ("POST", "/v1/runs/{namespace}/{run}/holds/{name}"),
    ("DELETE", "/v1/runs/{namespace}/{run}/holds/{name}"),
    ("GET", "/v1/runs/{namespace}/{run}/files"),
    ("GET", "/v1/runs/{namespace}/{run}/files/{path}"),
    ("PUT", "/v1/runs/{namespace}/{run}/files/{path}"),
    ("GET", "/v1/manifests/{digest}"),
    ("GET", "/v1/events"),
    ("POST", "/v1/uploads"),
    ("HEAD", "/v1/uploads/{id}"),
    ("PATCH", "/v1/uploads/{id}"),
    ("DELETE", "/v1/uploads/{id}"),
    ("PUT", "/v1/uploads/{id}/complete"),
];

/// Settings of the server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest JSON request body, bytes.
    pub max_json_bytes: usize,
    /// Largest request head (request line and headers), bytes; larger ones get 431.
    pub max_header_bytes: usize,
    /// Resumable uploads untouched this long are removed.
    pub upload_expiry: Duration,
    /// Longest `wait` of an events long-poll.
    pub max_wait: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_json_bytes: 1 << 20,
            max_header_bytes: 64 << 10,
            upload_expiry: Duration::from_secs(24 * 3600),
            max_wait: Duration::from_secs(60),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct App {
    pub vfs: Arc<Vfs>,
    pub opts: Arc<ServerOptions>,
    pub metrics: Arc<metrics::Metrics>,
    /// Events scanned for `gc.finished` so far: (last seq, count).
    pub gc_seen: Arc<Mutex<(i64, u64)>>,
    /// Uploads a request is appending to or completing now.
    pub busy_uploads: Arc<Mutex<std::collections::HashSet<String>>>,
    pub next_request: Arc<AtomicU64>,
    /// Answers of `GET /v1/runs/NS/RUN` while nothing is committed (ADR 0022).
    pub run_info: Arc<run_cache::RunInfoCache>,
}

/// The router over `vfs`.
pub fn router(vfs: Arc<Vfs>, opts: ServerOptions) -> Router {
    use handlers as h;
    let app = App {
        vfs,
        opts: Arc::new(opts),
        metrics: Arc::default(),
        gc_seen: Arc::default(),
        busy_uploads: Arc::default(),
        next_request: Arc::default(),
        run_info: Arc::default(),
    };
    Router::new()
        .route("/health", get(h::health))
        .route("/ready", get(h::ready))
        .route("/metrics", get(h::metrics))
        .route("/v1/openapi.json", get(h::openapi))
        .route("/v1/runs", get(h::list_runs).post(h::create_run))
        .route("/v1/runs/{namespace}/{run}", get(h::run_info))
        .route("/v1/runs/{namespace}/{run}/manifest", get(h::run_manifest))
        .route("/v1/runs/{namespace}/{run}/seal", post(h::seal))
        .route("/v1/runs/{namespace}/{run}/retention", put(h::retention))
        .route(
            "/v1/runs/{namespace}/{run}/holds/{name}",
            post(h::place_hold).delete(h::remove_hold),
        )
        .route("/v1/runs/{namespace}/{run}/files", get(h::get_file))
        .route(
            "/v1/runs/{namespace}/{run}/files/{*path}",
            get(h::get_file).put(h::put_file),
        )
        .route("/v1/manifests/{digest}", get(h::manifest_by_digest))
        .route("/v1/events", get(h::events))
        .route("/v1/uploads", post(h::create_upload))
        .route(
            "/v1/uploads/{id}",
            axum::routing::head(h::upload_offset)
                .patch(h::upload_append)
                .delete(h::upload_delete),
        )
        .route("/v1/uploads/{id}/complete", put(h::upload_complete))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            h::observe,
        ))
        .fallback(h::fallback)
        .method_not_allowed_fallback(h::method_not_allowed)
        .with_state(app)
}

/// A running server.
pub struct Handle {
    /// The address it listens on (the real port when asked for port 0).
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<Duration>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// Stops taking connections, closes open ones, and gives engine calls in progress up to
    /// `grace` to finish (an engine call is never cut in the middle by the runtime).
    pub fn shutdown(mut self, grace: Duration) {
        self.stop_and_join(grace);
    }

    fn stop_and_join(&mut self, grace: Duration) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(grace);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop_and_join(Duration::from_secs(5));
    }
}

/// Listens on `listen` (`HOST:PORT`) and serves the API over `vfs` from a runtime of its own
/// until the returned handle is shut down. Binding happens before it returns, so a bad address
/// or a port in use is an error here.
pub fn start(vfs: Arc<Vfs>, listen: &str, opts: ServerOptions) -> std::io::Result<Handle> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let expired = uploads::expire(vfs.store().root(), opts.upload_expiry);
    if expired > 0 {
        tracing::info!(uploads = expired, "expired uploads removed at start");
    }
    let max_head = opts.max_header_bytes.max(8192);
    let app = router(vfs, opts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("afs-http")
        .enable_all()
        .build()?;
    let (tx, mut rx) = tokio::sync::oneshot::channel::<Duration>();
    let listener = {
        let _g = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let thread = std::thread::Builder::new()
        .name("afs-http-main".into())
        .spawn(move || {
            let grace = rt.block_on(async move {
                loop {
                    tokio::select! {
                        g = &mut rx => break g.unwrap_or(Duration::ZERO),
                        acc = listener.accept() => {
                            let (sock, peer) = match acc {
                                Ok(a) => a,
                                Err(e) => {
                                    tracing::warn!("http: accept failed: {e}");
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            };
                            let _ = sock.set_nodelay(true);
                            let svc = TowerToHyperService::new(app.clone());
                            tokio::spawn(async move {
                                let conn = hyper::server::conn::http1::Builder::new()
                                    .timer(TokioTimer::new())
                                    .header_read_timeout(Duration::from_secs(30))
                                    .max_buf_size(max_head)
                                    .serve_connection(TokioIo::new(sock), svc);
                                if let Err(e) = conn.await {
                                    tracing::debug!(%peer, "http connection: {e}");
                                }
                            });
                        }
                    }
                }
            });
            // Connection tasks are dropped; engine calls on the blocking pool get up to `grace`.
            rt.shutdown_timeout(grace);
        })?;
    tracing::info!(%addr, "HTTP API listening");
    Ok(Handle {
        addr,
        stop: Some(tx),
        thread: Some(thread),
    })
}
