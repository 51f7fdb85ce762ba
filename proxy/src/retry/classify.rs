//! Deciding whether an attempt's response may be retried.
//!
//! Only a response none of which has reached the caller can be retried. A
//! gRPC failure usually arrives trailers-only (the status in the headers),
//! but a server may also send headers, no message, then trailers with the
//! status: while a retry is still possible, the response headers are held
//! until the first DATA frame or the trailers arrive, and released at once
//! when a message comes first.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{Body, BoxError};
use crate::config::policy::RetryPolicy;
use crate::errors::grpc_status;

pub enum Classified {
    /// Give this response to the caller.
    Final(Response<Body>),
    /// A failure the caller has seen nothing of; `reason` labels metrics.
    Retryable(Response<Body>, &'static str),
    /// The response stream failed before anything of it was passed on.
    Reset(&'static str),
}

pub struct Request<'a> {
    pub grpc: bool,
    pub method: &'a Method,
    pub policy: &'a RetryPolicy,
}

/// Classifies `rsp`; reads its first frame only when `may_hold` (a retry is
/// still possible) and the status is not yet known.
pub async fn classify(req: &Request<'_>, rsp: Response<Body>, may_hold: bool) -> Classified {
    if !req.grpc {
        let retryable = matches!(
            rsp.status(),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) && req.method.is_idempotent();
        return if retryable {
            let reason = http_reason(rsp.status());
            Classified::Retryable(rsp, reason)
        } else {
            Classified::Final(rsp)
        };
    }
    if let Some(code) = grpc_status(rsp.headers()) {
        return by_code(req.policy, code, rsp);
    }
    if !may_hold || rsp.body().is_end_stream() {
        return Classified::Final(rsp);
    }
    let (parts, mut body) = rsp.into_parts();
    match body.frame().await {
        None => Classified::Final(Response::from_parts(parts, crate::body::empty())),
        Some(Err(_)) => Classified::Reset("reset"),
        Some(Ok(frame)) => {
            let code = frame.trailers_ref().and_then(grpc_status);
            let rsp = Response::from_parts(
                parts,
                crate::body::boxed(Prepend {
                    first: Some(frame),
                    rest: body,
                }),
            );
            match code {
                Some(code) => by_code(req.policy, code, rsp),
                None => Classified::Final(rsp),
            }
        }
    }
}

fn by_code(policy: &RetryPolicy, code: u32, rsp: Response<Body>) -> Classified {
    if policy.grpc_codes.contains(&code) {
        Classified::Retryable(rsp, tern_proto::grpc_code::name(code))
    } else {
        Classified::Final(rsp)
    }
}

/// Whether a final response counts as a failure of the endpoint for failure accrual.
pub fn is_failure(policy: &RetryPolicy, grpc: bool, rsp: &Response<Body>) -> bool {
    if grpc {
        grpc_status(rsp.headers()).is_some_and(|c| policy.grpc_codes.contains(&c))
    } else {
        rsp.status().is_server_error()
    }
}

fn http_reason(s: StatusCode) -> &'static str {
    match s {
        StatusCode::BAD_GATEWAY => "http_502",
        StatusCode::SERVICE_UNAVAILABLE => "http_503",
        _ => "http_504",
    }
}

/// A body whose first frame was already read.
struct Prepend {
    first: Option<Frame<Bytes>>,
    rest: Body,
}

impl http_body::Body for Prepend {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        crate::body::hint_plus(self.rest.size_hint(), held)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::Full;

    /// A peer's `content-length` makes the rest's hint exact; adding the
    /// held frame must keep it exact, not panic.
    #[test]
    fn prepend_over_an_exact_hint() {
        let p = Prepend {
            first: Some(Frame::data(Bytes::from_static(b"12345"))),
            rest: crate::body::boxed(Full::new(Bytes::from_static(b"678"))),
        };
        assert_eq!(p.size_hint().exact(), Some(8));
    }
}
