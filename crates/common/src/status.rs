//! Status helpers shared by the services.

use std::time::Duration;

use tonic::{Code, Status};

/// Metadata key carrying the retry hint of a RESOURCE_EXHAUSTED answer, in milliseconds.
pub const RETRY_AFTER_MS_KEY: &str = "retry-after-ms";

/// RESOURCE_EXHAUSTED with a retry hint in the message and in `retry-after-ms` metadata.
pub fn overloaded(service: &str, capacity: usize, retry_after: Duration) -> Status {
    let ms = retry_after.as_millis() as u64;
    let mut status = Status::new(
        Code::ResourceExhausted,
        format!(
            "the {service} is busy ({capacity} requests admitted); retry after about {ms} ms or send to another replica"
        ),
    );
    if let Ok(v) = ms.to_string().parse() {
        status.metadata_mut().insert(RETRY_AFTER_MS_KEY, v);
    }
    status
}

/// The retry hint of a Status made by [`overloaded`].
pub fn retry_after(status: &Status) -> Option<Duration> {
    let v = status.metadata().get(RETRY_AFTER_MS_KEY)?.to_str().ok()?;
    v.parse().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_carries_a_hint() {
        let s = overloaded("denoiser", 2, Duration::from_millis(1500));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("retry after about 1500 ms"));
        assert_eq!(retry_after(&s), Some(Duration::from_millis(1500)));
    }
}
