//! Stopping a long model operation when its request ends: the caller went away or its deadline passed.
//!
//! The caller of a model operation (a stage's job) installs an [`Interrupt`] for the current thread with
//! [`scoped`]; the long loops of the model (transformer and text-encoder layers, attention query chunks, VAE
//! blocks, conv bands and tiles, denoising steps) call [`check`] between their pieces, so an operation ends
//! within one piece of work of the request's end, whatever the image size. A stopped operation fails with
//! the error [`Interrupted`] ([`is_interrupted`] recognises it). Without an installed interrupt (tests,
//! tools, warm-up) [`check`] always passes. A check is one thread-local read, one atomic load and, with a
//! deadline, one clock read.
//!
//! Parallel kernels take [`current`] on the calling thread and poll [`Interrupt::stopped`] from their
//! worker threads.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Error, Result};

/// When an operation must stop: a flag the request's owner sets when the caller goes away, and the
/// caller's deadline. An operation serving several requests at once (a batched denoising step) stops
/// only once all of them have ended ([`Interrupt::all`]).
#[derive(Debug, Clone)]
pub struct Interrupt {
    parts: Arc<[(Arc<AtomicBool>, Option<Instant>)]>,
}

impl Interrupt {
    pub fn new(cancelled: Arc<AtomicBool>, deadline: Option<Instant>) -> Self {
        Self {
            parts: Arc::new([(cancelled, deadline)]),
        }
    }

    /// Stopped once every one of `interrupts` is (never stopped when empty).
    pub fn all(interrupts: &[Interrupt]) -> Self {
        let parts: Vec<_> = interrupts
            .iter()
            .flat_map(|i| i.parts.iter().cloned())
            .collect();
        Self {
            parts: parts.into(),
        }
    }

    /// True once the flag is set or the deadline has passed (for [`Interrupt::all`]: for every part).
    pub fn stopped(&self) -> bool {
        !self.parts.is_empty()
            && self.parts.iter().all(|(cancelled, deadline)| {
                cancelled.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d)
            })
    }

    /// [`Interrupted`] once stopped.
    pub fn check(&self) -> Result<()> {
        if self.stopped() {
            return Err(interrupted());
        }
        Ok(())
    }
}

/// The error of a stopped operation (its message is [`Interrupted::MESSAGE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl Interrupted {
    pub const MESSAGE: &'static str =
        "interrupted: the request was cancelled or its deadline passed";
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::MESSAGE)
    }
}

impl std::error::Error for Interrupted {}

fn interrupted() -> Error {
    Error::Wrapped(Box::new(Interrupted))
}

/// True when `e` is (or wraps) [`Interrupted`].
pub fn is_interrupted(e: &Error) -> bool {
    match e {
        Error::Wrapped(inner) => inner.to_string() == Interrupted::MESSAGE,
        Error::WithBacktrace { inner, .. } | Error::Context { inner, .. } => is_interrupted(inner),
        _ => false,
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Interrupt>> = const { RefCell::new(None) };
}

/// Runs `f` with `interrupt` installed for this thread (the previous one is restored after).
pub fn scoped<T>(interrupt: Interrupt, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Interrupt>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let previous = CURRENT.with(|c| c.borrow_mut().replace(interrupt));
    let _restore = Restore(previous);
    f()
}

/// The interrupt installed for this thread, if any (for parallel kernels to poll from their threads).
pub fn current() -> Option<Interrupt> {
    CURRENT.with(|c| c.borrow().clone())
}

/// [`Interrupted`] when the operation running on this thread must stop.
pub fn check() -> Result<()> {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(i) => i.check(),
        None => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn check_passes_without_an_interrupt_and_fails_once_stopped() {
        assert!(check().is_ok());
        let flag = Arc::new(AtomicBool::new(false));
        scoped(Interrupt::new(flag.clone(), None), || {
            assert!(check().is_ok());
            flag.store(true, Ordering::Relaxed);
            let e = check().expect_err("stopped");
            assert!(is_interrupted(&e), "{e}");
            let e = check()
                .expect_err("still stopped")
                .context("while decoding");
            assert!(is_interrupted(&e), "{e}");
        });
        assert!(check().is_ok(), "the scope ends with its closure");
    }

    #[test]
    fn a_passed_deadline_stops() {
        let past = Instant::now() - Duration::from_millis(1);
        let i = Interrupt::new(Arc::new(AtomicBool::new(false)), Some(past));
        assert!(i.stopped());
        let later = Instant::now() + Duration::from_secs(3600);
        let i = Interrupt::new(Arc::new(AtomicBool::new(false)), Some(later));
        assert!(!i.stopped());
        assert!(!is_interrupted(&Error::Msg("other".into())));
    }

    #[test]
    fn a_joint_interrupt_stops_once_all_its_parts_have() {
        let (a, b) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let joint = Interrupt::all(&[
            Interrupt::new(a.clone(), None),
            Interrupt::new(b.clone(), None),
        ]);
        a.store(true, Ordering::Relaxed);
        assert!(!joint.stopped(), "one request of two ended");
        b.store(true, Ordering::Relaxed);
        assert!(joint.stopped());
        assert!(!Interrupt::all(&[]).stopped());
    }
}
