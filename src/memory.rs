//! Giving freed memory back to the system. glibc's allocator keeps what is freed for reuse, so
//! a process's RSS (what a container limit sees) stays at its high-water mark after a burst
//! unless the heap is trimmed; the server trims once a minute and when its last call ends, and
//! the end-of-turn worker when it gives its arena back.
//!
//! Trimming alone is not enough: `malloc_trim` gives back the free pages inside each arena but
//! never the free space at the top of a thread's arena, which glibc shrinks only when it exceeds
//! a trim threshold that grows with the largest block ever freed (up to 64 MiB). After an
//! 8-minute, 50-call soak, three thread arenas held 10, 6 and 4 MiB that way.
//! [`bound_retained_heap`] fixes both thresholds so no arena keeps more than [`RETAIN`] at its top.

/// The most free memory an arena keeps at its top, and the size from which a block is mapped
/// on its own (and unmapped when freed).
pub(crate) const RETAIN: usize = 512 * 1024;

/// Fixes glibc's trim and mmap thresholds at [`RETAIN`] (which also stops them growing), unless
/// the operator set either through the environment. A no-op where the C library is not glibc.
pub(crate) fn bound_retained_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |name: &str| std::env::var_os(name).is_some();
        if set("MALLOC_TRIM_THRESHOLD_") || set("MALLOC_MMAP_THRESHOLD_") || set("GLIBC_TUNABLES") {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; it takes the arenas' locks itself.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, RETAIN as libc::c_int);
            libc::mallopt(libc::M_MMAP_THRESHOLD, RETAIN as libc::c_int);
        }
    }
}

/// Returns the free pages of every malloc arena to the system. It only walks the free lists
/// (milliseconds on a few hundred MB); a no-op where the C library is not glibc.
pub(crate) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
