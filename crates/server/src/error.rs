//! The one mapping from engine errors to HTTP: every refusal is a JSON body
//! `{"code": "...", "message": "..."}` with the status that says what kind of refusal it is.
//! Handlers return [`ApiError`]; nothing else builds error responses.

use artifactfs_core::Error;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::paths::BadPath;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// The status and code of every engine error kind.
pub fn classify(e: &Error) -> (StatusCode, &'static str) {
    use StatusCode as S;
    match e {
        Error::Invalid { .. } | Error::NameTooLong(_) => (S::BAD_REQUEST, "invalid"),
        Error::NotFound(_) | Error::NoAttr(_) => (S::NOT_FOUND, "not_found"),
        Error::AlreadyExists(_) => (S::CONFLICT, "already_exists"),
        Error::Busy(_) => (S::CONFLICT, "busy"),
        Error::State(_) | Error::ReadOnly(_) => (S::CONFLICT, "state"),
        Error::NotEmpty(_) | Error::NotDir(_) | Error::IsDir(_) | Error::CrossRun(_) => {
            (S::CONFLICT, "conflict")
        }
        Error::NotPermitted(_) => (S::FORBIDDEN, "refused"),
        Error::Corrupt { .. } | Error::MissingObject { .. } => (S::INTERNAL_SERVER_ERROR, "damage"),
        e if e.is_disk_full() => (S::INSUFFICIENT_STORAGE, "disk_full"),
        Error::Backend { .. } => (S::SERVICE_UNAVAILABLE, "backend"),
        Error::Locked { .. } => (S::SERVICE_UNAVAILABLE, "locked"),
        Error::Unsupported(_) => (S::BAD_REQUEST, "unsupported"),
        Error::Cancelled(_) => (S::SERVICE_UNAVAILABLE, "cancelled"),
        _ => (S::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = classify(&e);
        Self::new(status, code, e.to_string())
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        if artifactfs_core::error::io_disk_full(&e) {
            Self::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", e.to_string())
        } else {
            Self::internal(e.to_string())
        }
    }
}

impl From<BadPath> for ApiError {
    fn from(e: BadPath) -> Self {
        Self::bad_request(e.0)
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::internal(format!("an engine call ended abnormally: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(
                status = self.status.as_u16(),
                code = self.code,
                "{}",
                self.message
            );
        }
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_status() {
        let io = |raw| Error::io("write", "/x", std::io::Error::from_raw_os_error(raw));
        let cases = [
            (Error::invalid("a", "b"), 400),
            (Error::NotFound("r".into()), 404),
            (Error::AlreadyExists("r".into()), 409),
            (Error::Busy("r".into()), 409),
            (Error::ReadOnly("r".into()), 409),
            (Error::NotPermitted("shorter".into()), 403),
            (Error::corrupt("pack", "bad"), 500),
            (io(28), 507),
            (io(5), 500),
        ];
        for (e, want) in cases {
            assert_eq!(classify(&e).0.as_u16(), want, "{e}");
        }
    }
}
