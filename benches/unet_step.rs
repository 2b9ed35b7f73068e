//! One denoiser evaluation and one training step (forward, MSE backward, AdamW) of the tiny
//! UNet preset (`UNetConfig::tiny()`, 1.33 M parameters) at batch 4 x 16 frames x 16x16
//! latents, beside the same configuration in PyTorch/diffusers (benches/unet_step_torch.py) on
//! the same machine in the same run. Reports best-of-N seconds and the ratio onestep/PyTorch.
//!
//! `cargo bench --bench unet_step` (PyTorch side via $ONESTEP_BENCH_PYTHON, default `python3`;
//! skipped with a note when torch is not importable). Sizes: `-- B T HW`.
//! `ONESTEP_FUSED=0` runs onestep without its fused kernels (the before/after comparison);
//! `ONESTEP_FUSED=noattention` without the attention kernel alone. Both onestep rows split the
//! batch into data-parallel shards as the stages do (`onestep::train::shard`: the train step
//! as the training stages run it, the forward pass as the FVD stage's generations);
//! `ONESTEP_SHARDS=1` runs the whole batch on one shard (the before/after comparison).

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use onestep::models::{UNetConfig, UNetSpatioTemporal};

mod common;
use common::{best_of, report, torch_side};

fn main() -> candle_core::Result<()> {
    onestep::alloc::tune_for_tensors();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (b, t, hw) = match args.as_slice() {
        [b, t, hw, ..] => (*b, *t, *hw),
        _ => (4, 16, 16),
    };
    let reps: usize = std::env::var("ONESTEP_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // The PyTorch side runs first, before candle's worker threads exist, so neither side
    // competes with the other's idle threads.
    let torch = torch_side("unet_step_torch.py", &[b, t, hw], reps);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    // `ONESTEP_BENCH_PRESET=small`: block channels 64/128 (about 5 M parameters), otherwise
    // the tiny preset's settings; the PyTorch side reads the same variable.
    let small = std::env::var("ONESTEP_BENCH_PRESET").is_ok_and(|p| p == "small");
    let cfg = if small {
        UNetConfig {
            block_out_channels: vec![64, 128],
            ..UNetConfig::tiny()
        }
    } else {
        UNetConfig::tiny()
    };
    let unet = UNetSpatioTemporal::new(vb, &cfg)?;
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let x = Tensor::randn(0f32, 1.0, (b, t, 8, hw, hw), &dev)?;
    let ts = Tensor::full(0.1f32, b, &dev)?;
    let ehs = Tensor::randn(0f32, 1.0, (b, 1, 64), &dev)?;
    let ids = Tensor::from_vec([7f32, 127.0, 0.02].repeat(b), (b, 3), &dev)?;
    let target = Tensor::randn(0f32, 1.0, (b, t, 4, hw, hw), &dev)?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-4,
            ..Default::default()
        },
    )?;

    let shards = onestep::train::shard::Shards::new(b)?;
    let part = |t: &Tensor, r: &std::ops::Range<usize>| t.narrow(0, r.start, r.len());
    let forward = |r: std::ops::Range<usize>| {
        let (xr, tr) = (part(&x, &r)?, part(&ts, &r)?);
        unet.forward(&xr, &tr, &part(&ehs, &r)?, &part(&ids, &r)?)
    };
    let fwd = best_of(reps, || {
        shards.cat(b, &forward).expect("forward").detach();
    });
    let only_forward = std::env::var_os("ONESTEP_BENCH_FORWARD_ONLY").is_some();
    let step = best_of(if only_forward { 0 } else { reps }, || {
        let (_, grads) = shards
            .backward(b, |r| {
                let out = forward(r.clone())?;
                (out - part(&target, &r)?)?.sqr()?.mean_all()
            })
            .expect("loss");
        opt.step(&grads).expect("step");
    });
    let fused = onestep::models::fused::enabled();
    println!(
        "{} UNet, {params} parameters, batch {b} x {t} frames x {hw}x{hw}, best of {reps}, fused kernels {}, {} shard(s)",
        if small { "small" } else { "tiny" },
        if fused { "on" } else { "off" },
        shards.count()
    );
    report(&torch, "forward", fwd, step);
    Ok(())
}
