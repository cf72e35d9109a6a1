//! Byte buffers aligned to a cache line, for packed weights.
//!
//! On Linux, arenas of 2 MiB or more are mapped on their own, start on a
//! 2 MiB boundary and ask for transparent huge pages over their whole
//! 2 MiB stretches (`MADV_HUGEPAGE`; the tail keeps 4 KiB pages, so
//! nothing is rounded up in resident memory). Decode streams every weight
//! once per token and prefetches 32 KiB ahead: with 4 KiB pages each page
//! costs a TLB miss and a page walk. Measured 2026-12-03 with `hotpot bench
//! MODEL -t 1 -p 0 -n 128`, 4 KiB and huge pages alternating (4 pairs):
//! Qwen2.5-Coder 1.5B decode 18.6–19.9 → 18.9–20.8 t/s (faster in every
//! pair, and in 6 of 7 counting shorter runs), Gemma 3 270M 70–83 →
//! 77–85, the 0.5B 43–47 → 45–52. Where the kernel grants no huge pages
//! (`enabled` = `never`) the mapping is plain memory.

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// One block of zeroed memory that hands out disjoint, 64-byte aligned
/// regions ([`AlignedBuf`]s) one after another. A span packs all its
/// blocks' matrices into one arena, in the order decode reads them: the
/// small matrices get huge pages too (a 0.5 MB matrix alone never fills
/// one), and decode's prefetch, which runs 32 KiB past the end of each
/// product, brings in the start of the next one. Measured 2026-12-03 with
/// `hotpot bench MODEL -t 1 -p 0 -n 64`, one buffer per matrix against one
/// arena per span, old and new binaries alternating (medians of pairs):
/// SmolLM2 143 → 173 t/s (8 pairs, faster in all 8), Qwen2.5-Coder 0.5B
/// 41.9 → 44.2 (6), 1.5B 16.8 → 17.4 (4, `-n 32`), Gemma 3 270M 73.8 →
/// 74.4 (6, within the noise).
pub struct Arena {
    base: *mut u8,
    cap: usize,
    /// Bytes handed out so far.
    used: std::sync::Mutex<usize>,
    storage: Storage,
}

enum Storage {
    Lines(usize),
    #[cfg(target_os = "linux")]
    Mapped(#[expect(dead_code, reason = "held to be unmapped when the arena drops")] huge::Mapping),
}

// SAFETY: the arena owns its memory like a `Vec` owns its buffer; every
// byte belongs to at most one region, and a region is read through `&` and
// written through `&mut` of the `AlignedBuf` that holds it.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    /// An arena of `cap` zeroed bytes.
    pub fn new(cap: usize) -> Self {
        #[cfg(target_os = "linux")]
        if cap >= huge::PAGE
            && let Some(mapping) = huge::Mapping::zeroed(cap)
        {
            return Self { base: mapping.start().cast_mut(), cap, used: Default::default(), storage: Storage::Mapped(mapping) };
        }
        let lines = cap.div_ceil(64);
        let base = Box::into_raw(vec![Line([0; 64]); lines].into_boxed_slice()).cast::<u8>();
        Self { base, cap, used: Default::default(), storage: Storage::Lines(lines) }
    }

    /// Bytes an arena needs for regions of these lengths, taken in turn.
    pub fn bytes_for(lens: impl IntoIterator<Item = usize>) -> usize {
        lens.into_iter().map(|len| len.next_multiple_of(64)).sum()
    }

    /// The next `len` bytes (starting on a cache line), or `None` when the
    /// arena has fewer left.
    pub fn take(self: &std::sync::Arc<Self>, len: usize) -> Option<AlignedBuf> {
        let mut used = self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = *used;
        if self.cap - at < len {
            return None;
        }
        *used = (at + len).next_multiple_of(64).min(self.cap);
        Some(AlignedBuf { arena: self.clone(), at, len })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if let Storage::Lines(lines) = self.storage {
            // SAFETY: `base` came from `Box::into_raw` of `lines` lines in `new`.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.base.cast::<Line>(), lines)) });
        }
    }
}

/// Zeroed bytes whose start is 64-byte aligned: a region of an [`Arena`],
/// alone in one or shared with other regions.
pub struct AlignedBuf {
    arena: std::sync::Arc<Arena>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    /// Bytes in an arena of their own.
    pub fn zeroed(len: usize) -> Self {
        std::sync::Arc::new(Arena::new(len)).take(len).expect("a fresh arena holds its length")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `next` starts right where `self` ends, in the same arena.
    pub fn followed_by(&self, next: &AlignedBuf) -> bool {
        std::sync::Arc::ptr_eq(&self.arena, &next.arena) && self.at + self.len == next.at
    }

    /// `self` and `next` (see `followed_by`) as one region.
    pub fn join(self, next: AlignedBuf) -> AlignedBuf {
        assert!(self.followed_by(&next), "only adjacent regions of one arena join");
        AlignedBuf { len: self.len + next.len, ..self }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `at + len <= cap`, zeroed or written bytes of the arena,
        // which lives as long as `self`; no `&mut` to them exists elsewhere
        // (regions are disjoint).
        unsafe { std::slice::from_raw_parts(self.arena.base.add(self.at), self.len) }
    }

    /// The buffer as 64-bit words (its length rounded down to whole words).
    pub fn as_mut_words(&mut self) -> &mut [u64] {
        let bytes = self.as_mut_slice();
        // SAFETY: the region is 64-byte aligned, so aligned for `u64`; every
        // bit pattern is a valid `u64`; the words lie inside the region.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<u64>(), bytes.len() / 8) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; this region's bytes belong to `self` alone.
        unsafe { std::slice::from_raw_parts_mut(self.arena.base.add(self.at), self.len) }
    }
}

#[cfg(target_os = "linux")]
mod huge {
    /// A transparent huge page.
    pub const PAGE: usize = 2 << 20;

    /// An anonymous private mapping (zero-filled) with a 2 MiB-aligned
    /// stretch of `len` bytes inside it.
    pub struct Mapping {
        base: *mut libc::c_void,
        size: usize,
        offset: usize,
    }

    // SAFETY: the mapping is owned memory, like a `Vec`'s buffer; access
    // goes through `AlignedBuf`'s borrows.
    unsafe impl Send for Mapping {}
    unsafe impl Sync for Mapping {}

    impl Mapping {
        /// `None` when the mapping fails (the caller falls back to the heap).
        pub fn zeroed(len: usize) -> Option<Self> {
            let size = len.checked_add(PAGE)?;
            // SAFETY: a fresh anonymous mapping; no existing memory is touched.
            let base = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
            if base == libc::MAP_FAILED {
                return None;
            }
            let offset = (base as usize).next_multiple_of(PAGE) - base as usize;
            // SAFETY: `offset + len <= size`, inside the mapping. Advice
            // only: a kernel without huge pages leaves them 4 KiB.
            unsafe { libc::madvise(base.cast::<u8>().add(offset).cast(), len / PAGE * PAGE, libc::MADV_HUGEPAGE) };
            Some(Self { base, size, offset })
        }

        pub fn start(&self) -> *const u8 {
            // SAFETY: `offset` lies inside the mapping.
            unsafe { self.base.cast::<u8>().add(self.offset) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `zeroed`, unmapped once.
            unsafe { libc::munmap(self.base, self.size) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        for len in [0, 1, 63, 64, 65, 1000, 2 << 20, (5 << 20) + 3] {
            let mut buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_slice().len(), len);
            assert_eq!(buf.as_slice().as_ptr() as usize % 64, 0);
            if cfg!(target_os = "linux") && len >= 2 << 20 {
                assert_eq!(buf.as_slice().as_ptr() as usize % (2 << 20), 0, "a large buffer starts on a huge page");
            }
            assert!(buf.as_mut_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn an_arena_hands_out_disjoint_adjacent_regions() {
        let lens = [100, 64, 3 << 20, 1];
        let arena = std::sync::Arc::new(Arena::new(Arena::bytes_for(lens)));
        let mut regions: Vec<AlignedBuf> = lens.iter().map(|&len| arena.take(len).expect("sized for these")).collect();
        assert!(arena.take(1).is_none(), "the arena is full");
        for (i, region) in regions.iter_mut().enumerate() {
            assert_eq!(region.as_slice().as_ptr() as usize % 64, 0);
            region.as_mut_slice().fill(i as u8 + 1);
        }
        for (i, region) in regions.iter().enumerate() {
            assert!(region.as_slice().iter().all(|&b| b == i as u8 + 1), "region {i} kept its bytes");
        }
        // 100 bytes are padded to 128: the first two regions do not touch.
        assert!(!regions[0].followed_by(&regions[1]));
        assert!(regions[1].followed_by(&regions[2]) && regions[2].followed_by(&regions[3]));
        assert!(!regions[1].followed_by(&AlignedBuf::zeroed(64)), "another arena's region never follows");
        let last = regions.pop().unwrap();
        let big = regions.pop().unwrap();
        let joined = big.join(last);
        assert_eq!(joined.len(), (3 << 20) + 1);
        assert_eq!(joined.as_slice()[3 << 20], 4);
    }
}
