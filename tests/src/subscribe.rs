//! A fake sidecar's side of `tern.control.v1.ControlPlane/Subscribe`: a Hello, then the first
//! snapshot or the status that ended the stream. Over a plaintext channel or one from
//! [`crate::identity::tls_channel`] (with or without a client certificate).

use tern_proto::control::v1 as pb;
use tern_proto::control::v1::control_plane_client::ControlPlaneClient;
use tern_proto::control::v1::sidecar_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::CALL_TIMEOUT;

/// A Hello for `service` (namespace `default`) with `address` (empty: none) calling `calls`.
pub fn hello(service: &str, address: &str, calls: &[&str]) -> pb::Hello {
    pb::Hello {
        service: service.into(),
        address: address.into(),
        calls: calls.iter().map(ToString::to_string).collect(),
        ..Default::default()
    }
}

/// An open subscription: dropping it ends the stream (and starts the endpoint's grace).
pub struct Subscribed {
    pub first: pb::Snapshot,
    pub stream: tonic::Streaming<pb::Snapshot>,
    _tx: mpsc::Sender<pb::SidecarMessage>,
}

/// Subscribes on `channel` with `hello` and waits for the first snapshot, or the status that
/// ended the stream (a stream that ends without either is UNKNOWN, one that says nothing
/// within [`CALL_TIMEOUT`] is DEADLINE_EXCEEDED).
pub async fn subscribe(channel: Channel, hello: pb::Hello) -> Result<Subscribed, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SidecarMessage {
        kind: Some(Kind::Hello(hello)),
    })
    .await
    .map_err(|_| tonic::Status::internal("the request stream closed"))?;
    let mut client = ControlPlaneClient::new(channel);
    let mut stream = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(CALL_TIMEOUT, stream.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no snapshot within CALL_TIMEOUT"))??;
    match first {
        Some(first) => Ok(Subscribed {
            first,
            stream,
            _tx: tx,
        }),
        None => Err(tonic::Status::unknown(
            "the stream ended without a snapshot",
        )),
    }
}

/// A plaintext (h2c) channel to `grpc`.
pub async fn plaintext(grpc: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{grpc}"))?
        .connect_timeout(CALL_TIMEOUT)
        .connect()
        .await?)
}

/// `(address, identity)` of each endpoint of `service` in `snapshot`.
pub fn endpoints(snapshot: &pb::Snapshot, service: &str) -> Vec<(String, String)> {
    snapshot
        .services
        .iter()
        .filter(|s| s.name == service)
        .flat_map(|s| &s.endpoints)
        .map(|e| (e.address.clone(), e.identity.clone()))
        .collect()
}

/// `namespace/name` of every service in `snapshot`.
pub fn services(snapshot: &pb::Snapshot) -> Vec<String> {
    snapshot
        .services
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect()
}
