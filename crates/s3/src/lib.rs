//! The object store over S3 and Ceph RGW: [`S3Store`] implements core's synchronous
//! [`ObjectStore`] with `aws-sdk-s3`.
//!
//! What it owns: turning store keys into S3 object names under one bucket and prefix
//! (`PREFIX/key`), uploads (one `PutObject` up to [`S3Config::multipart_threshold`], a
//! multipart upload above it, aborted when any step fails; every request body carries a
//! `Content-MD5`, which the server checks before it stores anything, and `HeadObject`
//! afterwards checks the stored size and, when it is an MD5 form, the `ETag`), whole and ranged reads, paginated listing, deletes, the storage
//! class of new objects, retries and timeouts, and mapping every failure to core's
//! [`Error`] with the endpoint, bucket, operation and key in it. What it must not do: cache,
//! decide what to tier or when, or know anything about packs and manifests; that is the
//! engine's. Only this crate imports `aws_sdk_*` or `tokio`.
//!
//! # The sync-over-async seam
//!
//! The engine is synchronous (plain threads, ADR 0006) and the SDK is async. Each
//! [`S3Store`] owns one multi-thread tokio runtime with two worker threads; every trait method
//! builds its future and blocks the calling thread on that runtime. The engine's threads are
//! never runtime threads, but a caller that *is* on some tokio runtime (a future server) must
//! not block it with `Runtime::block_on` (tokio panics): in that case the call is handed to a
//! short-lived scoped thread that blocks instead. The parts of a multipart upload are sent a
//! few at a time on the runtime. Dropping the store shuts the runtime down in the background,
//! which is allowed from any context.
//!
//! # Configuration
//!
//! [`S3Config`] names the bucket and prefix and may fix the endpoint, region, credentials and
//! storage class; anything it leaves out comes from the standard AWS sources through
//! `aws-config` (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_ENDPOINT_URL`, `AWS_REGION`, profiles). With no region anywhere, `us-east-1` is used
//! (RGW accepts any). [`S3Store::open`] checks the bucket with `HeadBucket`, so a missing
//! bucket, wrong keys or an unreachable endpoint fail at start with a message naming the
//! endpoint and bucket, not at the first pack upload.
//!
//! # Errors and retries
//!
//! The SDK's standard retry strategy (exponential backoff with jitter,
//! [`S3Config::max_attempts`] attempts) retries throttling, 5xx, timeouts and connection
//! failures. What is left is mapped to [`Error::Backend`] with `retryable` true exactly for
//! those classes (network, timeout, 5xx, throttling), so a tiering scheduler can try again
//! later; a 404 on `get`/`get_range` is [`Error::MissingObject`]; a range past the end of the
//! object is [`Error::Corrupt`], as the trait requires.
//!
//! # Ceph RGW quirks handled here
//!
//! - Path-style addressing only (`http://host:port/bucket/key`): `force_path_style(true)`.
//! - With the SDK's default checksum settings every upload carries a streaming checksum
//!   trailer (`aws-chunked` encoding) that RGW refuses with 400 `XAmzContentSHA256Mismatch`:
//!   checksums are computed and validated only when an operation requires them.
//! - `CompleteMultipartUpload` answers with an empty `ETag`: the upload is checked with
//!   `HeadObject` instead.
//! - Only the storage classes configured in the zone placement exist (`STANDARD`, and
//!   `STANDARD_IA` in the test gateway); any other is refused with `InvalidArgument`.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use artifactfs_core::error::{Error, Result};
use artifactfs_core::objstore::{ObjectMeta, ObjectStore};
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, StorageClass};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use md5::{Digest, Md5};

const MIB: usize = 1024 * 1024;
/// S3's smallest part (all but the last).
const MIN_PART: usize = 5 * MIB;
/// Parts of one multipart upload in flight at once.
const PART_CONCURRENCY: usize = 4;

/// Static credentials given in the configuration instead of the standard sources.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Where and how an [`S3Store`] keeps its objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket; it must exist.
    pub bucket: String,
    /// Prepended to every key as `PREFIX/key`; empty for the bucket's root. No leading or
    /// trailing `/`.
    pub prefix: String,
    /// `http(s)://host:port`; `None` for the standard sources (`AWS_ENDPOINT_URL`, profile,
    /// AWS's own endpoints).
    pub endpoint: Option<String>,
    /// `None` for the standard sources, then `us-east-1`.
    pub region: Option<String>,
    /// `None` for the standard sources (environment, profiles, …).
    pub credentials: Option<S3Credentials>,
    /// Storage class of new objects; `None` for the bucket's default (`STANDARD`).
    pub storage_class: Option<String>,
    /// Objects larger than this are sent as multipart uploads (default 32 MiB: a pack of the
    /// default 16 MiB target, which runs a little over it, goes in one request; the engine
    /// uploads several packs at once).
    pub multipart_threshold: usize,
    /// Size of each part but the last; at least 5 MiB.
    pub part_size: usize,
    /// Attempts per request, the first included (throttling, 5xx, network failures).
    pub max_attempts: u32,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Time for one attempt of one request, body included (a 16 MiB object or one part).
    pub attempt_timeout: Duration,
    /// Time for one request, all its attempts and backoff included.
    pub operation_timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            credentials: None,
            storage_class: None,
            multipart_threshold: 32 * MIB,
            part_size: 8 * MIB,
            max_attempts: 5,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(120),
            operation_timeout: Duration::from_secs(300),
        }
    }
}

impl S3Config {
    /// A configuration for `bucket` with every other field at its default.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            ..Self::default()
        }
    }

    /// Parses `s3://BUCKET` or `s3://BUCKET/PREFIX` (other fields at their defaults).
    pub fn from_url(url: &str) -> Result<Self> {
        let bad = |reason: &str| Error::invalid(format!("S3 URL {url:?}"), reason);
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("must start with s3://"))?;
        if rest.contains(['?', '#']) {
            return Err(bad("query strings and fragments are not supported"));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let cfg = Self {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_end_matches('/').to_owned(),
            ..Self::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `s3://bucket/prefix` form of the bucket and prefix.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn validate(&self) -> Result<()> {
        let b = &self.bucket;
        let bucket_ok = (3..=63).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
            && !b.starts_with(['.', '-'])
            && !b.ends_with(['.', '-']);
        if !bucket_ok {
            return Err(Error::invalid(
                "S3 bucket name",
                format!("{b:?}: 3-63 characters of a-z, 0-9, '.' and '-'"),
            ));
        }
        if !self.prefix.is_empty() && !key_ok(&self.prefix) {
            return Err(Error::invalid(
                "S3 prefix",
                format!(
                    "{:?}: '/'-separated names, no empty, '.' or '..' component",
                    self.prefix
                ),
            ));
        }
        if self.part_size < MIN_PART {
            return Err(Error::invalid(
                "S3 part size",
                format!("{} bytes: S3 needs at least {MIN_PART}", self.part_size),
            ));
        }
        if self.max_attempts == 0 {
            return Err(Error::invalid("S3 max attempts", "must be at least 1"));
        }
        Ok(())
    }
}

/// The same key rule as core's local stores: relative, `/`-separated, no empty, `.`, `..` or
/// `.tmp*` component.
fn key_ok(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with(".tmp"))
}

/// An [`ObjectStore`] in an S3 bucket (Ceph RGW, AWS, or anything speaking S3).
pub struct S3Store {
    client: Client,
    runtime: Option<tokio::runtime::Runtime>,
    bucket: String,
    /// `PREFIX/`, or empty.
    prefix: String,
    storage_class: Option<StorageClass>,
    multipart_threshold: usize,
    part_size: usize,
    /// `s3://bucket/prefix`.
    url: String,
    /// `s3://bucket/prefix at ENDPOINT`, for error messages.
    backend: String,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// What went wrong with one request, before it becomes an [`Error`].
struct Failure {
    status: Option<u16>,
    code: Option<String>,
    retryable: bool,
    message: String,
}

impl Failure {
    fn from_sdk<E>(err: &SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err
            .as_service_error()
            .and_then(|e| e.code())
            .map(str::to_owned);
        let detail = err
            .as_service_error()
            .and_then(|e| e.message())
            .map(str::to_owned);
        let throttled = matches!(
            code.as_deref(),
            Some(
                "Throttling"
                    | "ThrottlingException"
                    | "SlowDown"
                    | "RequestTimeout"
                    | "RequestTimeTooSkewed"
                    | "InternalError"
                    | "ServiceUnavailable"
            )
        );
        let (retryable, message) = match err {
            SdkError::TimeoutError(_) => (true, "timed out".to_owned()),
            SdkError::DispatchFailure(d) => {
                let kind = if d.is_timeout() {
                    "timed out"
                } else if d.is_io() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                (true, format!("{kind}: {}", causes(err)))
            }
            SdkError::ConstructionFailure(_) => (
                false,
                format!("cannot build the request: {}", DisplayErrorContext(err)),
            ),
            _ => {
                let s = status.unwrap_or(0);
                let retryable = s >= 500 || s == 429 || throttled;
                let mut m = match status {
                    Some(s) => format!("HTTP {s}"),
                    None => "no response".to_owned(),
                };
                if let Some(c) = &code {
                    m.push(' ');
                    m.push_str(c);
                }
                match &detail {
                    Some(d) if !d.is_empty() => {
                        m.push_str(": ");
                        m.push_str(d);
                    }
                    _ if status.is_none() => {
                        m.push_str(": ");
                        m.push_str(&DisplayErrorContext(err).to_string());
                    }
                    _ => {}
                }
                (retryable, m)
            }
        };
        Self {
            status,
            code,
            retryable,
            message,
        }
    }

    fn not_found(&self) -> bool {
        self.status == Some(404) && self.code.as_deref() != Some("NoSuchBucket")
    }
}

impl S3Store {
    /// Connects to the bucket of `config` and checks that it is there and readable.
    pub fn open(config: S3Config) -> Result<Self> {
        let store = Self::connect(config)?;
        store.check()?;
        tracing::info!(backend = %store.backend, "opened S3 object store");
        Ok(store)
    }

    /// Builds the client without any request; [`S3Store::check`] then proves the bucket is
    /// reachable with these credentials. For callers that must go on when the endpoint is
    /// down (the local cache of a tiered store still serves what it holds).
    pub fn connect(config: S3Config) -> Result<Self> {
        config.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("artifactfs-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the S3 runtime: {e}")))?;
        let url = config.url();
        let (client, endpoint) = block(&runtime, async {
            let retry = RetryConfig::standard()
                .with_max_attempts(config.max_attempts)
                .with_initial_backoff(Duration::from_millis(200))
                .with_max_backoff(Duration::from_secs(10));
            let timeouts = TimeoutConfig::builder()
                .connect_timeout(config.connect_timeout)
                .operation_attempt_timeout(config.attempt_timeout)
                .operation_timeout(config.operation_timeout)
                .build();
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .retry_config(retry)
                .timeout_config(timeouts)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
            if let Some(e) = &config.endpoint {
                loader = loader.endpoint_url(e);
            }
            if let Some(r) = &config.region {
                loader = loader.region(Region::new(r.clone()));
            }
            if let Some(c) = &config.credentials {
                loader = loader.credentials_provider(Credentials::new(
                    c.access_key_id.clone(),
                    c.secret_access_key.clone(),
                    c.session_token.clone(),
                    None,
                    "artifactfs-config",
                ));
            }
            let sdk = loader.load().await;
            let mut s3 = aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
            if sdk.region().is_none() {
                s3 = s3.region(Region::from_static("us-east-1"));
            }
            let endpoint = match sdk.endpoint_url() {
                Some(e) => e.to_owned(),
                None => format!(
                    "the AWS endpoint of region {}",
                    sdk.region().map_or("us-east-1", |r| r.as_ref())
                ),
            };
            (Client::from_conf(s3.build()), endpoint)
        });
        let prefix = if config.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", config.prefix)
        };
        Ok(Self {
            client,
            runtime: Some(runtime),
            bucket: config.bucket.clone(),
            prefix,
            storage_class: config.storage_class.as_deref().map(StorageClass::from),
            multipart_threshold: config.multipart_threshold,
            part_size: config.part_size,
            backend: format!("{url} at {endpoint}"),
            url,
        })
    }

    /// `s3://bucket/prefix at ENDPOINT`.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Creates the bucket (for tests and first-time setup); an existing bucket owned by the
    /// same user is not an error.
    pub fn create_bucket(&self) -> Result<()> {
        let r = self.run(self.client.create_bucket().bucket(&self.bucket).send());
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                let f = Failure::from_sdk(&e);
                if f.code.as_deref() == Some("BucketAlreadyOwnedByYou") {
                    return Ok(());
                }
                Err(self.error("create bucket", &self.bucket, f))
            }
        }
    }

    /// Deletes the bucket, which must be empty (for tests).
    pub fn delete_bucket(&self) -> Result<()> {
        self.run(self.client.delete_bucket().bucket(&self.bucket).send())
            .map_err(|e| self.sdk_error("delete bucket", &self.bucket, e))?;
        Ok(())
    }

    /// One cheap authenticated request (`HeadBucket`): a missing bucket, rejected
    /// credentials or an unreachable endpoint fail here with the endpoint and bucket named;
    /// `retryable` tells the last (or a 5xx) from the first two.
    pub fn check(&self) -> Result<()> {
        let r = self.run(self.client.head_bucket().bucket(&self.bucket).send());
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                let mut f = Failure::from_sdk(&e);
                let hint = match f.status {
                    Some(404) => Some("the bucket does not exist"),
                    Some(403) => Some(
                        "access denied: check the access key, the secret key and the bucket's policy",
                    ),
                    Some(301) => Some("the bucket is in another region"),
                    _ => None,
                };
                if let Some(h) = hint {
                    f.message = format!("{h} ({})", f.message);
                }
                Err(self.error("check bucket", &self.bucket, f))
            }
        }
    }

    /// Blocks on `fut` on the store's runtime (see the module doc).
    fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let rt = self
            .runtime
            .as_ref()
            .expect("runtime lives as long as the store");
        block(rt, fut)
    }

    fn full_key(&self, key: &str) -> Result<String> {
        if key_ok(key) {
            Ok(format!("{}{key}", self.prefix))
        } else {
            Err(Error::invalid("object key", format!("{key:?}")))
        }
    }

    fn error(&self, op: &'static str, key: &str, f: Failure) -> Error {
        Error::Backend {
            backend: self.backend.clone(),
            op,
            key: key.to_owned(),
            retryable: f.retryable,
            message: f.message,
        }
    }

    fn sdk_error<E>(&self, op: &'static str, key: &str, e: SdkError<E>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.error(op, key, Failure::from_sdk(&e))
    }

    fn missing(&self, key: &str) -> Error {
        Error::MissingObject {
            key: key.to_owned(),
            backend: self.url.clone(),
        }
    }

    async fn head_async(&self, key: &str, full: &str) -> Result<Option<u64>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(r) => Ok(Some(r.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => {
                let f = Failure::from_sdk(&e);
                if f.not_found() {
                    Ok(None)
                } else {
                    Err(self.error("head", key, f))
                }
            }
        }
    }

    /// Checks after an upload that the object is there with `len` bytes and, when the
    /// server's `ETag` is an MD5 form (a plain MD5, or `MD5-PARTS` of a multipart upload), that
    /// it is `etag`.
    async fn verify_upload(&self, key: &str, full: &str, len: usize, etag: &str) -> Result<()> {
        let bad = |message: String| Error::Backend {
            backend: self.backend.clone(),
            op: "verify upload",
            key: key.to_owned(),
            retryable: true,
            message,
        };
        let head = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let f = Failure::from_sdk(&e);
                if f.not_found() {
                    return Err(bad(format!("object absent after uploading {len} bytes")));
                }
                return Err(self.error("head", key, f));
            }
        };
        let n = head.content_length().unwrap_or(0).max(0) as u64;
        if n != len as u64 {
            return Err(bad(format!("stored {n} bytes, sent {len}")));
        }
        let got = head.e_tag().unwrap_or("").trim_matches('"');
        if is_md5_etag(got) && !got.eq_ignore_ascii_case(etag) {
            return Err(bad(format!("stored ETag {got}, expected {etag}")));
        }
        Ok(())
    }

    /// Uploads in one request; returns the `ETag` the object must have (its MD5).
    async fn put_single(&self, key: &str, full: &str, data: &[u8]) -> Result<String> {
        let md5 = Md5::digest(data);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .set_storage_class(self.storage_class.clone())
            .content_length(data.len() as i64)
            .content_md5(BASE64.encode(md5))
            .body(ByteStream::from(data.to_vec()))
            .send()
            .await
            .map_err(|e| self.sdk_error("put", key, e))?;
        Ok(hex(&md5))
    }

    /// Uploads in parts; returns the `ETag` the object must have (MD5 of the parts' MD5s,
    /// `-`, the number of parts).
    async fn put_multipart(&self, key: &str, full: &str, data: &[u8]) -> Result<String> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .set_storage_class(self.storage_class.clone())
            .send()
            .await
            .map_err(|e| self.sdk_error("create multipart upload", key, e))?;
        let Some(upload_id) = created.upload_id().map(str::to_owned) else {
            return Err(self.error(
                "create multipart upload",
                key,
                Failure {
                    status: None,
                    code: None,
                    retryable: true,
                    message: "the response has no upload id".into(),
                },
            ));
        };
        let result = self.upload_parts(key, full, &upload_id, data).await;
        if result.is_err() {
            let abort = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(e) = abort {
                tracing::warn!(
                    backend = %self.backend, key, upload_id,
                    error = %DisplayErrorContext(&e),
                    "cannot abort a failed multipart upload; the bucket's lifecycle rules must clean it up"
                );
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        data: &[u8],
    ) -> Result<String> {
        let mut parts = Vec::new();
        let mut md5s = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut chunks = data.chunks(self.part_size).enumerate().peekable();
        while chunks.peek().is_some() || !tasks.is_empty() {
            while tasks.len() < PART_CONCURRENCY {
                let Some((i, chunk)) = chunks.next() else {
                    break;
                };
                let number = i as i32 + 1;
                let md5 = Md5::digest(chunk);
                md5s.extend_from_slice(&md5);
                let req = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(chunk.len() as i64)
                    .content_md5(BASE64.encode(md5))
                    .body(ByteStream::from(chunk.to_vec()));
                tasks.spawn(async move { (number, req.send().await) });
            }
            let Some(done) = tasks.join_next().await else {
                break;
            };
            let (number, r) = done.map_err(|e| Error::Internal(format!("upload task: {e}")))?;
            let out = r.map_err(|e| self.sdk_error("upload part", key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            );
        }
        parts.sort_by_key(|p| p.part_number());
        tracing::debug!(backend = %self.backend, key, parts = parts.len(), "completing multipart upload");
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.sdk_error("complete multipart upload", key, e))?;
        Ok(format!("{}-{}", hex(&Md5::digest(&md5s)), md5s.len() / 16))
    }

    /// GETs `full`, whole or one range, and reads the body.
    async fn get_async(
        &self,
        op: &'static str,
        key: &str,
        full: &str,
        range: Option<String>,
    ) -> Result<Vec<u8>> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .set_range(range)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let f = Failure::from_sdk(&e);
                if f.not_found() {
                    return Err(self.missing(key));
                }
                if f.status == Some(416) {
                    return Err(Error::corrupt(
                        format!("object {key} in {}", self.url),
                        format!("requested range is past the end ({})", f.message),
                    ));
                }
                return Err(self.error(op, key, f));
            }
        };
        let expected = resp.content_length();
        let body = resp.body.collect().await.map_err(|e| {
            self.error(
                op,
                key,
                Failure {
                    status: None,
                    code: None,
                    retryable: true,
                    message: format!("reading the body: {}", DisplayErrorContext(&e)),
                },
            )
        })?;
        let body = body.into_bytes().to_vec();
        if let Some(n) = expected
            && n != body.len() as i64
        {
            return Err(self.error(
                op,
                key,
                Failure {
                    status: None,
                    code: None,
                    retryable: true,
                    message: format!("got {} bytes of a {n}-byte response", body.len()),
                },
            ));
        }
        Ok(body)
    }
}

/// `err` and its sources, each once, without the SDK's debug dump.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A plain MD5 `ETag` (32 hex digits), or a multipart one (`…-N`). Servers that encrypt or
/// compress objects answer other forms, which say nothing about the bytes.
fn is_md5_etag(etag: &str) -> bool {
    let md5 = etag.split_once('-').map_or(etag, |(m, n)| {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            m
        } else {
            ""
        }
    });
    md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit())
}

fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let s = e.to_string();
        if !out.iter().any(|o| o.contains(&s)) {
            out.push(s);
        }
        next = e.source();
    }
    out.join(": ")
}

/// Blocks on `fut` on `rt`; from a thread that is itself inside a tokio runtime, on a scoped
/// thread instead, since tokio refuses to block a runtime thread.
fn block<F>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(fut);
    }
    std::thread::scope(|s| match s.spawn(|| rt.block_on(fut)).join() {
        Ok(out) => out,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl Drop for S3Store {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let full = self.full_key(key)?;
        tracing::debug!(backend = %self.url, key, bytes = data.len(), "put");
        self.run(async {
            let etag = if data.len() > self.multipart_threshold {
                self.put_multipart(key, &full, data).await?
            } else {
                self.put_single(key, &full, data).await?
            };
            self.verify_upload(key, &full, data.len(), &etag).await
        })
    }

    /// The server checks every body against its `Content-MD5` and refuses a mismatch
    /// (`BadDigest`), and [`S3Store::put`] then checks the stored size and `ETag`.
    fn put_is_checked(&self) -> bool {
        true
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let full = self.full_key(key)?;
        tracing::debug!(backend = %self.url, key, "get");
        self.run(self.get_async("get", key, &full, None))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let full = self.full_key(key)?;
        tracing::debug!(backend = %self.url, key, offset, bytes = len, "get range");
        let past_end = |size: Option<u64>| {
            Error::corrupt(
                format!("object {key} in {}", self.url),
                match size {
                    Some(s) => format!(
                        "truncated: cannot read {len} bytes at offset {offset} of a {s}-byte object"
                    ),
                    None => format!("truncated: cannot read {len} bytes at offset {offset}"),
                },
            )
        };
        let Some(end) = offset.checked_add(len) else {
            return Err(past_end(None));
        };
        if len == 0 {
            // An empty range cannot be asked for in a Range header.
            return match self.run(self.head_async(key, &full))? {
                None => Err(self.missing(key)),
                Some(size) if offset > size => Err(past_end(Some(size))),
                Some(_) => Ok(Vec::new()),
            };
        }
        let range = format!("bytes={offset}-{}", end - 1);
        let out = self.run(self.get_async("get range", key, &full, Some(range)))?;
        if out.len() as u64 != len {
            // S3 answers a range that runs past the end with what there is.
            return Err(past_end(None));
        }
        Ok(out)
    }

    fn head(&self, key: &str) -> Result<Option<u64>> {
        let full = self.full_key(key)?;
        self.run(self.head_async(key, &full))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        self.run(async {
            let mut token = None;
            loop {
                let page = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&full_prefix)
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| self.sdk_error("list", prefix, e))?;
                for o in page.contents() {
                    let Some(k) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                        continue;
                    };
                    out.push(ObjectMeta {
                        key: k.to_owned(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                    });
                }
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                    _ => break,
                }
            }
            Ok::<_, Error>(())
        })?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key)?;
        tracing::debug!(backend = %self.url, key, "delete");
        self.run(
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .send(),
        )
        .map_err(|e| self.sdk_error("delete", key, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let c = S3Config::from_url("s3://packs-1/site/a/").unwrap();
        assert_eq!(
            (c.bucket.as_str(), c.prefix.as_str()),
            ("packs-1", "site/a")
        );
        assert_eq!(c.url(), "s3://packs-1/site/a");
        let c = S3Config::from_url("s3://packs").unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("packs", ""));
        assert_eq!(S3Config::from_url("s3://packs/").unwrap().prefix, "");
        for bad in [
            "packs",
            "http://packs/x",
            "s3://",
            "s3://Packs",
            "s3://ab",
            "s3://packs//x",
            "s3://packs/a/../b",
            "s3://packs/x?region=eu",
        ] {
            assert!(S3Config::from_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn md5_etags_are_told_from_others() {
        let md5 = hex(&Md5::digest(b"abc"));
        assert_eq!(md5, "900150983cd24fb0d6963f7d28e17f72");
        assert!(is_md5_etag(&md5));
        assert!(is_md5_etag(&format!("{md5}-3")));
        for other in [
            "",
            "abc",
            &format!("{md5}-"),
            &format!("{md5}-x"),
            "z".repeat(32).as_str(),
        ] {
            assert!(!is_md5_etag(other), "{other}");
        }
    }

    #[test]
    fn refuses_small_parts() {
        let c = S3Config {
            part_size: MIB,
            ..S3Config::new("packs")
        };
        assert!(matches!(S3Store::open(c), Err(Error::Invalid { .. })));
    }

    #[test]
    fn credentials_are_not_printed() {
        let c = S3Credentials {
            access_key_id: "AKIA".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("token".into()),
        };
        let s = format!("{c:?}");
        assert!(!s.contains("very-secret") && !s.contains("token\""), "{s}");
    }
}
