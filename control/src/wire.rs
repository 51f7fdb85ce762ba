//! `tern.control.v1.ControlPlane/Subscribe` on the wire, served without the
//! generated server so that snapshots can go out pre-encoded.
//!
//! The generated server would take a `pb::Snapshot` per send: a deep copy of
//! every view into a message, then an encoding per sidecar. A view that a
//! thousand sidecars watch is the same bytes for all of them, so the session
//! assembles each snapshot from the views' cached encodings
//! ([`crate::snapshot::Built::encode`]) and this codec writes those bytes as
//! they are. On the wire nothing differs: clients use the generated client.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use prost::Message;
use tern_proto::control::v1 as pb;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use crate::server::ControlPlane;
use crate::session::SnapshotStream;

const SUBSCRIBE: &str = "/tern.control.v1.ControlPlane/Subscribe";

/// Snapshots are a few KiB and sidecar messages a few bytes; tonic's 8 KiB
/// default buffers, two per stream, would dominate the memory of a control
/// plane with thousands of idle streams.
fn buffers() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}

/// The `ControlPlane` gRPC service, for `tonic::transport::Server::add_service`.
#[derive(Clone)]
pub struct ControlPlaneService {
    inner: Arc<ControlPlane>,
}

impl ControlPlaneService {
    pub fn new(inner: ControlPlane) -> Self {
        ControlPlaneService {
            inner: Arc::new(inner),
        }
    }
}

impl NamedService for ControlPlaneService {
    const NAME: &'static str = "tern.control.v1.ControlPlane";
}

impl<B> Service<http::Request<B>> for ControlPlaneService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != SUBSCRIBE {
            return Box::pin(async {
                Ok(
                    Status::unimplemented("tern.control.v1.ControlPlane has only Subscribe")
                        .into_http(),
                )
            });
        }
        let method = Subscribe(Arc::clone(&self.inner));
        Box::pin(async move { Ok(Grpc::new(SnapshotCodec).streaming(method, req).await) })
    }
}

struct Subscribe(Arc<ControlPlane>);

impl StreamingService<pb::SidecarMessage> for Subscribe {
    type Response = Bytes;
    type ResponseStream = SnapshotStream;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<pb::SidecarMessage>>) -> Self::Future {
        std::future::ready(Ok(self.0.subscribe(request)))
    }
}

/// Decodes `SidecarMessage`s; encodes snapshots that are already bytes.
struct SnapshotCodec;

impl Codec for SnapshotCodec {
    type Encode = Bytes;
    type Decode = pb::SidecarMessage;
    type Encoder = RawEncoder;
    type Decoder = MessageDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> MessageDecoder {
        MessageDecoder
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}

struct MessageDecoder;

impl Decoder for MessageDecoder {
    type Item = pb::SidecarMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::SidecarMessage>, Status> {
        pb::SidecarMessage::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable SidecarMessage: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffers()
    }
}
