//! What changes between hops for HTTP/1.1: the request line's form and the
//! connection-level headers.

use http::{header, uri, HeaderMap, HeaderValue, Request, Uri};

use crate::body::Body;

/// hyper's HTTP/1 read buffer bounds a message head; it must hold at least 8 KiB.
pub fn h1_buf_size(max_header_list_size: u32) -> usize {
    (max_header_list_size as usize).max(8192)
}

/// HTTP/1.1 origin servers expect `GET /path`, with the name in `Host`.
pub(super) fn origin_form(req: &mut Request<Body>) {
    let uri = req.uri().clone();
    if let Some(authority) = uri.authority() {
        if !req.headers().contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
}

/// Connection-level headers belong to one hop; the next hop frames its own.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.remove(header::CONNECTION) {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !name.eq_ignore_ascii_case("te") {
                    headers.remove(name);
                }
            }
        }
    }
    for h in ["keep-alive", "proxy-connection", "upgrade"] {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_but_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-end"], "kept");
    }

    #[test]
    fn origin_form_moves_authority_to_host() {
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = Uri::from_static("http://pay:50051/orders?x=1");
        origin_form(&mut req);
        assert_eq!(req.uri(), "/orders?x=1");
        assert_eq!(req.headers()[header::HOST], "pay:50051");
    }
}
