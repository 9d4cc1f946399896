//! The one way tests start a service and wait for it: in this process ([`InProcess`], any
//! `run(listener, shutdown)` on 127.0.0.1:0) or as a child process ([`crate::process`]), then
//! [`wait_serving`] through grpc.health.v1 `Watch` (no polling of the status, no sleeps).

use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Failure guard for waits that include model loading; never used to synchronise.
pub const GUARD: Duration = Duration::from_secs(300);

/// The shutdown signal handed to an in-process service.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A lazily connected channel to `url`.
pub fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .expect("a valid URL")
        .connect_lazy()
}

/// Waits until `url` reports SERVING for `service` ("" = the whole server) through the health `Watch`
/// stream. The server must be listening already (in-process services bind before they start; processes
/// have printed their address); it fails when the stream ends (the server stopped) or at `timeout`.
pub async fn wait_serving(url: &str, service: &str, timeout: Duration) -> Result<(), String> {
    let mut health = HealthClient::new(channel(url));
    let watch = async {
        let mut stream = health
            .watch(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|s| format!("{url}: health watch failed: {s}"))?
            .into_inner();
        while let Some(m) = stream.message().await.map_err(|e| e.to_string())? {
            if m.status == ServingStatus::Serving as i32 {
                return Ok(());
            }
        }
        Err(format!("{url}: the health stream ended before SERVING"))
    };
    tokio::time::timeout(timeout, watch)
        .await
        .map_err(|_| format!("{url} not SERVING after {timeout:?}"))?
}

/// Waits until `url` reports NOT_SERVING (or stops answering) for `service`.
pub async fn wait_not_serving(url: &str, service: &str, timeout: Duration) -> Result<(), String> {
    let mut health = HealthClient::new(channel(url));
    let watch = async {
        let mut stream = match health
            .watch(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(_) => return Ok(()),
        };
        loop {
            match stream.message().await {
                Ok(Some(m)) if m.status == ServingStatus::Serving as i32 => {}
                _ => return Ok(()),
            }
        }
    };
    tokio::time::timeout(timeout, watch)
        .await
        .map_err(|_| format!("{url} still SERVING after {timeout:?}"))?
}

/// The health status `url` reports now for `service`.
pub async fn health(url: &str, service: &str) -> Result<i32, String> {
    HealthClient::new(channel(url))
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|e| e.to_string())
}

/// A service running in this process on 127.0.0.1:0 until [`InProcess::stop`] (or drop).
pub struct InProcess<E> {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), E>>>,
}

impl<E: Send + 'static> InProcess<E> {
    /// Binds 127.0.0.1:0 and spawns `run(listener, shutdown)` (a service library's `run`).
    pub async fn start<F, Fut>(run: F) -> Self
    where
        F: FnOnce(TcpListener, Shutdown) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown: Shutdown = Box::pin(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(run(listener, shutdown));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// [`InProcess::start`], then waits for SERVING (whole server).
    pub async fn serving<F, Fut>(run: F) -> Self
    where
        F: FnOnce(TcpListener, Shutdown) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let s = Self::start(run).await;
        wait_serving(&s.url(), "", GUARD)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn channel(&self) -> Channel {
        channel(&self.url())
    }

    /// Whether `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits (at most `timeout`) for `run` to return by itself, e.g. after a fatal error.
    pub async fn ended(&mut self, timeout: Duration) -> Result<(), E>
    where
        E: Debug,
    {
        let task = self.task.take().expect("not awaited yet");
        tokio::time::timeout(timeout, task)
            .await
            .expect("the service ended in time")
            .expect("the service task did not panic")
    }

    /// Sends the shutdown signal without waiting (the service drains its in-flight calls).
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Sends the shutdown signal and returns what `run` returned (it must drain within `GUARD`).
    pub async fn stop(mut self) -> Result<(), E>
    where
        E: Debug,
    {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.ended(GUARD).await
    }
}

impl<E> Drop for InProcess<E> {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
