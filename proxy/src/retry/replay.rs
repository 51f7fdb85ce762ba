//! A request body that can be sent again.
//!
//! The caller's body is read once, by whichever attempt is running, and each
//! frame is kept (a reference-counted `Bytes`, not a copy) up to a byte limit.
//! A later attempt first replays what was kept, then goes on reading the
//! caller's body. Past the limit nothing more is kept and the request can no
//! longer be retried; the running attempt streams on unaffected.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{Body, BoxError};

struct State {
    /// The caller's body; `None` once it has ended.
    source: Option<Body>,
    kept: Vec<Bytes>,
    kept_bytes: usize,
    trailers: Option<HeaderMap>,
    /// More than the limit was read: nothing can be replayed.
    overflowed: bool,
    limit: usize,
}

#[derive(Clone)]
pub struct Replay {
    state: Arc<Mutex<State>>,
}

impl Replay {
    pub fn new(body: Body, limit: usize) -> Self {
        let hint = body.size_hint();
        let overflowed = hint.lower() > limit as u64;
        Self {
            state: Arc::new(Mutex::new(State {
                source: if body.is_end_stream() {
                    None
                } else {
                    Some(body)
                },
                kept: Vec::new(),
                kept_bytes: 0,
                trailers: None,
                overflowed,
                limit,
            })),
        }
    }

    /// A body for the next attempt, starting from the first byte.
    pub fn attempt(&self) -> Body {
        crate::body::boxed(ReplayBody {
            state: Arc::clone(&self.state),
            pos: 0,
            trailers_sent: false,
        })
    }

    /// Whether a new attempt could send the whole body again.
    pub fn can_replay(&self) -> bool {
        !self.lock().overflowed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct ReplayBody {
    state: Arc<Mutex<State>>,
    pos: usize,
    trailers_sent: bool,
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut st = this.state.lock().unwrap_or_else(|p| p.into_inner());
        if this.pos < st.kept.len() {
            if st.overflowed {
                return Poll::Ready(Some(Err("request body too large to replay".into())));
            }
            let data = st.kept[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(source) = st.source.as_mut() else {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = st.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.source = None;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                st.source = None;
                st.overflowed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    st.trailers = Some(t.clone());
                    st.source = None;
                    this.trailers_sent = true;
                } else if let Some(d) = frame.data_ref() {
                    if !st.overflowed && st.kept_bytes + d.len() <= st.limit {
                        st.kept_bytes += d.len();
                        st.kept.push(d.clone());
                        this.pos += 1;
                    } else {
                        st.overflowed = true;
                        st.kept.clear();
                        st.kept_bytes = 0;
                        this.pos = 0;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let replaying = self.pos < st.kept.len();
        let trailers_pending = !self.trailers_sent && st.trailers.is_some();
        match &st.source {
            Some(s) => !replaying && s.is_end_stream(),
            None => !replaying && !trailers_pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let rest: usize = st.kept.iter().skip(self.pos).map(Bytes::len).sum();
        match &st.source {
            Some(s) => crate::body::hint_plus(s.size_hint(), rest as u64),
            None => SizeHint::with_exact(rest as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body(chunks: &[&'static str], trailers: bool) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-t", "1".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        crate::body::boxed(StreamBody::new(futures::stream::iter(frames)))
    }

    /// A streaming body whose size the caller announced (`content-length`).
    struct Announced(Vec<&'static str>);

    impl http_body::Body for Announced {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0.is_empty() {
                return Poll::Ready(None);
            }
            let c = self.0.remove(0);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(c.as_bytes())))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.iter().map(|c| c.len() as u64).sum())
        }
    }

    /// A retry that starts while the caller's body, of announced length, is
    /// still arriving: the replayed part plus the exact rest, no panic.
    #[tokio::test]
    async fn retry_of_an_announced_body_still_streaming() {
        let r = Replay::new(crate::body::boxed(Announced(vec!["ab", "cd", "ef"])), 1024);
        assert_eq!(r.attempt().size_hint().exact(), Some(6));
        let mut first = r.attempt();
        first.frame().await.unwrap().unwrap();
        drop(first);
        let second = r.attempt();
        assert_eq!(second.size_hint().exact(), Some(6));
        let (b2, _) = read(second).await;
        assert_eq!(b2, b"abcdef");
    }

    async fn read(b: Body) -> (Vec<u8>, Option<HeaderMap>) {
        let c = b.collect().await.unwrap();
        let t = c.trailers().cloned();
        (c.to_bytes().to_vec(), t)
    }

    #[tokio::test]
    async fn second_attempt_gets_the_same_bytes_and_trailers() {
        let r = Replay::new(body(&["ab", "cd"], true), 1024);
        let (b1, t1) = read(r.attempt()).await;
        assert!(r.can_replay());
        let (b2, t2) = read(r.attempt()).await;
        assert_eq!(b1, b"abcd");
        assert_eq!(b1, b2);
        assert_eq!(t1.unwrap()["x-t"], "1");
        assert_eq!(t2.unwrap()["x-t"], "1");
    }

    #[tokio::test]
    async fn a_partly_read_body_continues_on_the_next_attempt() {
        let r = Replay::new(body(&["ab", "cd", "ef"], false), 1024);
        let mut first = r.attempt();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(first);
        let (b2, _) = read(r.attempt()).await;
        assert_eq!(b2, b"abcdef");
    }

    #[tokio::test]
    async fn over_the_limit_streams_but_cannot_replay() {
        let r = Replay::new(body(&["aaaa", "bbbb", "cccc"], false), 6);
        let (b1, _) = read(r.attempt()).await;
        assert_eq!(b1, b"aaaabbbbcccc");
        assert!(!r.can_replay());
    }

    #[tokio::test]
    async fn empty_body_is_end_of_stream() {
        let r = Replay::new(crate::body::empty(), 16);
        assert!(r.attempt().is_end_stream());
        assert!(r.attempt().is_end_stream());
    }
}
