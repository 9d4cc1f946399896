//! Serving a service's routes on its listener, over TLS or in plaintext, and grpc.health.v1 alone on the
//! plaintext health listener.

use std::future::Future;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::service::Routes;
use tonic::transport::Server;

use super::ServerTls;
use crate::admit_gate::AdmitGateLayer;

/// Where and how a service serves: its gRPC listener, its TLS (none: plaintext h2c), the optional
/// plaintext health-only listener, and whether gRPC reflection is served (`--no-reflection` turns it off).
#[derive(Debug)]
pub struct Listeners {
    pub main: TcpListener,
    pub tls: Option<ServerTls>,
    pub health: Option<TcpListener>,
    pub reflection: bool,
}

impl From<TcpListener> for Listeners {
    /// Plaintext, no health listener, reflection on.
    fn from(main: TcpListener) -> Self {
        Self {
            main,
            tls: None,
            health: None,
            reflection: true,
        }
    }
}

/// Serves `routes` (service `name`: the metrics label) behind `gate` (admission before decoding) and,
/// unless turned off, gRPC reflection on `listeners.main` until `stop` resolves, then drains. `health` (grpc.health.v1 alone) is served on `listeners.health` until the main server has
/// drained, so that probes see NOT_SERVING during the drain. With TLS, certificates reload on SIGHUP
/// and on file changes while serving.
pub async fn serve(
    name: &'static str,
    gate: AdmitGateLayer,
    routes: Routes,
    health: Routes,
    listeners: Listeners,
    stop: impl Future<Output = ()>,
) -> Result<(), String> {
    let health_server = listeners.health.map(|listener| {
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(
            Server::builder()
                .add_routes(health)
                .serve_with_incoming_shutdown(crate::transport::incoming(listener), async {
                    let _ = rx.await;
                }),
        );
        (tx, task)
    });
    let routes = if listeners.reflection {
        let (v1, v1alpha) = crate::transport::reflection()?;
        routes.add_service(v1).add_service(v1alpha)
    } else {
        routes
    };
    let server = crate::transport::server(name)
        .layer(gate)
        .add_routes(routes);
    let served = match listeners.tls {
        Some(tls) => {
            let _watch = tls.watch();
            server
                .serve_with_incoming_shutdown(tls.incoming(listeners.main), stop)
                .await
        }
        None => {
            server
                .serve_with_incoming_shutdown(crate::transport::incoming(listeners.main), stop)
                .await
        }
    };
    if let Some((tx, task)) = health_server {
        let _ = tx.send(());
        let _ = task.await;
    }
    served.map_err(|e| format!("gRPC server failed: {e}"))
}
