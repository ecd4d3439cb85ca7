//! Response body that reports the end of a request to the resolver.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::Resolver;
use crate::metrics::ProxyMetrics;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Brackets one request to a VM (its start was counted by the resolver):
/// `on_request_end` exactly once when finished or dropped, if tracked.
pub(crate) struct ActivityGuard {
    end: Option<Box<dyn FnOnce() + Send>>,
}

impl ActivityGuard {
    pub(crate) fn start<R: Resolver>(
        resolver: &Arc<R>,
        vm_id: &str,
        track: bool,
        metrics: &ProxyMetrics,
    ) -> Self {
        metrics.active_inc();
        let resolver = Arc::clone(resolver);
        let metrics = metrics.clone();
        let vm_id = vm_id.to_owned();
        Self {
            end: Some(Box::new(move || {
                metrics.active_dec();
                if track {
                    resolver.on_request_end(&vm_id);
                }
            })),
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(end) = self.end.take() {
            end();
        }
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.finish();
    }
}

enum Kind {
    Full(Full<Bytes>),
    Incoming(Incoming),
}

/// The body of every response the proxy sends: either a small body made by the
/// proxy, or a backend's body streamed through (with its activity guard).
pub(crate) struct ProxyBody {
    kind: Kind,
    guard: Option<ActivityGuard>,
}

impl ProxyBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full(Full::new(bytes)),
            guard: None,
        }
    }

    pub(crate) fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub(crate) fn streaming(body: Incoming, guard: ActivityGuard) -> Self {
        Self {
            kind: Kind::Incoming(body),
            guard: Some(guard),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
            Kind::Incoming(incoming) => Pin::new(incoming).poll_frame(cx).map_err(BoxError::from),
        };
        if let Poll::Ready(None | Some(Err(_))) = &polled
            && let Some(mut guard) = this.guard.take()
        {
            guard.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(full) => full.is_end_stream(),
            Kind::Incoming(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(full) => full.size_hint(),
            Kind::Incoming(incoming) => incoming.size_hint(),
        }
    }
}
