//! A real tern-proxy against a scripted control plane (a stand-in speaking the real
//! `tern.control.v1` protocol, so the test chooses exactly what each snapshot says):
//! the sidecar announces incremental snapshots, applies one service by service, NACKs
//! naming the one it rejects and keeps that service's last good state while applying
//! the rest, and forgets what a snapshot lists as removed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_proto::control::v1 as pb;
use tern_proto::control::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use tern_proto::control::v1::sidecar_message::Kind;
use tern_tests::control::SidecarView;
use tern_tests::{eventually, Must, Proxy, ProxySpec, TestDir};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

type Snapshots = mpsc::Receiver<Result<pb::Snapshot, tonic::Status>>;

/// Serves one Subscribe stream: the snapshots the test sends, and what the sidecar says.
struct Scripted {
    snapshots: Mutex<Option<Snapshots>>,
    heard: mpsc::UnboundedSender<pb::SidecarMessage>,
}

#[tonic::async_trait]
impl ControlPlane for Scripted {
    type SubscribeStream = ReceiverStream<Result<pb::Snapshot, tonic::Status>>;

    async fn subscribe(
        &self,
        request: tonic::Request<tonic::Streaming<pb::SidecarMessage>>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        let rx = self
            .snapshots
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .take()
            .ok_or_else(|| tonic::Status::unavailable("the script serves one stream"))?;
        let mut inbound = request.into_inner();
        let heard = self.heard.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let _ = heard.send(m);
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

fn service(name: &str, endpoint: &str) -> pb::ServiceConfig {
    pb::ServiceConfig {
        name: name.into(),
        namespace: "default".into(),
        endpoints: vec![pb::Endpoint {
            address: endpoint.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn next(heard: &mut mpsc::UnboundedReceiver<pb::SidecarMessage>) -> Kind {
    tokio::time::timeout(Duration::from_secs(5), heard.recv())
        .await
        .expect("the sidecar said nothing within 5s")
        .and_then(|m| m.kind)
        .expect("the stream ended")
}

async fn endpoints(proxy: &Proxy, name: &str) -> Vec<String> {
    SidecarView(proxy.config().await.must()).endpoints(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_snapshots_are_applied_and_rejected_per_service() {
    let dir = TestDir::new("incremental-sidecar").must();
    let (tx, rx) = mpsc::channel(8);
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let scripted = Scripted {
        snapshots: Mutex::new(Some(rx)),
        heard: heard_tx,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(ControlPlaneServer::new(scripted))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    // The first snapshot of the stream is complete.
    let first = pb::Snapshot {
        version: 1,
        services: vec![
            service("a", "127.0.0.1:7001"),
            service("b", "127.0.0.1:7002"),
        ],
        inbound: Some(pb::InboundPolicy::default()),
        ..Default::default()
    };
    tx.send(Ok(first)).await.unwrap();
    let url = format!("http://{addr}");
    let spec = ProxySpec::new("incremental", "order")
        .access_log("off")
        .args(&["--control-plane", &url]);
    let proxy = Arc::new(Proxy::start(dir.path(), spec).await.must());
    let Kind::Hello(hello) = next(&mut heard).await else {
        panic!("no Hello first")
    };
    assert!(hello.incremental, "{hello:?}");
    assert!(matches!(
        next(&mut heard).await,
        Kind::Ack(pb::Ack { version: 1 })
    ));
    assert_eq!(endpoints(&proxy, "a").await, ["127.0.0.1:7001"]);

    // a's update is invalid, b's fine: b applied, a keeps its last good state, NACK names a.
    let update = pb::Snapshot {
        version: 2,
        incremental: true,
        services: vec![service("a", "nowhere"), service("b", "127.0.0.1:7003")],
        ..Default::default()
    };
    tx.send(Ok(update)).await.unwrap();
    let Kind::Nack(nack) = next(&mut heard).await else {
        panic!("no NACK of version 2")
    };
    assert_eq!(nack.version, 2);
    assert!(nack.reason.contains("a.default"), "{}", nack.reason);
    assert!(!nack.reason.contains("b.default"), "{}", nack.reason);
    assert_eq!(endpoints(&proxy, "a").await, ["127.0.0.1:7001"]);
    assert_eq!(endpoints(&proxy, "b").await, ["127.0.0.1:7003"]);

    // Only a changes (validly); b is not mentioned and stays. Then b is removed.
    let update = pb::Snapshot {
        version: 3,
        incremental: true,
        services: vec![service("a", "127.0.0.1:7004")],
        ..Default::default()
    };
    tx.send(Ok(update)).await.unwrap();
    assert!(matches!(
        next(&mut heard).await,
        Kind::Ack(pb::Ack { version: 3 })
    ));
    assert_eq!(endpoints(&proxy, "a").await, ["127.0.0.1:7004"]);
    assert_eq!(endpoints(&proxy, "b").await, ["127.0.0.1:7003"]);
    let removal = pb::Snapshot {
        version: 4,
        incremental: true,
        removed: vec!["b.default".into()],
        ..Default::default()
    };
    tx.send(Ok(removal)).await.unwrap();
    assert!(matches!(
        next(&mut heard).await,
        Kind::Ack(pb::Ack { version: 4 })
    ));
    eventually(Duration::from_secs(2), || async {
        let b = endpoints(&proxy, "b").await;
        Ok((!b.is_empty()).then(|| format!("b still has {b:?}")))
    })
    .await
    .must();
    assert_eq!(endpoints(&proxy, "a").await, ["127.0.0.1:7004"]);
    server.abort();
}
