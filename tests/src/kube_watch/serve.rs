//! The stand-in's HTTP side: routes, the bearer check, lists and watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use super::world::{Gone, Kind, Out};
use super::Shared;

type Body = BoxBody<Bytes, std::io::Error>;

/// How long a watch lasts when the client names no `timeoutSeconds`.
const DEFAULT_WATCH: Duration = Duration::from_secs(1800);

pub(super) async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let service = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(handle(&shared, req)) }
    });
    crate::kube_api::serve_tls(listener, acceptor, service).await;
}

fn handle(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let uri = req.uri().clone();
    shared.world().requests.push(
        uri.path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
    );
    let expected = format!("Bearer {}", shared.bearer);
    if req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        != Some(expected.as_bytes())
    {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    if req.method() != http::Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "only GET",
        );
    }
    let Some((kind, namespace)) = route(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let q = query(uri.query().unwrap_or_default());
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    if flag("watch") {
        watch(
            shared,
            kind,
            namespace.as_deref(),
            &q,
            flag("allowWatchBookmarks"),
            flag("sendInitialEvents"),
        )
    } else {
        list(shared, kind, namespace.as_deref(), &q)
    }
}

/// `(kind, namespace)` of a collection path.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    let (group, rest) = if let Some(r) = path.strip_prefix("/api/v1/") {
        ("", r)
    } else {
        (
            "discovery.k8s.io",
            path.strip_prefix("/apis/discovery.k8s.io/v1/")?,
        )
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (namespace, resource) = match parts.as_slice() {
        [resource] => (None, *resource),
        ["namespaces", ns, resource] => (Some((*ns).to_owned()), *resource),
        _ => return None,
    };
    let kind = match (group, resource) {
        ("", "services") => Kind::Service,
        ("", "pods") => Kind::Pod,
        ("discovery.k8s.io", "endpointslices") => Kind::EndpointSlice,
        _ => return None,
    };
    Some((kind, namespace))
}

/// The query's pairs (kube-rs percent-encodes nothing these tests need decoded).
fn query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.replace("%3D", "=").replace("%2C", ",")),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

fn list(
    shared: &Shared,
    kind: Kind,
    namespace: Option<&str>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let world = shared.world();
    let rv = world.rv();
    if q.get("resourceVersionMatch").map(String::as_str) == Some("Exact")
        && q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()) != Some(rv)
    {
        return status(
            StatusCode::GONE,
            "Expired",
            "the stand-in keeps no older lists",
        );
    }
    let mut offset = 0;
    if let Some(token) = q.get("continue").filter(|t| !t.is_empty()) {
        let parsed = token
            .strip_prefix("c-")
            .and_then(|t| t.split_once('-'))
            .and_then(|(v, o)| Some((v.parse::<u64>().ok()?, o.parse::<usize>().ok()?)));
        match parsed {
            Some((v, o)) if v >= world.oldest() => offset = o,
            Some(_) => {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "the provided continue parameter is too old",
                )
            }
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continue token",
                )
            }
        }
    }
    let items = world.list(kind, namespace);
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let page: Vec<Value> = items
        .get(offset..end)
        .map(<[Value]>::to_vec)
        .unwrap_or_default();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        metadata["continue"] = json!(format!("c-{rv}-{end}"));
    }
    let body = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
        "metadata": metadata, "items": page});
    json_response(StatusCode::OK, &body)
}

fn watch(
    shared: &Shared,
    kind: Kind,
    namespace: Option<&str>,
    q: &HashMap<String, String>,
    bookmarks: bool,
    initial_events: bool,
) -> Response<Body> {
    let from = q
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v != 0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_WATCH, Duration::from_secs);
    let opened = shared
        .world()
        .watch(kind, namespace, from, bookmarks, initial_events);
    let (first, rx) = match opened {
        Ok(o) => o,
        Err(Gone(message)) => {
            // As the API server does: 200, one ERROR event with a 410 Status, and the end.
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": message, "reason": "Expired", "code": 410});
            let mut text = json!({"type": "ERROR", "object": status}).to_string();
            text.push('\n');
            let (_tx, rx) = mpsc::unbounded_channel();
            return stream_response(vec![Bytes::from(text)], rx, Duration::ZERO);
        }
    };
    stream_response(first, rx, timeout)
}

/// A chunked JSON-lines body: `first`, then whatever `rx` brings until it closes, `Cut`
/// breaks the connection, or `timeout` passes.
fn stream_response(
    first: Vec<Bytes>,
    rx: mpsc::UnboundedReceiver<Out>,
    timeout: Duration,
) -> Response<Body> {
    let deadline = tokio::time::Instant::now() + timeout;
    let state = (std::collections::VecDeque::from(first), rx, false);
    let stream = futures::stream::unfold(state, move |(mut first, mut rx, done)| async move {
        if done {
            return None;
        }
        if let Some(b) = first.pop_front() {
            return Some((Ok(Frame::data(b)), (first, rx, false)));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => None,
            out = rx.recv() => match out {
                Some(Out::Line(b)) => Some((Ok(Frame::data(b)), (first, rx, false))),
                Some(Out::Cut) => Some((Err(std::io::Error::other("watch cut by the test")), (first, rx, true))),
                None => None,
            },
        }
    });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()});
    json_response(code, &body)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = Bytes::from(body.to_string());
    let full = Full::new(bytes).map_err(|never| match never {});
    let mut response = Response::new(full.boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
