//! Shared by the benchmarks.

use std::time::Instant;

/// Best wall time of `reps` runs of `f`, after one warm-up run.
pub fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
