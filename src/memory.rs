//! Giving freed memory back to the system. glibc's allocator keeps what is freed for reuse, so
//! a process's RSS (what a container limit sees) stays at its high-water mark after a burst
//! unless the heap is trimmed; the server trims once a minute and when its last call ends, and
//! the end-of-turn worker when it gives its arena back.

/// Returns the free pages of every malloc arena to the system. It only walks the free lists
/// (milliseconds on a few hundred MB); a no-op where the C library is not glibc.
pub(crate) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
