//! grpc.health.v1 reporting: the named service and the whole server ("") move together.

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Health of one stage service: NOT_SERVING until the model is loaded and warmed up, and again while
/// draining.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service_name: &'static str,
}

impl Health {
    /// A reporter and its gRPC service, both NOT_SERVING. `service_name` is the full proto name
    /// (e.g. `qwen_image.v1.Denoiser`).
    pub async fn new(
        service_name: &'static str,
    ) -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let h = Self {
            reporter,
            service_name,
        };
        h.set(ServingStatus::NotServing).await;
        (h, service)
    }

    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter
            .set_service_status(self.service_name, status)
            .await;
        self.reporter.set_service_status("", status).await;
    }
}
