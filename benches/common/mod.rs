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

/// Run the PyTorch side of a benchmark (`benches/SCRIPT` with `args`) through
/// `$ONESTEP_BENCH_PYTHON` (default `python3`); its one JSON line, or why it could not run.
#[allow(dead_code)]
pub fn torch_side(script: &str, args: &[usize], reps: usize) -> Result<serde_json::Value, String> {
    let python = std::env::var("ONESTEP_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!("{}/benches/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(args.iter().map(|a| a.to_string()))
        .env("ONESTEP_BENCH_REPS", reps.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(serde_json::from_slice(&o.stdout).unwrap_or_default()),
        Ok(o) => Err(format!(
            "{python} {script} failed: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Err(format!("{python}: {e}")),
    }
}

/// Print onestep's forward (named `what`) and train-step times, PyTorch's from its JSON line,
/// and their ratios.
#[allow(dead_code)]
pub fn report(torch: &Result<serde_json::Value, String>, what: &str, fwd: f64, step: f64) {
    println!("onestep (candle, CPU):  {what} {fwd:.3} s   train step {step:.3} s");
    match torch {
        Ok(v) => {
            let pf = v["forward_s"].as_f64().unwrap_or(f64::NAN);
            let ps = v["train_step_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "PyTorch {} ({} threads): {what} {pf:.3} s   train step {ps:.3} s   ({} parameters)",
                v["torch"].as_str().unwrap_or("?"),
                v["threads"],
                v["params"]
            );
            println!(
                "ratio onestep/PyTorch:  {what} {:.2}   train step {:.2}",
                fwd / pf,
                step / ps
            );
        }
        Err(e) => println!("PyTorch side skipped ({e})"),
    }
}
