//! Every metric name, in one place (Prometheus units, `qwen_image_` prefix). Labels: `service`, `rpc`,
//! `code`, `outcome`.

/// Counter: requests admitted to or rejected by a service queue. Labels: service, outcome
/// (`admitted` | `overloaded`).
pub const ADMISSIONS_TOTAL: &str = "qwen_image_admissions_total";
/// Gauge: requests admitted and not finished (queued + running). Labels: service.
pub const IN_FLIGHT: &str = "qwen_image_in_flight_requests";
/// Histogram: time a job waited in the queue before the worker took it. Labels: service.
pub const QUEUE_WAIT_SECONDS: &str = "qwen_image_queue_wait_seconds";
/// Histogram: worker time of one job. Labels: service, rpc, outcome.
pub const JOB_SECONDS: &str = "qwen_image_job_seconds";
/// Counter: denoising steps run. Labels: service.
pub const DENOISE_STEPS_TOTAL: &str = "qwen_image_denoise_steps_total";
/// Counter: jobs that ended early. Labels: service, outcome (`cancelled` | `deadline_exceeded`).
pub const JOBS_STOPPED_TOTAL: &str = "qwen_image_jobs_stopped_total";

/// Outcome label values.
pub const OUTCOME_ADMITTED: &str = "admitted";
pub const OUTCOME_OVERLOADED: &str = "overloaded";
pub const OUTCOME_OK: &str = "ok";
pub const OUTCOME_ERROR: &str = "error";
pub const OUTCOME_CANCELLED: &str = "cancelled";
pub const OUTCOME_DEADLINE_EXCEEDED: &str = "deadline_exceeded";
