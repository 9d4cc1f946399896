//! Admission before decoding: a layer that decides on a call when it arrives, from its path and headers,
//! before tonic reads and decodes its message. A refused call is answered (trailers-only) without its
//! message ever being held, so a server's memory is bounded by what it admits, not by its callers. What
//! an admission holds (a stage's queue slot, the gateway's queue place) travels to the handler in a
//! task-local (the handler runs inside the call's future) and is taken there with [`take_admitted`].
//! Used by every stage ([`crate::stage::gate`]) and by the gateway.

use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;

use crate::grpc::BoxFuture;

/// What a call gets at arrival: `None` = not gated (served as is); `Some(Ok(held))` = admitted, `held`
/// waits for the handler; `Some(Err(status))` = refused with `status`.
pub type Admission = Option<Result<Box<dyn Any + Send>, Status>>;

/// The decision, from the call's path and headers.
pub type Decide = Arc<dyn Fn(&str, &http::HeaderMap) -> Admission + Send + Sync>;

tokio::task_local! {
    static ADMITTED: RefCell<Option<Box<dyn Any + Send>>>;
}

/// What the layer admitted the current call with, if it is a `T` (taken once).
pub fn take_admitted<T: 'static>() -> Option<T> {
    ADMITTED
        .try_with(|held| {
            let mut held = held.borrow_mut();
            match held.take()?.downcast::<T>() {
                Ok(t) => Some(*t),
                Err(other) => {
                    *held = Some(other);
                    None
                }
            }
        })
        .ok()
        .flatten()
}

/// The layer.
#[derive(Clone)]
pub struct AdmitGateLayer {
    decide: Decide,
}

impl AdmitGateLayer {
    pub fn new(decide: Decide) -> Self {
        Self { decide }
    }
}

impl<S> tower::Layer<S> for AdmitGateLayer {
    type Service = AdmitGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmitGate {
            inner,
            decide: self.decide.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AdmitGate<S> {
    inner: S,
    decide: Decide,
}

impl<S> tower::Service<http::Request<Body>> for AdmitGate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let mut inner = crate::grpc::take_ready(&mut self.inner);
        match (self.decide)(req.uri().path(), req.headers()) {
            None => Box::pin(inner.call(req)),
            Some(Ok(held)) => Box::pin(ADMITTED.scope(RefCell::new(Some(held)), inner.call(req))),
            // The message is never read: dropping the request resets the caller's stream after the answer.
            Some(Err(status)) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_handler_takes_what_the_layer_admitted_once_and_by_type() {
        let held: Box<dyn Any + Send> = Box::new(7u32);
        ADMITTED
            .scope(RefCell::new(Some(held)), async {
                assert_eq!(take_admitted::<String>(), None, "another type stays");
                assert_eq!(take_admitted::<u32>(), Some(7));
                assert_eq!(take_admitted::<u32>(), None, "taken once");
            })
            .await;
        assert_eq!(take_admitted::<u32>(), None, "outside a gated call");
    }
}
