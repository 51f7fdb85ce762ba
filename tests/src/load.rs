//! Steady `PayService` load that runs in the background while a test changes the mesh, with
//! every call's outcome and start time kept, so the test can judge the calls made before, during
//! and after a change separately.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tern_proto::demo::v1::pay_service_client::PayServiceClient;
use tokio::task::JoinHandle;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::Channel;

use crate::demo::{pay_request, Outcome};
use crate::mesh::connect;
use crate::{within, CALL_TIMEOUT};

/// Request metadata (headers) a call carries.
pub type Headers = Vec<(String, String)>;

/// One Pay call with `headers`. A call that hangs past [`CALL_TIMEOUT`] is an outcome too
/// (`DEADLINE_EXCEEDED` with a message saying so), so a load keeps going and reports it.
pub async fn pay_once(
    client: &mut PayServiceClient<Channel>,
    i: usize,
    headers: &[(String, String)],
) -> Result<Outcome> {
    let mut request = tonic::Request::new(pay_request(i));
    for (name, value) in headers {
        let key = MetadataKey::from_bytes(name.as_bytes())
            .with_context(|| format!("bad header name {name:?}"))?;
        let value: MetadataValue<_> = value
            .parse()
            .with_context(|| format!("bad header value {value:?}"))?;
        request.metadata_mut().insert(key, value);
    }
    let started = Instant::now();
    let result = match within(CALL_TIMEOUT, client.pay(request)).await {
        Ok(result) => result.map(|r| r.into_inner().replica),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {CALL_TIMEOUT:?} (test-side bound)"
        ))),
    };
    Ok(Outcome {
        result,
        started,
        elapsed: started.elapsed(),
    })
}

/// `calls` Pay calls carrying `headers`, `concurrency` at a time, on one connection.
pub async fn pay_with_headers(
    target: SocketAddr,
    calls: usize,
    concurrency: usize,
    headers: &[(&str, &str)],
) -> Result<Vec<Outcome>> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let client = PayServiceClient::new(connect(target).await?);
    let headers: Headers = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    futures::stream::iter(0..calls)
        .map(|i| {
            let mut client = client.clone();
            let headers = headers.clone();
            async move { pay_once(&mut client, i, &headers).await }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await
}

/// Pay calls made back to back by `concurrency` workers over one connection until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    workers: Vec<JoinHandle<Result<()>>>,
}

impl Load {
    /// `concurrency` workers, each calling again as soon as its call finishes.
    pub async fn start(target: SocketAddr, concurrency: usize) -> Result<Self> {
        Self::start_paced(target, concurrency, None).await
    }

    /// About `per_second` calls a second in total, spread over 4 workers (a slow call delays
    /// only its worker's next one).
    pub async fn at_rate(target: SocketAddr, per_second: u32) -> Result<Self> {
        const WORKERS: usize = 4;
        let interval = Duration::from_secs_f64(WORKERS as f64 / f64::from(per_second.max(1)));
        Self::start_paced(target, WORKERS, Some(interval)).await
    }

    async fn start_paced(
        target: SocketAddr,
        concurrency: usize,
        interval: Option<Duration>,
    ) -> Result<Self> {
        let client = PayServiceClient::new(connect(target).await?);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..concurrency)
            .map(|_| {
                let mut client = client.clone();
                let (stop, done, next, outcomes) = (
                    Arc::clone(&stop),
                    Arc::clone(&done),
                    Arc::clone(&next),
                    Arc::clone(&outcomes),
                );
                tokio::spawn(async move {
                    let mut ticks = interval.map(|i| {
                        let mut t = tokio::time::interval(i);
                        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        t
                    });
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(t) = ticks.as_mut() {
                            t.tick().await;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let outcome = pay_once(&mut client, i as usize, &[]).await?;
                        outcomes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(outcome);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        Ok(Self {
            stop,
            done,
            outcomes,
            workers,
        })
    }

    /// Calls finished so far.
    pub fn completed(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `more` calls beyond those finished now have finished.
    pub async fn wait_more(&self, more: u64, limit: Duration) -> Result<()> {
        let target = self.completed() + more;
        let deadline = Instant::now() + limit;
        while self.completed() < target {
            if Instant::now() >= deadline {
                bail!(
                    "the load finished {} of {more} more calls within {limit:?}",
                    more + self.completed() - target
                );
            }
            if self.workers.iter().all(JoinHandle::is_finished) {
                bail!("every load worker stopped");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// When the first call answered by `replica` finished, if one has.
    pub fn first_answer_from(&self, replica: &str) -> Option<Instant> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|o| o.result.as_deref().ok() == Some(replica))
            .map(|o| o.started + o.elapsed)
            .min()
    }

    /// A copy of the outcomes so far.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the workers (each finishes its call in flight) and returns every outcome.
    pub async fn stop(mut self) -> Result<Vec<Outcome>> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in std::mem::take(&mut self.workers) {
            within(CALL_TIMEOUT + Duration::from_secs(1), worker)
                .await?
                .map_err(|e| anyhow!("a load worker panicked: {e}"))??;
        }
        let outcomes =
            std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(outcomes)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in &self.workers {
            worker.abort();
        }
    }
}

/// The outcomes of calls that started at or after `from` and before `to` (each bound only if
/// given).
pub fn started_between(
    outcomes: &[Outcome],
    from: Option<Instant>,
    to: Option<Instant>,
) -> Vec<Outcome> {
    outcomes
        .iter()
        .filter(|o| from.is_none_or(|f| o.started >= f) && to.is_none_or(|t| o.started < t))
        .cloned()
        .collect()
}
