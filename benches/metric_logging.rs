//! Metric logging throughput of the run store: one transaction per row (what an unbatched
//! logger does) against the runner's batches of 512 rows, on the same machine in the same run.
//! Run with `cargo bench --bench metric_logging`; it prints rows/s for both and their ratio.

use onestep::store::{MetricRow, Store};
use std::time::Instant;

fn rows(n: usize, key: &str) -> Vec<MetricRow> {
    (0..n)
        .map(|i| MetricRow {
            stage_hash: "bench".into(),
            run_id: 1,
            key: key.into(),
            step: i as u64,
            value: i as f64 * 0.5,
            wall_time: 0.0,
        })
        .collect()
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = Store::open(&dir.path().join("bench.sqlite")).expect("store");
    store
        .register_stage("bench", "data", "bench", "", 1)
        .expect("stage");
    let n = 5_000;

    let single = rows(n, "single");
    let t = Instant::now();
    for r in &single {
        store.write_metrics(std::slice::from_ref(r)).expect("write");
    }
    let per_row = n as f64 / t.elapsed().as_secs_f64();

    let batched = rows(n, "batched");
    let t = Instant::now();
    for chunk in batched.chunks(512) {
        store.write_metrics(chunk).expect("write");
    }
    let per_batch = n as f64 / t.elapsed().as_secs_f64();

    println!("metric rows/s, one transaction per row: {per_row:.0}");
    println!("metric rows/s, batches of 512:          {per_batch:.0}");
    println!("speed-up of batching: {:.1}x", per_batch / per_row);
}
