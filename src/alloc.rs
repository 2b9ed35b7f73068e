//! Allocator tuning for tensor workloads.

/// Asks glibc malloc to keep freed memory for reuse instead of returning every large buffer to
/// the kernel: by default each tensor over 128 KiB is a fresh mmap whose pages the kernel must
/// zero on first touch, which perf showed as a fifth of the CPU time of a UNet forward pass
/// (a training step of the tiny UNet preset at batch 4 x 16 frames went from 2.9 s to 2.2 s). A no-op elsewhere.
pub fn tune_for_tensors() {
    // candle asks for its thread count on every CPU op; without RAYON_NUM_THREADS that means
    // parsing /proc/cpuinfo each time (5% of a teacher training step, seen with perf).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        // Set before any thread exists (first thing in main).
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // Candle's element-wise pool serialises concurrent callers, which sharded steps are
    // (`train::shard`); at one thread its ops run inline on each shard's own thread.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() && crate::train::shard::enabled() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // M_MMAP_THRESHOLD = -3 (malloc.h): blocks below it come from the heap and are reused;
        // 32 MiB is the largest value glibc accepts on 64-bit.
        libc::mallopt(-3, 32 << 20);
        // M_TRIM_THRESHOLD = -1: keep freed memory at the top of the heap instead of trimming it.
        libc::mallopt(-1, 1 << 30);
        // M_MMAP_MAX = -4: no mmap at all, so blocks over the 32 MiB threshold (the im2col
        // columns of a convolution, attention scores) are reused from the heap too instead of
        // being mapped, faulted in page by page and zeroed by the kernel on every call.
        if std::env::var_os("ONESTEP_MALLOC_MMAP").is_none() {
            libc::mallopt(-4, 0);
        }
        // M_ARENA_MAX = -8: one arena. Tensors are allocated on whichever thread runs the op,
        // and each rayon worker's own arena grew its heap page by page (first-touch faults,
        // which the kernel zeroes) although the main arena had the memory free: the first
        // GAN step of the quickstart took 4.9-6.7 s instead of 2.1-2.7 s (results/README.md).
        libc::mallopt(-8, 1);
    }
}
