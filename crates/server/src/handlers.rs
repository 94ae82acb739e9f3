//! The route handlers: parse the request (paths only through [`crate::paths`]), make the
//! engine calls on the blocking pool, answer JSON or bytes.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use artifactfs_core::id::ManifestDigest;
use artifactfs_core::manifest::{Entry, Kind};
use artifactfs_core::stream::StreamOptions;
use artifactfs_core::{Error, RunRef};
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::App;
use crate::error::ApiError;
use crate::fsops::{self, Put, Reader};
use crate::paths::{self, RunPath, RunResource};
use crate::uploads;

type ApiResult<T = Response> = Result<T, ApiError>;

/// Bytes handed to the engine per blocking call when streaming a body.
const PIECE: usize = 1 << 20;
/// Bytes read from the engine per piece of a download.
const READ_PIECE: u32 = 1 << 20;
/// How often a waiting events poll looks for new events.
const EVENTS_POLL: Duration = Duration::from_millis(100);

/// Runs an engine call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await?
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

/// The run path of the request, which must name `want`.
fn run_path(req_path: &str, want: fn(&RunResource) -> bool) -> ApiResult<RunPath> {
    let p = paths::parse_run_path(req_path)?;
    if !want(&p.resource) {
        return Err(ApiError::not_found(format!("no route {req_path}")));
    }
    Ok(p)
}

/// Parses a query string into its pairs (percent-decoded, `+` as space).
fn query(req_query: Option<&str>) -> ApiResult<HashMap<String, String>> {
    let mut out = HashMap::new();
    for pair in req_query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::bad_request(format!("query {pair:?} is not UTF-8")))
        };
        out.insert(dec(k)?, dec(v)?);
    }
    Ok(out)
}

fn query_num<T: FromStr>(q: &HashMap<String, String>, key: &str) -> ApiResult<Option<T>> {
    q.get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("query {key}={v:?} is not a number")))
        })
        .transpose()
}

/// Reads a JSON body of at most `max` bytes (413 beyond, 400 if not the expected JSON).
async fn json_body<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: Body,
    max: usize,
    allow_empty: bool,
) -> ApiResult<Option<T>> {
    if let Some(len) = content_length(headers)?
        && len > max as u64
    {
        return Err(ApiError::too_large(format!(
            "a JSON body of {len} bytes (at most {max})"
        )));
    }
    let bytes = http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::too_large(format!("the JSON body is larger than {max} bytes"))
            } else {
                ApiError::bad_request(format!("the request body could not be read: {e}"))
            }
        })?
        .to_bytes();
    if bytes.is_empty() && allow_empty {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn content_length(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))
        })
        .transpose()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> ApiResult<Option<&'a str>> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request(format!("header {name} is not text")))
        })
        .transpose()
}

fn header_u64(headers: &HeaderMap, name: &str) -> ApiResult<Option<u64>> {
    header_str(headers, name)?
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| ApiError::bad_request(format!("header {name}: {v:?} is not a number")))
        })
        .transpose()
}

// ------------------------------------------------------------------------------------------
// Middleware and fallbacks

/// Gives each request an id (`x-request-id`), a span carrying it, a log line and metrics.
pub async fn observe(State(app): State<App>, req: Request, next: Next) -> Response {
    let n = app.next_request.fetch_add(1, Ordering::Relaxed);
    let id = format!("{:x}-{n}", std::process::id());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let took = started.elapsed();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    app.metrics.request(&method, &route, status, took);
    span.in_scope(|| {
        tracing::info!(status, micros = took.as_micros() as u64, "request done");
    });
    resp
}

pub async fn fallback(State(app): State<App>, req: Request) -> ApiResult {
    let path = req.uri().path();
    if path.starts_with(paths::RUNS_PREFIX) {
        match paths::parse_run_path(path) {
            Err(e) => return Err(e.into()),
            // `files/` with a trailing slash: the router's wildcard wants a non-empty rest.
            Ok(RunPath {
                resource: RunResource::File(_),
                ..
            }) if req.method() == axum::http::Method::GET
                || req.method() == axum::http::Method::HEAD =>
            {
                return get_file(State(app), req).await;
            }
            Ok(_) => {}
        }
    }
    Err(ApiError::not_found(format!(
        "no route {} {path}",
        req.method()
    )))
}

pub async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

// ------------------------------------------------------------------------------------------
// Service routes

pub async fn health() -> Response {
    json_response(StatusCode::OK, json!({"status": "ok"}))
}

pub async fn ready(State(app): State<App>) -> Response {
    let vfs = app.vfs.clone();
    match blocking(move || Ok(vfs.store().check_ready()?)).await {
        Ok(()) => json_response(StatusCode::OK, json!({"status": "ready"})),
        Err(e) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", e.message).into_response()
        }
    }
}

pub async fn metrics(State(app): State<App>) -> ApiResult {
    let a = app.clone();
    let figures = blocking(move || {
        let store = a.vfs.store();
        let stats = store.stats()?;
        let cache = a.vfs.cache_stats();
        let tier_pending = match store.tier() {
            Some(_) => store
                .tier_status()
                .ok()
                .map(|t| t.counts.pending_packs + t.counts.pending_manifests),
            None => None,
        };
        let gc_runs = {
            let mut seen = a.gc_seen.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let evs = store.events(seen.0, 10_000)?;
                let Some(last) = evs.last() else { break };
                seen.0 = last.seq;
                seen.1 += evs.iter().filter(|e| e.kind == "gc.finished").count() as u64;
            }
            seen.1
        };
        let space = store.disk_space()?;
        Ok(crate::metrics::StoreFigures {
            logical_bytes: stats.raw_bytes,
            unique_bytes: stats.chunk_raw_bytes,
            stored_bytes: stats.chunk_stored_bytes,
            runs_open: stats.runs_open,
            runs_sealed: stats.runs_sealed,
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            tier_pending,
            gc_runs,
            disk_free_bytes: space.free_bytes,
            reserve_held: space.reserve_held,
            lost_chunks: stats.lost_chunks,
        })
    })
    .await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(&figures),
    )
        .into_response())
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], crate::OPENAPI).into_response()
}

// ------------------------------------------------------------------------------------------
// Runs

pub async fn list_runs(State(app): State<App>, req: Request) -> ApiResult {
    let q = query(req.uri().query())?;
    let namespace = q.get("namespace").cloned();
    if let Some(ns) = &namespace {
        artifactfs_core::names::validate_component("namespace", ns, false)?;
    }
    let state = q.get("state").cloned();
    if let Some(s) = &state
        && !matches!(s.as_str(), "open" | "sealed" | "deleted")
    {
        return Err(ApiError::bad_request(format!(
            "state={s:?}: use open, sealed or deleted"
        )));
    }
    let limit = query_num::<usize>(&q, "limit")?
        .unwrap_or(100)
        .clamp(1, 1000);
    let cursor = query_num::<i64>(&q, "cursor")?.unwrap_or(0);
    let vfs = app.vfs.clone();
    let (runs, next) = blocking(move || {
        let mut rows = vfs.store().runs(namespace.as_deref())?;
        rows.sort_by_key(|r| r.id);
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.id > cursor && state.as_deref().is_none_or(|s| r.state == s))
            .collect();
        let more = rows.len() > limit;
        let page: Vec<Value> = rows.iter().take(limit).map(run_summary).collect();
        let next = if more {
            rows.get(limit - 1).map(|r| r.id)
        } else {
            None
        };
        Ok((page, next))
    })
    .await?;
    Ok(json_response(
        StatusCode::OK,
        json!({"runs": runs, "next_cursor": next.map(|n| n.to_string())}),
    ))
}

fn time(ns: i64) -> String {
    artifactfs_core::clock::rfc3339(artifactfs_core::clock::from_unix_ns(ns))
}

fn run_summary(r: &artifactfs_core::index::RunRow) -> Value {
    json!({
        "namespace": r.run.namespace,
        "run": r.run.run,
        "state": r.state,
        "digest": r.manifest.map(|d| d.to_string()),
        "created_at": time(r.created_at_ns),
        "sealed_at": r.sealed_at_ns.map(time),
        "files": r.files,
        "raw_bytes": r.raw_bytes,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRun {
    namespace: String,
    run: String,
    #[serde(default)]
    metadata: std::collections::BTreeMap<String, String>,
}

fn check_meta_key(k: &str) -> ApiResult<()> {
    if k.is_empty()
        || k.len() > 200
        || k.starts_with("artifactfs.")
        || k.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ApiError::bad_request(format!(
            "metadata key {k:?}: use non-empty text without spaces or control characters, \
             not starting with artifactfs."
        )));
    }
    Ok(())
}

pub async fn create_run(State(app): State<App>, req: Request) -> ApiResult {
    let (parts, body) = req.into_parts();
    let c: CreateRun = json_body(&parts.headers, body, app.opts.max_json_bytes, false)
        .await?
        .ok_or_else(|| ApiError::bad_request("a JSON body is needed"))?;
    let r = RunRef::new(&c.namespace, &c.run)?;
    for k in c.metadata.keys() {
        check_meta_key(k)?;
    }
    let meta: Vec<(String, String)> = c.metadata.into_iter().collect();
    let vfs = app.vfs.clone();
    let r2 = r.clone();
    blocking(move || Ok(fsops::create_run(&vfs, &r2, &meta)?)).await?;
    tracing::info!(run = %r, "run created");
    let loc = format!(
        "/v1/runs/{}/{}",
        encode_segment(&r.namespace),
        encode_segment(&r.run)
    );
    let mut resp = json_response(
        StatusCode::CREATED,
        json!({"namespace": r.namespace, "run": r.run, "state": "open", "location": loc}),
    );
    if let Ok(v) = HeaderValue::from_str(&loc) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub async fn run_info(State(app): State<App>, req: Request) -> ApiResult {
    let p = run_path(req.uri().path(), |r| *r == RunResource::Run)?;
    // Read before the details: an answer kept under it is no older than any commit that had
    // returned by now (ADR 0022).
    let generation = artifactfs_core::index::commit_generation();
    if let Some(body) = app
        .run_info
        .get(&p.run, generation, app.vfs.store().now_ns())
    {
        return Ok(json_bytes(body));
    }
    // A short read of committed state: on this worker when a pooled read connection is idle
    // (no hand-off to a blocking thread, ADR 0020), else on a blocking thread, which may wait.
    let d = match app.vfs.store().run_details_now(&p.run) {
        Some(d) => d?,
        None => {
            let vfs = app.vfs.clone();
            let run = p.run.clone();
            blocking(move || Ok(vfs.store().run_details(&run)?)).await?
        }
    };
    let (at_ns, until_ns) = (d.as_of_ns, d.valid_until_ns());
    let meta: serde_json::Map<String, Value> = d
        .meta
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let ret = d.retention;
    let mut v = run_summary(&d.row);
    v["retention"] = json!({
        "retain": ret.retain,
        "retain_until": ret.retain_until,
        "eligible": ret.eligible,
    });
    v["holds"] = serde_json::to_value(&ret.holds).unwrap_or_default();
    v["metadata"] = Value::Object(meta);
    let body = Bytes::from(serde_json::to_vec(&v).map_err(|e| ApiError::internal(e.to_string()))?);
    app.run_info
        .put(p.run, generation, at_ns, until_ns, body.clone());
    Ok(json_bytes(body))
}

/// A 200 answer of JSON already serialized.
fn json_bytes(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub async fn run_manifest(State(app): State<App>, req: Request) -> ApiResult {
    let p = run_path(req.uri().path(), |r| *r == RunResource::Manifest)?;
    let vfs = app.vfs.clone();
    let (digest, bytes) = blocking(move || {
        let row = vfs.store().run(&p.run)?;
        if row.manifest.is_none() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "state",
                format!("run {} is {}: it has no manifest yet", p.run, row.state),
            ));
        }
        Ok(vfs.store().manifest_bytes(&p.run)?)
    })
    .await?;
    Ok(manifest_response(&digest, bytes))
}

fn manifest_response(digest: &ManifestDigest, bytes: Vec<u8>) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, "application/json")], bytes).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

pub async fn manifest_by_digest(State(app): State<App>, req: Request) -> ApiResult {
    let raw = req
        .uri()
        .path()
        .strip_prefix("/v1/manifests/")
        .unwrap_or_default()
        .to_owned();
    let digest = ManifestDigest::from_str(&raw)
        .map_err(|_| ApiError::bad_request(format!("{raw:?} is not a manifest digest")))?;
    let vfs = app.vfs.clone();
    let bytes = blocking(move || {
        let store = vfs.store();
        let known = store.runs(None)?.iter().any(|r| r.manifest == Some(digest));
        if !known {
            return Err(ApiError::not_found(format!("no run has manifest {digest}")));
        }
        Ok(artifactfs_core::manifest::load_manifest_bytes(
            store.objects(),
            &digest,
        )?)
    })
    .await?;
    Ok(manifest_response(&digest, bytes))
}

pub async fn seal(State(app): State<App>, req: Request) -> ApiResult {
    let p = run_path(req.uri().path(), |r| *r == RunResource::Seal)?;
    let vfs = app.vfs.clone();
    let started = Instant::now();
    let (digest, already) = blocking(move || {
        let row = vfs.store().run(&p.run)?;
        if let Some(d) = row.manifest {
            return Ok((d, true));
        }
        Ok((vfs.seal(&p.run)?, false))
    })
    .await?;
    if !already {
        app.metrics.seal(started.elapsed());
    }
    Ok(json_response(
        StatusCode::OK,
        json!({"state": "sealed", "digest": digest.to_string(), "already_sealed": already}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRetention {
    value: String,
    #[serde(default, rename = "override")]
    override_: bool,
    #[serde(default)]
    reason: Option<String>,
}

pub async fn retention(State(app): State<App>, req: Request) -> ApiResult {
    let p = run_path(req.uri().path(), |r| *r == RunResource::Retention)?;
    let (parts, body) = req.into_parts();
    let s: SetRetention = json_body(&parts.headers, body, app.opts.max_json_bytes, false)
        .await?
        .ok_or_else(|| ApiError::bad_request("a JSON body {\"value\": ...} is needed"))?;
    if s.override_ && s.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err(Error::invalid(
            "override",
            "needs a reason: the override is recorded with it",
        )
        .into());
    }
    if s.reason.is_some() && !s.override_ {
        return Err(Error::invalid("reason", "is given with override").into());
    }
    let vfs = app.vfs.clone();
    let info = blocking(move || {
        let reason = s.reason.unwrap_or_default();
        let info =
            vfs.store()
                .set_retention(&p.run, &s.value, s.override_.then_some(reason.as_str()))?;
        vfs.store_changed();
        Ok(info)
    })
    .await?;
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_value(&info).unwrap_or_default(),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HoldBody {
    #[serde(default)]
    reason: String,
}

pub async fn place_hold(State(app): State<App>, req: Request) -> ApiResult {
    let p = run_path(req.uri().path(), |r| matches!(r, RunResource::Hold(_)))?;
    let RunResource::Hold(name) = p.resource.clone() else {
        unreachable!("checked by run_path")
    };
    let (parts, body) = req.into_parts();
    let b: HoldBody = json_body(&parts.headers, body, app.opts.max_json_bytes, true)
        .await?
        .unwrap_or_default();
    let vfs = app.vfs.clone();
    let holds = blocking(move || {
        vfs.store().place_hold(&p.run, &name, b.reason.as_bytes())?;
        vfs.store_changed();
        Ok(vfs.store().holds(&p.run)?)
    })
    .await?;
    Ok(json_response(
        StatusCode::OK,
        json!({"holds": serde_json::to_value(&holds).unwrap_or_default()}),
    ))
}

pub async fn remove_hold(State(app): State<App>, req: Request) -> ApiResult {
    let p = run_path(req.uri().path(), |r| matches!(r, RunResource::Hold(_)))?;
    let RunResource::Hold(name) = p.resource.clone() else {
        unreachable!("checked by run_path")
    };
    let vfs = app.vfs.clone();
    let holds = blocking(move || {
        vfs.store().remove_hold(&p.run, &name)?;
        vfs.store_changed();
        Ok(vfs.store().holds(&p.run)?)
    })
    .await?;
    Ok(json_response(
        StatusCode::OK,
        json!({"holds": serde_json::to_value(&holds).unwrap_or_default()}),
    ))
}

// ------------------------------------------------------------------------------------------
// Files

/// A single byte range asked for. `None` (the whole file is sent) when the header asks for
/// several ranges, uses a unit other than bytes, or does not parse: RFC 9110 lets a server
/// ignore those, and requires it for an unknown unit. `Err` only for a well-formed range the
/// file cannot satisfy (416).
fn parse_range(h: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.saturating_sub(1))
    } else {
        let Ok(s) = a.parse::<u64>() else {
            return Ok(None);
        };
        let e = if b.is_empty() {
            u64::MAX
        } else {
            match b.parse::<u64>() {
                Ok(e) if e >= s => e,
                _ => return Ok(None),
            }
        };
        (s, e.min(size.saturating_sub(1)))
    };
    if size == 0 || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

fn etag_matches(inm: &str, etag: &str) -> bool {
    inm.split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

pub async fn get_file(State(app): State<App>, req: Request) -> ApiResult {
    let p = run_path(req.uri().path(), |r| matches!(r, RunResource::File(_)))?;
    let RunResource::File(path) = p.resource.clone() else {
        unreachable!("checked by run_path")
    };
    let vfs = app.vfs.clone();
    let run = p.run.clone();
    enum Found {
        Dir(Vec<fsops::ListEntry>),
        File(artifactfs_core::vfs::Attr, Option<Box<Entry>>),
    }
    let found = blocking(move || {
        let a = fsops::resolve(&vfs, &run, &path)?;
        match a.kind {
            Kind::Dir => Ok(Found::Dir(fsops::list(&vfs, &a)?)),
            Kind::File => {
                let sealed = fsops::sealed_entry(&vfs, &run, &path)?;
                Ok(Found::File(a, sealed.map(Box::new)))
            }
            other => Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_a_file",
                format!("{run}/{path} is a {}, not a file", other.as_str()),
            )),
        }
    })
    .await?;
    let (attr, sealed) = match found {
        Found::Dir(entries) => {
            return Ok(json_response(
                StatusCode::OK,
                json!({"type": "dir", "entries": entries}),
            ));
        }
        Found::File(a, h) => (a, h),
    };
    let etag = sealed
        .as_ref()
        .and_then(|e| e.blake3)
        .map(|h| format!("\"{}\"", h.to_hex()));
    let headers = req.headers();
    if let (Some(tag), Some(inm)) = (&etag, header_str(headers, "if-none-match")?)
        && etag_matches(inm, tag)
    {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut()
            .insert(header::ETAG, HeaderValue::from_str(tag).expect("hex etag"));
        return Ok(resp);
    }
    let size = sealed.as_ref().map_or(attr.size, |e| e.size);
    let range = match header_str(headers, "range")? {
        None => None,
        Some(h) => match parse_range(h, size) {
            Ok(r) => r,
            Err(()) => {
                let mut resp = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range",
                    format!("range {h:?} is not satisfiable for {size} bytes"),
                )
                .into_response();
                resp.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
                );
                return Ok(resp);
            }
        },
    };
    let (start, end_excl) = match range {
        Some((s, e)) => (s, e + 1),
        None => (0, size),
    };
    let body = match sealed {
        Some(entry) => sealed_body(&app, p.run.clone(), *entry, start..end_excl),
        None => open_body(&app, attr.ino, start, end_excl).await?,
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end_excl - start));
    if let Some(tag) = &etag {
        h.insert(header::ETAG, HeaderValue::from_str(tag).expect("hex etag"));
    }
    if range.is_some() {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end_excl - 1))
                .expect("ascii"),
        );
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}

/// Chunks of a sealed file in flight between the engine's producer and the response body.
const DOWNLOAD_QUEUE: usize = 8;

/// The body of a download of a sealed file: one blocking producer walks the file's chunks in
/// the engine ([`artifactfs_core::Store::stream_file`]: decoded ahead in parallel, each
/// verified, shared with the view's chunk cache, both ways) and hands them, uncopied, to the body through a
/// bounded channel. A chunk that cannot be read or is damaged ends the body with an error, so
/// the connection is cut before Content-Length is reached; the error is logged with the run
/// and the path. A client that goes away stops the producer at its next chunk.
fn sealed_body(app: &App, run: RunRef, entry: Entry, range: std::ops::Range<u64>) -> Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(DOWNLOAD_QUEUE);
    let vfs = app.vfs.clone();
    tokio::task::spawn_blocking(move || {
        let cached = |id: &artifactfs_core::id::ChunkId| vfs.cached_chunk(id);
        let opts = StreamOptions {
            cached: Some(&cached),
            ..StreamOptions::default()
        };
        // A file that fits in the view's cache keeps its decoded chunks there, so the next
        // download of it decodes nothing (ADR 0021); a larger one would only push out what
        // the mount reads, and be evicted before it is read again.
        let keep = entry.size <= vfs.chunk_cache_capacity();
        let mut gone = false;
        let res = vfs
            .store()
            .stream_file(&entry, range.clone(), &opts, &mut |piece| {
                if keep {
                    vfs.keep_chunk(&piece.id, piece.chunk.clone());
                }
                if tx.blocking_send(Ok(fsops::piece_bytes(piece))).is_err() {
                    gone = true;
                    return Err(Error::State("the client went away".into()));
                }
                Ok(())
            });
        match res {
            Ok(n) => tracing::debug!(run = %run, path = %entry.path, bytes = n, "file sent"),
            Err(_) if gone => {
                tracing::debug!(run = %run, path = %entry.path, "download ended by the client");
            }
            Err(e) => {
                if e.is_damage() {
                    tracing::error!(run = %run, path = %entry.path, "download cut: {e}");
                } else {
                    tracing::warn!(run = %run, path = %entry.path, "download cut: {e}");
                }
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// The body of a download of an open run's file: read through the file-system view (the file
/// may be written meanwhile), [`READ_PIECE`] bytes per blocking call.
async fn open_body(app: &App, ino: u64, start: u64, end_excl: u64) -> ApiResult<Body> {
    let vfs = app.vfs.clone();
    let reader = Arc::new(blocking(move || Ok(Reader::open(vfs, ino)?)).await?);
    let stream = futures_util::stream::try_unfold(start, move |pos| {
        let reader = reader.clone();
        async move {
            if pos >= end_excl {
                return Ok::<_, ApiError>(None);
            }
            let want = (end_excl - pos).min(u64::from(READ_PIECE)) as u32;
            let data = blocking(move || Ok(reader.read(pos, want)?)).await?;
            if data.is_empty() {
                return Err(ApiError::internal(format!(
                    "the file ended at {pos} bytes, before the {end_excl} announced"
                )));
            }
            let next = pos + data.len() as u64;
            Ok(Some((Bytes::from(data), next)))
        }
    })
    .map(|r| r.map_err(|e| std::io::Error::other(e.message)));
    Ok(Body::from_stream(stream))
}

/// Streams `body` into `put` in pieces of [`PIECE`] bytes; returns the put, its BLAKE3 and
/// the bytes written. A body that breaks off (shorter than its Content-Length, a dropped
/// connection) is an error, and the put is dropped: nothing is committed.
/// Bodies of at most this many bytes (by their Content-Length) are read whole before the
/// engine is called and stored by one blocking call: a small file's upload hands off to the
/// blocking pool once, not three times (begin, write, commit). Memory stays bounded: this much
/// per request at most.
const SMALL_PUT: u64 = 256 << 10;

/// Reads a body of `len` declared bytes whole (fewer if it ends early: the caller compares).
async fn read_whole(body: Body, len: u64) -> ApiResult<Vec<u8>> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request(format!(
                "the request body broke off after {} bytes: {e}",
                buf.len()
            ))
        })?;
        if (buf.len() + chunk.len()) as u64 > len {
            return Err(ApiError::bad_request(format!(
                "Content-Length said {len} bytes, the body had more"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

async fn stream_into(
    mut put: Put,
    stream: &mut BodyDataStream,
    counter: Option<&std::sync::atomic::AtomicU64>,
) -> ApiResult<(Put, blake3::Hasher)> {
    let mut buf: Vec<u8> = Vec::with_capacity(PIECE);
    let mut hasher = blake3::Hasher::new();
    loop {
        let next = stream.next().await;
        let last = next.is_none();
        if let Some(chunk) = next {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!(
                    "the request body broke off after {} bytes: {e}",
                    put.written + buf.len() as u64
                ))
            })?;
            buf.extend_from_slice(&chunk);
        }
        if buf.len() >= PIECE || (last && !buf.is_empty()) {
            let data = std::mem::replace(&mut buf, Vec::with_capacity(PIECE));
            let n = data.len() as u64;
            let (p, h) = blocking(move || {
                put.write(&data)?;
                hasher.update(&data);
                Ok((put, hasher))
            })
            .await?;
            put = p;
            hasher = h;
            if let Some(c) = counter {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        if last {
            return Ok((put, hasher));
        }
    }
}

/// At most this much of a refused body is read and thrown away before the error is answered.
const LINGER_BYTES: u64 = 1 << 30;
/// For at most this long in all, and no longer than [`LINGER_IDLE`] without data.
const LINGER_TIME: Duration = Duration::from_secs(30);
const LINGER_IDLE: Duration = Duration::from_secs(5);

/// Reads and discards what is left of a request body that an error cut short, within bounds,
/// so that a client still writing it reads the error (a 507 on a full disk, say) instead of a
/// connection reset under its write. Beyond the bounds the connection closes as before. A
/// client that asked `Expect: 100-continue` and was not yet told to go on sends nothing more,
/// so its body is left alone.
async fn linger(parts: &axum::http::request::Parts, stream: &mut BodyDataStream, read: bool) {
    let waiting = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if waiting && !read {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut dropped = 0u64;
    while dropped < LINGER_BYTES {
        let idle = tokio::time::Instant::now() + LINGER_IDLE;
        match tokio::time::timeout_at(deadline.min(idle), stream.next()).await {
            Ok(Some(Ok(chunk))) => dropped += chunk.len() as u64,
            Ok(Some(Err(_)) | None) => return,
            Err(_) => break,
        }
    }
    tracing::debug!(dropped, "stopped reading a refused request body");
}

pub async fn put_file(State(app): State<App>, req: Request) -> ApiResult {
    let p = run_path(req.uri().path(), |r| matches!(r, RunResource::File(_)))?;
    let RunResource::File(path) = p.resource.clone() else {
        unreachable!("checked by run_path")
    };
    if path.is_empty() {
        return Err(ApiError::bad_request(
            "PUT needs a file path inside the run",
        ));
    }
    let (parts, body) = req.into_parts();
    let declared = content_length(&parts.headers)?;
    let vfs = app.vfs.clone();
    let (run, path2) = (p.run.clone(), path.clone());
    let wrong_length = |d: u64, had: u64| {
        ApiError::bad_request(format!("Content-Length said {d} bytes, the body had {had}"))
    };
    let (size, hash) = match declared {
        // A small body is read whole first, then stored by one engine call.
        Some(d) if d <= SMALL_PUT => {
            let data = read_whole(body, d).await?;
            if data.len() as u64 != d {
                return Err(wrong_length(d, data.len() as u64));
            }
            let stored = blocking(move || {
                let mut put = Put::begin(vfs, &run, &path2)?;
                put.write(&data)?;
                Ok((put.commit()?, blake3::hash(&data)))
            })
            .await?;
            app.metrics.ingest_bytes.fetch_add(d, Ordering::Relaxed);
            stored
        }
        _ => {
            let mut stream = body.into_data_stream();
            let mut read = false;
            let stored = async {
                let put = blocking(move || Ok(Put::begin(vfs, &run, &path2)?)).await?;
                read = true;
                let (put, hasher) =
                    stream_into(put, &mut stream, Some(&app.metrics.ingest_bytes)).await?;
                if let Some(d) = declared
                    && d != put.written
                {
                    return Err(wrong_length(d, put.written));
                }
                let size = blocking(move || Ok(put.commit()?)).await?;
                Ok((size, hasher.finalize()))
            }
            .await;
            if stored.is_err() {
                linger(&parts, &mut stream, read).await;
            }
            stored?
        }
    };
    let hash = hash.to_hex().to_string();
    tracing::info!(run = %p.run, path = %path, bytes = size, "file stored");
    Ok(json_response(
        StatusCode::CREATED,
        json!({"path": path, "size": size, "blake3": hash}),
    ))
}

// ------------------------------------------------------------------------------------------
// Events

pub async fn events(State(app): State<App>, req: Request) -> ApiResult {
    let q = query(req.uri().query())?;
    let after = query_num::<i64>(&q, "after")?.unwrap_or(0);
    let limit = query_num::<usize>(&q, "limit")?
        .unwrap_or(100)
        .clamp(1, 1000);
    let wait = match q.get("wait") {
        None => Duration::ZERO,
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| ApiError::bad_request(format!("wait={w:?}: {e}")))?,
    }
    .min(app.opts.max_wait);
    let deadline = Instant::now() + wait;
    loop {
        let vfs = app.vfs.clone();
        let evs = blocking(move || Ok(vfs.store().events(after, limit)?)).await?;
        if !evs.is_empty() || Instant::now() >= deadline {
            let v: Vec<Value> = evs
                .iter()
                .map(|e| {
                    json!({
                        "seq": e.seq,
                        "at": time(e.at_ns),
                        "kind": e.kind,
                        "namespace": e.namespace,
                        "run": e.run,
                        "detail": e.detail,
                    })
                })
                .collect();
            return Ok(json_response(StatusCode::OK, Value::Array(v)));
        }
        tokio::time::sleep(EVENTS_POLL.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

// ------------------------------------------------------------------------------------------
// Resumable uploads

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUpload {
    namespace: String,
    run: String,
    path: String,
}

fn tus_headers(resp: &mut Response, offset: u64, length: Option<u64>) {
    let h = resp.headers_mut();
    h.insert("tus-resumable", HeaderValue::from_static("1.0.0"));
    h.insert("upload-offset", HeaderValue::from(offset));
    if let Some(l) = length {
        h.insert("upload-length", HeaderValue::from(l));
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn upload_id(path: &str) -> ApiResult<String> {
    let id = path
        .strip_prefix("/v1/uploads/")
        .unwrap_or_default()
        .trim_end_matches("/complete");
    if !uploads::valid_id(id) {
        return Err(ApiError::bad_request(format!("{id:?} is not an upload id")));
    }
    Ok(id.to_owned())
}

/// Marks an upload busy for the life of the guard; a second request on it gets 409.
struct BusyGuard(App, String);

impl BusyGuard {
    fn take(app: &App, id: &str) -> ApiResult<Self> {
        let mut b = app.busy_uploads.lock().unwrap_or_else(|p| p.into_inner());
        if !b.insert(id.to_owned()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "busy",
                format!("upload {id} is being written by another request"),
            ));
        }
        Ok(Self(app.clone(), id.to_owned()))
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0
            .busy_uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

pub async fn create_upload(State(app): State<App>, req: Request) -> ApiResult {
    let (parts, body) = req.into_parts();
    let length = header_u64(&parts.headers, "upload-length")?;
    let c: CreateUpload = json_body(&parts.headers, body, app.opts.max_json_bytes, false)
        .await?
        .ok_or_else(|| ApiError::bad_request("a JSON body {namespace, run, path} is needed"))?;
    let r = RunRef::new(&c.namespace, &c.run)?;
    let path = paths::parse_file_path(&c.path)?;
    let vfs = app.vfs.clone();
    let expiry = app.opts.upload_expiry;
    let id = blocking(move || {
        fsops::require_open(&vfs, &r)?;
        let root = vfs.store().root();
        uploads::expire(root, expiry);
        let meta = uploads::UploadMeta {
            namespace: r.namespace,
            run: r.run,
            path,
            length,
            created_ns: artifactfs_core::clock::to_unix_ns(std::time::SystemTime::now()),
        };
        uploads::create(root, &meta)
    })
    .await?;
    let loc = format!("/v1/uploads/{id}");
    let mut resp = json_response(StatusCode::CREATED, json!({"id": id, "location": loc}));
    tus_headers(&mut resp, 0, length);
    resp.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&loc).expect("ascii"),
    );
    Ok(resp)
}

pub async fn upload_offset(State(app): State<App>, req: Request) -> ApiResult {
    let id = upload_id(req.uri().path())?;
    let vfs = app.vfs.clone();
    let (meta, offset) = blocking(move || uploads::state(vfs.store().root(), &id)).await?;
    let mut resp = StatusCode::OK.into_response();
    tus_headers(&mut resp, offset, meta.length);
    Ok(resp)
}

pub async fn upload_append(State(app): State<App>, req: Request) -> ApiResult {
    let id = upload_id(req.uri().path())?;
    let (parts, body) = req.into_parts();
    let offset = header_u64(&parts.headers, "upload-offset")?
        .ok_or_else(|| ApiError::bad_request("PATCH needs an Upload-Offset header"))?;
    let _busy = BusyGuard::take(&app, &id)?;
    let vfs = app.vfs.clone();
    let id2 = id.clone();
    let (file, meta) =
        blocking(move || uploads::open_append(vfs.store().root(), &id2, offset)).await?;
    let file = Arc::new(file);
    let mut at = offset;
    let mut stream = body.into_data_stream();
    let mut failure: Option<ApiError> = None;
    let written: ApiResult<()> = async {
        let mut buf: Vec<u8> = Vec::with_capacity(PIECE);
        loop {
            let next = stream.next().await;
            let last = next.is_none();
            match next {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    failure = Some(ApiError::bad_request(format!(
                        "the request body broke off at offset {}: {e}",
                        at + buf.len() as u64
                    )));
                }
                None => {}
            }
            let stop = last || failure.is_some();
            if let Some(l) = meta.length
                && at + buf.len() as u64 > l
            {
                failure = Some(ApiError::too_large(format!(
                    "upload {id} is {l} bytes long; this would write past its end"
                )));
                buf.clear();
            }
            if buf.len() >= PIECE || (stop && !buf.is_empty()) {
                let data = std::mem::replace(&mut buf, Vec::with_capacity(PIECE));
                let f = file.clone();
                let n = data.len() as u64;
                blocking(move || {
                    use std::io::Write;
                    (&*f).write_all(&data)?;
                    Ok(())
                })
                .await?;
                at += n;
                app.metrics.upload_bytes.fetch_add(n, Ordering::Relaxed);
            }
            if stop || failure.is_some() {
                return Ok(());
            }
        }
    }
    .await;
    if written.is_err() || failure.is_some() {
        linger(&parts, &mut stream, true).await;
    }
    // What was received is durable before the offset is reported, also when the body broke
    // off: the client resumes from there.
    let f = file.clone();
    let synced = blocking(move || Ok(f.sync_all()?)).await;
    written?;
    synced?;
    if let Some(e) = failure {
        return Err(e);
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    tus_headers(&mut resp, at, meta.length);
    Ok(resp)
}

pub async fn upload_delete(State(app): State<App>, req: Request) -> ApiResult {
    let id = upload_id(req.uri().path())?;
    let _busy = BusyGuard::take(&app, &id)?;
    let vfs = app.vfs.clone();
    blocking(move || uploads::remove(vfs.store().root(), &id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Complete {
    blake3: Option<String>,
}

pub async fn upload_complete(State(app): State<App>, req: Request) -> ApiResult {
    let id = upload_id(req.uri().path())?;
    let (parts, body) = req.into_parts();
    let from_header = header_str(&parts.headers, "upload-blake3")?.map(str::to_owned);
    let b: Complete = json_body(&parts.headers, body, app.opts.max_json_bytes, true)
        .await?
        .unwrap_or_default();
    let want = from_header.or(b.blake3).ok_or_else(|| {
        ApiError::bad_request(
            "completing an upload needs its BLAKE3 (Upload-Blake3 or {\"blake3\"})",
        )
    })?;
    let want = want.trim().to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(format!(
            "{want:?} is not a BLAKE3 hash (64 hex digits)"
        )));
    }
    let _busy = BusyGuard::take(&app, &id)?;
    let vfs = app.vfs.clone();
    let want2 = want.clone();
    let (path, size) = blocking(move || {
        let want = want2;
        let root = vfs.store().root().to_path_buf();
        let (meta, offset) = uploads::state(&root, &id)?;
        if let Some(l) = meta.length
            && l != offset
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "incomplete",
                format!("upload {id} has {offset} of its {l} bytes"),
            ));
        }
        let (got, n) = uploads::hash(&root, &id)?;
        if got != want {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "digest_mismatch",
                format!("upload {id}: its {n} bytes have BLAKE3 {got}, not {want}; nothing was committed"),
            ));
        }
        let r = meta.run_ref();
        let mut put = Put::begin(vfs.clone(), &r, &meta.path)?;
        let mut f = uploads::data(&root, &id)?;
        let mut buf = vec![0u8; PIECE];
        loop {
            let k = std::io::Read::read(&mut f, &mut buf)?;
            if k == 0 {
                break;
            }
            put.write(&buf[..k])?;
        }
        let size = put.commit()?;
        uploads::remove(&root, &id)?;
        tracing::info!(upload = %id, run = %r, path = %meta.path, bytes = size, "upload committed");
        Ok((meta.path, size))
    })
    .await?;
    Ok(json_response(
        StatusCode::CREATED,
        json!({"path": path, "size": size, "blake3": want}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=0-0", 0).is_err());
        assert!(parse_range("bytes=-0", 100).is_err());
        // Not understood: ignored, the whole file is sent.
        assert_eq!(parse_range("bytes=5-2", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=abc", 100), Ok(None));
        assert_eq!(parse_range("bytes=1-x", 100), Ok(None));
    }
}
