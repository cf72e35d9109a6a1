//! Preparing a request (rendering its chat template, tokenizing its
//! prompts) off the async runtime. Small requests are prepared in place;
//! large ones on one low-priority thread, one at a time, so a few
//! megabyte-sized prompts cannot stall the streams the runtime is serving.
//! Memory a large request used is handed back to the system afterwards.

use std::sync::mpsc;

use crate::error::ApiError;

/// Text up to this size is prepared in place (a few milliseconds).
pub(crate) const IN_PLACE_BYTES: usize = 64 << 10;
/// Large requests waiting to be prepared before more are refused.
const QUEUE: usize = 16;

type Job = Box<dyn FnOnce() + Send>;

/// The preparation thread.
pub(crate) struct Prep {
    jobs: mpsc::SyncSender<Job>,
}

impl Prep {
    pub(crate) fn start() -> Self {
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
        let spawned = std::thread::Builder::new().name("hotpot-prep".into()).spawn(move || {
            lower_priority();
            while let Ok(job) = queue.recv() {
                job();
                release_memory();
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the preparation thread; large requests will be refused");
        }
        Self { jobs }
    }

    /// Runs `f` (a request's preparation of `bytes` bytes of text) in
    /// place when small, on the preparation thread otherwise.
    pub(crate) async fn run<R: Send + 'static>(&self, bytes: usize, f: impl FnOnce() -> R + Send + 'static) -> Result<R, ApiError> {
        if bytes <= IN_PLACE_BYTES {
            return Ok(f());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.try_send(job).map_err(|_| ApiError::Overloaded {
            message: format!("{QUEUE} large requests are already waiting to be tokenized; try again shortly"),
            retry_after_s: 1,
        })?;
        rx.await.map_err(|_| ApiError::Internal("the preparation thread stopped".into()))
    }
}

/// Lets the operating system prefer every other thread to this one.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority changes only this
    // thread's nice value.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// Returns freed heap memory to the system (glibc keeps it otherwise).
pub(crate) fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
