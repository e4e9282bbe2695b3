//! The errors of the HTTP routes: each has its status, a body that says what to do, and the
//! error kind it is counted under.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::metrics::ErrorKind;
use crate::transport::auth::AuthError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// Missing, wrong, expired or reused credentials; a refused origin; an endpoint that is off.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// No call or pending-socket slot is free.
    #[error("{0}")]
    Busy(&'static str),
    /// The client's address holds its share of the pending sockets.
    #[error("{0}")]
    TooManyFromAddress(&'static str),
    /// A Twilio request without a valid `X-Twilio-Signature`.
    #[error("invalid X-Twilio-Signature")]
    BadSignature,
    #[error("{0}")]
    NotFound(String),
    #[error("{1}")]
    BadRequest(ErrorKind, String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Timeout(&'static str),
    /// The server is shutting down and takes no new calls.
    #[error("the server is restarting and takes no new calls; try again in a few seconds")]
    Draining,
}

impl ApiError {
    /// What `gazelle_errors_total` counts it as, if anything (a lookup of a call that has gone is
    /// not an error of the server's or the caller's).
    pub(crate) fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            ApiError::Auth(AuthError::Origin(_) | AuthError::OriginName(_)) => ErrorKind::Origin,
            ApiError::Auth(AuthError::TwilioUnsigned(_)) => ErrorKind::TwilioClosed,
            ApiError::Auth(AuthError::Off(..)) => return None,
            ApiError::Auth(_) => ErrorKind::Auth,
            ApiError::Busy(_) | ApiError::Draining => ErrorKind::Busy,
            ApiError::TooManyFromAddress(_) => ErrorKind::TooManyConnectionsPerIp,
            ApiError::BadSignature => ErrorKind::TwilioSignature,
            ApiError::NotFound(_) => return None,
            ApiError::BadRequest(kind, _) => *kind,
            ApiError::TooLarge(_) | ApiError::Timeout(_) => ErrorKind::TwilioBadBody,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Auth(e) => return e.clone().into_response(),
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyFromAddress(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadSignature => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(..) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Draining => {
                let retry = [(axum::http::header::RETRY_AFTER, "5")];
                return (StatusCode::SERVICE_UNAVAILABLE, retry, self.to_string()).into_response();
            }
        };
        (status, self.to_string()).into_response()
    }
}
