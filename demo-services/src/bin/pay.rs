//! `pay`: the demo's payment service. Answers `PayService.Pay` with its replica name and
//! version so callers can see which instance served them, and can inject failures and
//! latency to exercise a mesh's retries, timeouts and outlier ejection.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tern_demo::cli::{parse_duration, parse_fail_rate};
use tern_demo::codes::{code_name, parse_failure_code};
use tern_demo::process::{init_tracing, shutdown_signal};
use tern_proto::demo::v1::pay_service_server::{PayService, PayServiceServer};
use tern_proto::demo::v1::{PayReply, PayRequest};
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status};

/// Tern demo payment service (gRPC PayService).
#[derive(Parser, Debug)]
#[command(name = "pay")]
struct Args {
    /// Address to serve gRPC on; port 0 picks a free port (the bound one is printed).
    #[arg(
        long,
        env = "PAY_LISTEN",
        default_value = "127.0.0.1:50051",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// Replica name returned in every reply.
    #[arg(
        long,
        env = "PAY_REPLICA",
        default_value = "pay-1",
        value_name = "NAME"
    )]
    replica: String,
    /// Version label returned in every reply.
    #[arg(long, env = "PAY_VERSION", default_value = "v1", value_name = "LABEL")]
    version: String,
    /// Share of calls to fail on purpose, 0.0..=1.0.
    #[arg(long, env = "PAY_FAIL_RATE", default_value = "0", value_name = "F",
          value_parser = parse_fail_rate)]
    fail_rate: f64,
    /// gRPC status of injected failures: a name (UNAVAILABLE, deadline_exceeded) or 1..=16.
    #[arg(long, env = "PAY_FAIL_CODE", default_value = "UNAVAILABLE", value_name = "CODE",
          value_parser = parse_failure_code)]
    fail_code: Code,
    /// Delay added to every call before answering (e.g. 50ms, 2s).
    #[arg(long, env = "PAY_LATENCY", default_value = "0", value_name = "DURATION",
          value_parser = parse_duration)]
    latency: Duration,
    /// How an error status is sent: `trailers-only` (one HEADERS frame, the usual way) or
    /// `headers-then-trailers` (response headers, an empty body, the status in trailers).
    #[arg(long, env = "PAY_FAIL_STYLE", default_value = "trailers-only", value_name = "STYLE",
          value_parser = ["trailers-only", "headers-then-trailers"])]
    fail_style: String,
}

#[derive(Debug, Default)]
struct Counters {
    served: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug)]
struct Pay {
    replica: String,
    version: String,
    fail_rate: f64,
    fail_code: Code,
    latency: Duration,
    counters: Arc<Counters>,
}

impl Pay {
    fn answer(&self, req: &PayRequest) -> Result<PayReply, Status> {
        if req.amount_cents <= 0 {
            return Err(Status::invalid_argument(format!(
                "amount_cents must be positive, got {}",
                req.amount_cents
            )));
        }
        if req.currency.trim().is_empty() {
            return Err(Status::invalid_argument("currency must not be empty"));
        }
        // fastrand::f64 is in [0, 1): a rate of 1.0 fails every call, 0.0 none.
        if self.fail_rate > 0.0 && fastrand::f64() < self.fail_rate {
            return Err(Status::new(
                self.fail_code,
                format!("injected failure by {}", self.replica),
            ));
        }
        Ok(PayReply {
            status: "paid".to_string(),
            replica: self.replica.clone(),
            version: self.version.clone(),
        })
    }
}

#[tonic::async_trait]
impl PayService for Pay {
    async fn pay(&self, request: Request<PayRequest>) -> Result<Response<PayReply>, Status> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let req = request.into_inner();
        let result = self.answer(&req);
        self.counters.served.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(reply) => {
                tracing::debug!(order_id = %req.order_id, "paid");
                Ok(Response::new(reply))
            }
            Err(status) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(order_id = %req.order_id, code = code_name(status.code()), "failed");
                Err(status)
            }
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let counters = Arc::new(Counters::default());
    let pay = Pay {
        replica: args.replica.clone(),
        version: args.version.clone(),
        fail_rate: args.fail_rate,
        fail_code: args.fail_code,
        latency: args.latency,
        counters: counters.clone(),
    };
    println!(
        "pay listening on {bound} replica={} version={}",
        args.replica, args.version
    );
    let split = (args.fail_style == "headers-then-trailers")
        .then_some(tern_demo::trailers::HeadersThenTrailersLayer);
    tonic::transport::Server::builder()
        .layer(tower::util::option_layer(split))
        .add_service(PayServiceServer::new(pay))
        .serve_with_incoming_shutdown(tern_demo::net::incoming(listener), shutdown_signal())
        .await
        .context("gRPC server failed")?;
    eprintln!(
        "pay {} stopped: served={} failed={}",
        args.replica,
        counters.served.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn pay(fail_rate: f64) -> Pay {
        Pay {
            replica: "pay-9".into(),
            version: "v2".into(),
            fail_rate,
            fail_code: Code::ResourceExhausted,
            latency: Duration::ZERO,
            counters: Arc::default(),
        }
    }

    fn req(amount_cents: i64, currency: &str) -> PayRequest {
        PayRequest {
            order_id: "o".into(),
            amount_cents,
            currency: currency.into(),
        }
    }

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn validates_flags() {
        let parse = |a: &[&str]| Args::try_parse_from([&["pay"], a].concat());
        assert!(parse(&["--fail-rate", "2"]).is_err());
        assert!(parse(&["--fail-code", "BOGUS"]).is_err());
        assert!(parse(&["--fail-code", "OK"]).is_err());
        assert!(parse(&["--latency", "soon"]).is_err());
        assert!(parse(&["--listen", "nowhere"]).is_err());
        let ok = parse(&[
            "--fail-rate",
            "0.5",
            "--fail-code",
            "deadline_exceeded",
            "--latency",
            "20ms",
        ]);
        assert!(matches!(
            ok,
            Ok(Args {
                fail_code: Code::DeadlineExceeded,
                ..
            })
        ));
    }

    #[test]
    fn answers_and_rejects() {
        let p = pay(0.0);
        let reply = p.answer(&req(100, "EUR"));
        assert!(
            matches!(reply, Ok(PayReply { ref status, ref replica, ref version })
            if status == "paid" && replica == "pay-9" && version == "v2")
        );
        let code = |r: Result<PayReply, Status>| r.err().map(|s| s.code());
        assert_eq!(code(p.answer(&req(0, "EUR"))), Some(Code::InvalidArgument));
        assert_eq!(code(p.answer(&req(5, " "))), Some(Code::InvalidArgument));
        assert_eq!(
            code(pay(1.0).answer(&req(5, "EUR"))),
            Some(Code::ResourceExhausted)
        );
    }
}
