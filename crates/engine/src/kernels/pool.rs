//! A small broadcast thread pool for the kernels.
//!
//! Each parallel section hands one closure to every thread; the calling
//! thread takes part as thread 0. Workers spin for a short while after a
//! section (decode runs ~150 sections per token back to back) and then sleep
//! on a condition variable, so an idle node costs no CPU. How work is split
//! never changes a result: every output element is computed by exactly one
//! thread with the same instruction sequence.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a worker spins on the next section before it goes to sleep:
/// long enough to span the gaps between the sections of one forward pass,
/// short enough not to steal a small machine's cores from other work.
const SPIN: Duration = Duration::from_micros(50);
/// Spin iterations between two looks at the clock (reading it is not free).
const SPINS_PER_CHECK: u32 = 64;

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped once per section; workers run the job when it changes.
    epoch: AtomicU64,
    /// The current section's job. Written only while every worker is idle.
    job: Mutex<Option<*const Job>>,
    /// Workers that have not finished the current section.
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    panicked: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: the raw job pointer is only dereferenced while `run` keeps the
// closure it points to alive (it waits for `pending == 0` before returning).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// From this many rows (a prefill), row-wise work is split between the
/// threads (see [`CpuPool::split_rows`]).
pub const PARALLEL_ROWS: usize = 8;

/// An output buffer the pool's threads write disjoint parts of (the user
/// hands out the parts: `map_rows` runs of rows, `matmul` panels).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: only a pointer; its users give each thread a disjoint part.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A fixed set of compute threads. Cheap to share: clone the `Arc`.
pub struct CpuPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes sections from different callers.
    section: Mutex<()>,
    threads: usize,
}

impl CpuPool {
    /// A pool of `threads` threads in all, the caller included.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panicked: Mutex::new(None),
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new().name(format!("hotpot-cpu-{index}")).spawn(move || worker(&shared, index))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { shared, workers, section: Mutex::new(()), threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job(thread_index)` on every thread of the pool and returns when
    /// all have finished.
    pub fn broadcast(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            job(0);
            return;
        }
        let _section = self.section.lock().unwrap_or_else(|e| e.into_inner());
        let shared = &*self.shared;
        // SAFETY: we erase the lifetime; the pointer is dropped from the slot
        // below before this function returns, and workers only use it between
        // seeing the new epoch and decrementing `pending`.
        let ptr: *const Job = unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(job) };
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(ptr);
        shared.pending.store(self.threads - 1, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let started = Instant::now();
        let mut spins = 0u32;
        let mut spinning = true;
        while shared.pending.load(Ordering::Acquire) != 0 {
            if spinning {
                std::hint::spin_loop();
                spins += 1;
                if spins.is_multiple_of(SPINS_PER_CHECK) {
                    spinning = started.elapsed() < SPIN;
                }
            } else {
                std::thread::yield_now();
            }
        }
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if let Some(payload) = shared.panicked.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(payload);
        }
    }

    /// `f(rows)` over `0..rows`: in contiguous runs split between the
    /// threads from [`PARALLEL_ROWS`] rows on (prefill), on the calling
    /// thread below that (a decode step's row is cheaper than waking the
    /// others). Row-wise work gives the same bits whichever thread runs it.
    pub fn split_rows(&self, rows: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        if self.threads == 1 || rows < PARALLEL_ROWS {
            f(0..rows);
        } else {
            self.for_each_chunk(rows, rows.div_ceil(self.threads), f);
        }
    }

    /// `f(input rows, output rows)` over the rows of `input` (rows of
    /// `in_len` values) and `out` (rows of `out_len`), split as
    /// [`Self::split_rows`] splits them.
    pub fn map_rows(&self, input: &[f32], in_len: usize, out: &mut [f32], out_len: usize, f: &(dyn Fn(&[f32], &mut [f32]) + Sync)) {
        let rows = (input.len() / in_len.max(1)).min(out.len() / out_len.max(1));
        let dst = SharedOut(out.as_mut_ptr());
        self.split_rows(rows, &|range| {
            // SAFETY: the runs of `0..rows` are disjoint, so each run of
            // output rows has one writer, and all lie inside `out`.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.get().add(range.start * out_len), range.len() * out_len) };
            f(&input[range.start * in_len..range.end * in_len], out);
        });
    }

    /// Splits `0..items` into chunks of `chunk` and hands them out to the
    /// threads dynamically (a slow or preempted thread takes fewer chunks).
    pub fn for_each_chunk(&self, items: usize, chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        if self.threads == 1 || items <= chunk {
            if items > 0 {
                f(0..items);
            }
            return;
        }
        // Chunks `front..back` are left. The calling thread takes them from
        // the back, the workers from the front: the front of a product is
        // what the previous product's prefetch ran into, so the workers,
        // which start a little later, start on bytes already on their way.
        let count = items.div_ceil(chunk) as u64;
        let left = AtomicU64::new(count << 32);
        let take = |from_back: bool| -> Option<usize> {
            let mut cur = left.load(Ordering::Relaxed);
            loop {
                let (back, front) = (cur >> 32, cur & 0xffff_ffff);
                if front >= back {
                    return None;
                }
                let (next, index) = if from_back { ((back - 1) << 32 | front, back - 1) } else { (back << 32 | (front + 1), front) };
                match left.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return Some(index as usize),
                    Err(seen) => cur = seen,
                }
            }
        };
        self.broadcast(&|thread| {
            while let Some(index) = take(thread == 0) {
                let start = index * chunk;
                f(start..(start + chunk).min(items));
            }
        });
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a new section: spin first, then sleep.
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            if shared.epoch.load(Ordering::Acquire) != seen {
                break;
            }
            spins += 1;
            if !spins.is_multiple_of(SPINS_PER_CHECK) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let guard = shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            let guard = shared
                .wake
                .wait_while(guard, |_| shared.epoch.load(Ordering::SeqCst) == seen && !shared.shutdown.load(Ordering::SeqCst))
                .unwrap_or_else(|e| e.into_inner());
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
        }
        seen = shared.epoch.load(Ordering::Acquire);
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            // SAFETY: `broadcast` keeps the closure alive until `pending`
            // reaches zero, which happens only after this call returns.
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index) }));
            if let Err(payload) = result {
                *shared.panicked.lock().unwrap_or_else(|e| e.into_inner()) = Some(payload);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for CpuPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.sleep_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool").field("threads", &self.threads).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_every_section() {
        let pool = CpuPool::new(3).expect("threads");
        for _ in 0..1000 {
            let hits = AtomicUsize::new(0);
            pool.broadcast(&|i| {
                hits.fetch_add(1 << (8 * i), Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 1 | 1 << 8 | 1 << 16);
        }
    }

    #[test]
    fn chunks_cover_each_item_once() {
        // The caller takes chunks from the back while the workers take them
        // from the front; repeated so that they often meet in the middle.
        for threads in 1..=3 {
            let pool = CpuPool::new(threads).expect("threads");
            for _ in 0..200 {
                for (items, chunk) in [(0, 5), (1, 5), (7, 5), (64, 5), (1001, 5), (10, 1), (2, 1)] {
                    let seen: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
                    pool.for_each_chunk(items, chunk, &|range| {
                        for i in range {
                            seen[i].fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    assert!(seen.iter().all(|n| n.load(Ordering::Relaxed) == 1), "{threads} threads, {items} items");
                }
            }
        }
    }

    #[test]
    fn wakes_after_sleeping() {
        let pool = CpuPool::new(2).expect("threads");
        std::thread::sleep(SPIN * 5);
        let hits = AtomicUsize::new(0);
        pool.broadcast(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let pool = CpuPool::new(2).expect("threads");
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.broadcast(&|i| assert!(i == 0, "worker fails"));
        }));
        assert!(result.is_err());
        // The pool still works afterwards.
        let hits = AtomicUsize::new(0);
        pool.broadcast(&|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
