#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::*;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.workload.sig";

fn answer(status: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": TOKEN, "audiences": ["tern"]},
        "status": status,
    }))
    .unwrap()
}

fn authenticated(username: &str, audiences: serde_json::Value) -> Vec<u8> {
    answer(json!({
        "authenticated": true,
        "audiences": audiences,
        "user": {
            "username": username,
            "uid": "5f0c3b1e",
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/credential-id": ["JTI=7a1c-jti"],
                "authentication.kubernetes.io/pod-name": ["pay-6d4f"],
            },
        },
    }))
}

#[test]
fn request_is_a_tokenreview_for_tern() {
    let url: Uri = "https://10.96.0.1:443/apis/authentication.k8s.io/v1/tokenreviews"
        .parse()
        .unwrap();
    let req = build_request(&url, "control-sa-token", TOKEN).unwrap();
    assert_eq!(req.method(), http::Method::POST);
    assert_eq!(req.uri().path(), TOKENREVIEWS_PATH);
    assert_eq!(req.headers()[header::HOST], "10.96.0.1:443");
    assert_eq!(
        req.headers()[header::AUTHORIZATION],
        "Bearer control-sa-token"
    );
    assert!(req.headers()[header::AUTHORIZATION].is_sensitive());
    assert_eq!(req.headers()[header::CONTENT_TYPE], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&review_body(TOKEN).unwrap()).unwrap();
    assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(body["spec"]["token"], TOKEN);
    assert_eq!(body["spec"]["audiences"], json!(["tern"]));
    assert!(body.get("status").is_none());
    // And it reads back as the API server would read it.
    let back: TokenReview = serde_json::from_value(body).unwrap();
    assert_eq!(back.spec.token.as_deref(), Some(TOKEN));
}

#[test]
fn authenticated_service_account_is_reviewed() {
    let body = authenticated("system:serviceaccount:default:pay", json!(["tern"]));
    let r = interpret(StatusCode::CREATED, &body, TOKEN).unwrap();
    assert_eq!(
        r,
        Reviewed {
            namespace: "default".into(),
            service_account: "pay".into(),
            token_id: "7a1c-jti".into(),
            expired: false,
        }
    );
    // No audiences in the answer (an older API server): still accepted; no
    // credential id: named by the user's uid.
    let body = answer(json!({
        "authenticated": true,
        "user": {"username": "system:serviceaccount:shop:order", "uid": "u-1"},
    }));
    let r = interpret(StatusCode::OK, &body, TOKEN).unwrap();
    assert_eq!(
        (
            r.namespace.as_str(),
            r.service_account.as_str(),
            r.token_id.as_str()
        ),
        ("shop", "order", "uid:u-1")
    );
}

#[test]
fn unauthenticated_tokens_are_rejected() {
    let body = answer(json!({"authenticated": false, "error": "invalid bearer token"}));
    let e = interpret(StatusCode::CREATED, &body, TOKEN).unwrap_err();
    assert!(
        matches!(&e, ReviewError::Rejected(m) if m.contains("invalid bearer token")),
        "{e}"
    );
    let body = answer(json!({"user": {}}));
    assert!(matches!(
        interpret(StatusCode::CREATED, &body, TOKEN),
        Err(ReviewError::Rejected(_))
    ));
    // An error that quotes the token does not repeat it.
    let body = answer(json!({"authenticated": false, "error": format!("bad: {TOKEN}")}));
    let e = interpret(StatusCode::CREATED, &body, TOKEN).unwrap_err();
    assert!(!e.to_string().contains(TOKEN), "{e}");
}

#[test]
fn wrong_audience_is_rejected() {
    let body = authenticated(
        "system:serviceaccount:default:pay",
        json!(["https://kubernetes.default.svc"]),
    );
    let e = interpret(StatusCode::CREATED, &body, TOKEN).unwrap_err();
    assert!(
        matches!(&e, ReviewError::Rejected(m) if m.contains("audience")),
        "{e}"
    );
}

#[test]
fn other_users_are_rejected() {
    for username in [
        "system:node:worker-1",
        "alice@example.com",
        "system:serviceaccount:default",
        "system:serviceaccount::pay",
        "system:serviceaccount:default:",
        "system:serviceaccount:default:pay:extra",
        "",
    ] {
        let body = authenticated(username, json!(["tern"]));
        assert!(
            matches!(
                interpret(StatusCode::CREATED, &body, TOKEN),
                Err(ReviewError::Rejected(_))
            ),
            "{username:?}"
        );
    }
}

#[test]
fn api_server_trouble_is_unavailable_not_a_bad_token() {
    for body in [
        b"not json".to_vec(),
        b"{}".to_vec(),
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Status"})).unwrap(),
        answer(serde_json::Value::Null),
    ] {
        assert!(
            matches!(
                interpret(StatusCode::CREATED, &body, TOKEN),
                Err(ReviewError::Unavailable(_))
            ),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let status = serde_json::to_vec(&json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "tokenreviews.authentication.k8s.io is forbidden", "code": 403,
    }))
    .unwrap();
    for code in [
        StatusCode::UNAUTHORIZED,
        StatusCode::FORBIDDEN,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        let e = interpret(code, &status, TOKEN).unwrap_err();
        assert!(
            matches!(&e, ReviewError::Unavailable(m) if m.contains(code.as_str())),
            "{e}"
        );
    }
}

#[test]
fn api_server_urls() {
    let r = KubeTokenReview::new("https://10.96.0.1:443", "ca".into(), "t".into()).unwrap();
    assert_eq!(
        r.url().to_string(),
        "https://10.96.0.1:443/apis/authentication.k8s.io/v1/tokenreviews"
    );
    assert!(matches!(r.server_name, ServerName::IpAddress(_)));
    let r =
        KubeTokenReview::new("https://kubernetes.default.svc", "ca".into(), "t".into()).unwrap();
    assert_eq!(r.port, 443);
    assert!(matches!(r.server_name, ServerName::DnsName(_)));
    let r = KubeTokenReview::new("https://[fd00::1]:6443/", "ca".into(), "t".into()).unwrap();
    assert_eq!((r.host.as_str(), r.port), ("fd00::1", 6443));
    for bad in [
        "http://10.96.0.1",
        "https://10.96.0.1/api",
        "10.96.0.1:443",
        "https://",
    ] {
        assert!(
            KubeTokenReview::new(bad, "ca".into(), "t".into()).is_err(),
            "{bad}"
        );
    }
    assert_eq!(
        in_cluster_url(Some("10.96.0.1".into()), Some("443".into())).unwrap(),
        "https://10.96.0.1:443"
    );
    assert_eq!(
        in_cluster_url(Some("fd00::1".into()), Some("443".into())).unwrap(),
        "https://[fd00::1]:443"
    );
    assert!(in_cluster_url(None, Some("443".into())).is_err());
    assert!(in_cluster_url(Some("10.96.0.1".into()), Some("https".into())).is_err());
}

#[tokio::test]
async fn unreachable_api_server_is_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "control-sa-token\n").unwrap();
    // A port nobody listens on; the CA file is missing too, which is reported first.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let r = KubeTokenReview::new(
        &format!("https://127.0.0.1:{port}"),
        tmp.path().join("ca.crt"),
        token_file,
    )
    .unwrap();
    let e = r.review(TOKEN).await.unwrap_err();
    assert!(matches!(&e, ReviewError::Unavailable(_)), "{e}");
    assert!(!e.to_string().contains(TOKEN));
    assert!(matches!(r.review("").await, Err(ReviewError::Rejected(_))));
}
