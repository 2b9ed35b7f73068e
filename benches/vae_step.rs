//! One encode + decode and one training step (encode, decode, MSE backward, AdamW) of the tiny
//! temporal VAE (`VaeConfig::tiny()`) on one clip of 16 frames x 64x64, beside the same
//! configuration in PyTorch/diffusers (benches/vae_step_torch.py) on the same machine in the
//! same run. Reports best-of-N seconds and the ratio onestep/PyTorch.
//!
//! `cargo bench --bench vae_step` (PyTorch side via $ONESTEP_BENCH_PYTHON, default `python3`;
//! skipped with a note when torch is not importable). Sizes: `-- FRAMES HW`.
//! `ONESTEP_FUSED=0` runs onestep without its fused kernels (the before/after comparison);
//! `ONESTEP_FUSED=noattention` without the attention kernel alone.

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use onestep::models::{AutoencoderKLTemporalDecoder, VaeConfig};

mod common;
use common::{best_of, report, torch_side};

fn main() -> candle_core::Result<()> {
    onestep::alloc::tune_for_tensors();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (t, hw) = match args.as_slice() {
        [t, hw, ..] => (*t, *hw),
        _ => (16, 64),
    };
    let reps: usize = std::env::var("ONESTEP_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // The PyTorch side runs first, before candle's worker threads exist.
    let torch = torch_side("vae_step_torch.py", &[t, hw], reps);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let vae = AutoencoderKLTemporalDecoder::new(vb, &VaeConfig::tiny())?;
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let x = ((Tensor::rand(0f32, 1.0, (t, 3, hw, hw), &dev)? * 2.0)? - 1.0)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-4,
            ..Default::default()
        },
    )?;
    let fwd = best_of(reps, || {
        let z = vae.encode(&x).expect("encode").mean;
        vae.decode(&z, t).expect("decode").detach();
    });
    let step = best_of(reps, || {
        let z = vae.encode(&x).expect("encode").mean;
        let out = vae.decode(&z, t).expect("decode");
        let loss = (out - &x)
            .and_then(|d| d.sqr())
            .and_then(|d| d.mean_all())
            .expect("loss");
        opt.backward_step(&loss).expect("step");
    });
    let fused = onestep::models::fused::enabled();
    println!(
        "tiny VAE, {params} parameters, {t} frames x {hw}x{hw}, best of {reps}, fused kernels {}",
        if fused { "on" } else { "off" }
    );
    report(&torch, "encode+decode", fwd, step);
    Ok(())
}
