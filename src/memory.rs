//! Process-wide memory settings, applied first thing in `main` (and by the benches, which run
//! the binary's allocator): today, no transparent huge pages for this process.

/// Turns transparent huge pages off for this process (Linux; nothing elsewhere).
///
/// mimalloc asks the kernel for huge pages on its arenas (`MADV_HUGEPAGE`). Once a process has
/// held a lot of memory, every fresh 2 MiB page it touches must be zeroed whole at fault time:
/// in `perf`, an embedded-bus consumer that ran after a Kafka client in the same process spent
/// 80 % of its CPU in the kernel's `clear_page_erms` and consumed at a tenth of its usual rate.
/// Regular 4 KiB pages cost nothing measurable in the same runs.
pub fn disable_transparent_huge_pages() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        // An old kernel or a seccomp profile without prctl: run with the system's setting.
        tracing::debug!(error = %e, "could not turn transparent huge pages off");
    }
}
