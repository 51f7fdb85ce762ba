//! What one downstream connection may cost: requests in flight, how long it
//! has been idle, and how many of its streams its client cancelled.
//!
//! Every request of the connection carries a guard (on its response future,
//! then on its response body); a guard dropped before its response ended is
//! a stream the client reset. Past [`Limits::max_client_resets`] within
//! [`RESET_WINDOW`], or idle past [`Limits::idle_timeout`], the connection is
//! sent GOAWAY and closes once its requests in flight finish. Only this
//! client's connection is touched: the upstream connections it shares with
//! other clients never see more than its bounded share of cancellations.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body::{Frame, SizeHint};
use tokio::sync::Notify;

use crate::config::limits::{Limits, RESET_WINDOW};

/// Why a connection is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trouble {
    Idle,
    ClientResets,
}

impl Trouble {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Idle => "idle_timeout",
            Self::ClientResets => "client_resets",
        }
    }
}

pub struct ConnState {
    born: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `born` when the last request ended.
    last_end_ms: AtomicU64,
    window_start_ms: AtomicU64,
    resets_in_window: AtomicU32,
    over_budget: AtomicBool,
    abuse: Notify,
    limits: Limits,
}

impl ConnState {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            window_start_ms: AtomicU64::new(0),
            resets_in_window: AtomicU32::new(0),
            over_budget: AtomicBool::new(false),
            abuse: Notify::new(),
            limits,
        })
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Resolves when the connection should be closed, and says why.
    pub async fn trouble(&self) -> Trouble {
        let idle = async {
            let timeout = self.limits.idle_timeout;
            loop {
                tokio::time::sleep(timeout / 4).await;
                let idle_ms = self
                    .now_ms()
                    .saturating_sub(self.last_end_ms.load(Ordering::Relaxed));
                if self.in_flight.load(Ordering::Relaxed) == 0
                    && idle_ms >= timeout.as_millis() as u64
                {
                    return Trouble::Idle;
                }
            }
        };
        tokio::select! {
            t = idle => t,
            _ = self.abuse.notified() => Trouble::ClientResets,
        }
    }

    fn started(self: &Arc<Self>) -> Guard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Guard {
            state: Arc::clone(self),
            done: false,
        }
    }

    fn ended(&self, cancelled: bool) {
        let now = self.now_ms();
        self.last_end_ms.store(now, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if cancelled {
            self.count_reset(now);
        }
    }

    fn count_reset(&self, now: u64) {
        let window = RESET_WINDOW.as_millis() as u64;
        if now.saturating_sub(self.window_start_ms.load(Ordering::Relaxed)) >= window {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.resets_in_window.store(0, Ordering::Relaxed);
        }
        let n = self.resets_in_window.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.limits.max_client_resets && !self.over_budget.swap(true, Ordering::Relaxed) {
            // notify_one keeps the permit if the watcher is not waiting yet.
            self.abuse.notify_one();
        }
    }
}

/// One request's place in its connection's count; dropped unfinished, it
/// counts as a stream the client cancelled.
struct Guard {
    state: Arc<ConnState>,
    done: bool,
}

impl Guard {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.state.ended(false);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.state.ended(true);
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future, then its body, carrying the request's [`Guard`].
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        guard: Option<Guard>,
    }
}

impl<F> Tracked<F> {
    pub fn new(inner: F, state: &Arc<ConnState>) -> Self {
        Self {
            inner,
            guard: Some(state.started()),
        }
    }
}

impl<F, B, E> Future for Tracked<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<Tracked<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(out) => out,
        };
        let mut guard = this.guard.take();
        Poll::Ready(match out {
            Ok(rsp) => {
                // hyper never polls a body that is already at its end (a
                // trailers-only response): the request is over now.
                if rsp.body().is_end_stream() {
                    if let Some(g) = guard.as_mut() {
                        g.finish();
                    }
                }
                Ok(rsp.map(|inner| Tracked { inner, guard }))
            }
            Err(e) => {
                if let Some(g) = guard.as_mut() {
                    g.finish();
                }
                Err(e)
            }
        })
    }
}

impl<B> http_body::Body for Tracked<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // hyper stops polling once a frame leaves the body at its end.
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(f))) => f.is_trailers() || this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            if let Some(g) = this.guard.as_mut() {
                g.finish();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn limits(resets: u32) -> Limits {
        Limits {
            max_client_resets: resets,
            idle_timeout: Duration::from_millis(200),
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn cancelled_requests_past_the_budget_signal_trouble() {
        let s = ConnState::new(limits(3));
        for _ in 0..3 {
            drop(s.started());
        }
        assert!(!s.over_budget.load(Ordering::Relaxed));
        let mut done = s.started();
        done.finish();
        drop(s.started());
        let t = tokio::time::timeout(Duration::from_secs(1), s.trouble()).await;
        assert_eq!(t.unwrap(), Trouble::ClientResets);
    }

    #[tokio::test]
    async fn a_finished_trailers_only_response_is_no_reset() {
        let s = ConnState::new(limits(0));
        let rsp = Response::new(http_body_util::Empty::<Bytes>::new());
        let fut = Tracked::new(async { Ok::<_, ()>(rsp) }, &s);
        let body = fut.await.unwrap();
        drop(body);
        assert!(!s.over_budget.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn idle_only_without_requests_in_flight() {
        let s = ConnState::new(limits(100));
        let busy = s.started();
        let t = tokio::time::timeout(Duration::from_secs(2), s.trouble()).await;
        assert!(t.is_err(), "a request in flight keeps the connection");
        drop(busy);
        let t = tokio::time::timeout(Duration::from_secs(2), s.trouble()).await;
        assert_eq!(t.unwrap(), Trouble::Idle);
    }
}
