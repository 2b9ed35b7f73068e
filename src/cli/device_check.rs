//! `onestep device-check` (hidden): the GPU checks of `tools/cuda/device-check.sh`, one JSON
//! object per line on stdout.
//!
//! - `parity`: the same random tiny models on the CPU (f32) and on CUDA (f32 and bf16): UNet
//!   forward and parameter gradients, VAE encode/decode, and 4 guided Euler steps of the SVD
//!   sampler; max absolute and relative differences.
//! - `svd`: the full-size SVD(-XT) UNet (diffusers' default config, 1.5 B parameters) with random
//!   weights: forward time, a LoRA training step (forward, MSE backward, AdamW), and the sampling
//!   time of 25 Euler steps with CFG vs 1 consistency step vs the Time-Travel Sampler (2 NFE),
//!   each with the device memory in use after it.
//!
//! On a build without the `cuda` feature it says so and exits 2.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onestep::diffusion::{
    sample, Conditioning, ConsistencyParam, Denoiser, SamplerConfig, SamplerMethod, SvdDenoiser,
};
use onestep::models::{AutoencoderKLTemporalDecoder, UNetConfig, UNetSpatioTemporal, VaeConfig};
use onestep::train::lora::{LoraConfig, Student};
use onestep::train::{AdamW, AdamWConfig};
use serde_json::json;
use std::collections::HashMap;
use std::time::Instant;

type R<T> = anyhow::Result<T>;

fn emit(mut v: serde_json::Value) {
    // Errors without candle's captured backtraces (kept to their first line).
    if let Some(e) = v.get_mut("error") {
        if let Some(text) = e.as_str() {
            let first: String = text
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(400)
                .collect();
            *e = serde_json::Value::String(first);
        }
    }
    println!("{v}");
}

/// The GPU, or the CPU when `ONESTEP_DEVICE_CHECK_CPU=1` (a dry run of these checks on a machine
/// without one, at small sizes).
fn cuda() -> R<Device> {
    if std::env::var("ONESTEP_DEVICE_CHECK_CPU").as_deref() == Ok("1") {
        return Ok(Device::Cpu);
    }
    Ok(Device::new_cuda(0)?)
}

/// Bytes of device memory in use (total - free), or None off CUDA.
fn mem_used(dev: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = dev.as_cuda_device() {
            if let Ok((free, total)) = d.cuda_stream().context().mem_get_info() {
                return Some((total - free) as f64 / (1u64 << 30) as f64);
            }
        }
    }
    let _ = dev;
    None
}

fn diff(a: &Tensor, b: &Tensor) -> R<(f64, f64)> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let max_abs = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = a.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
    Ok((max_abs, max_abs / scale))
}

/// A variable map's tensors, detached: a model built from them records no autograd graph, so
/// an inference forward keeps no intermediates alive.
fn tensors_of(map: &VarMap) -> HashMap<String, Tensor> {
    map.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect()
}

fn moved(ts: &HashMap<String, Tensor>, dev: &Device, dt: DType) -> R<HashMap<String, Tensor>> {
    ts.iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(dev)?.to_dtype(dt)?)))
        .collect()
}

fn randn(shape: &[usize], seed: u64) -> R<Tensor> {
    let mut rng = onestep::diffusion::noise::NormalRng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn conditioning(b: usize, c: usize, h: usize, w: usize, d: usize, dev: &Device) -> R<Conditioning> {
    Ok(Conditioning {
        image_latents: randn(&[b, 1, c, h, w], 11)?.to_device(dev)?,
        image_embeds: randn(&[b, 1, d], 12)?.to_device(dev)?,
        added_time_ids: Tensor::new(&[[6f32, 127.0, 0.02]], dev)?.repeat((b, 1))?,
    })
}

fn cond_to(c: &Conditioning, dev: &Device) -> R<Conditioning> {
    Ok(Conditioning {
        image_latents: c.image_latents.to_device(dev)?,
        image_embeds: c.image_embeds.to_device(dev)?,
        added_time_ids: c.added_time_ids.to_device(dev)?,
    })
}

fn parity() -> R<()> {
    let gpu = cuda()?;
    let cpu = Device::Cpu;
    // UNet: forward and gradients.
    let cfg = UNetConfig::tiny();
    let map = VarMap::new();
    let unet_cpu = UNetSpatioTemporal::new(VarBuilder::from_varmap(&map, DType::F32, &cpu), &cfg)?;
    let weights = tensors_of(&map);
    let (b, t, h, w) = (2, 8, 16, 16);
    let x = randn(&[b, t, 8, h, w], 1)?;
    let ts = Tensor::new(&[0.3f32, -1.2], &cpu)?;
    let ctx = randn(&[b, 1, 64], 2)?;
    let ids = Tensor::new(&[[6f32, 127.0, 0.02], [6.0, 60.0, 0.1]], &cpu)?;
    let y_cpu = unet_cpu.forward(&x, &ts, &ctx, &ids)?;
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let t0 = Instant::now();
        let r: R<Tensor> = (|| {
            let vb = VarBuilder::from_tensors(moved(&weights, &gpu, dt)?, dt, &gpu);
            let u = UNetSpatioTemporal::new(vb, &cfg)?;
            let y = u.forward(
                &x.to_device(&gpu)?.to_dtype(dt)?,
                &ts.to_device(&gpu)?,
                &ctx.to_device(&gpu)?.to_dtype(dt)?,
                &ids.to_device(&gpu)?,
            )?;
            Ok(y)
        })();
        match r.and_then(|y| diff(&y_cpu, &y)) {
            Ok((a, rel)) => emit(
                json!({"check": "unet_tiny_forward", "dtype": format!("{dt:?}"),
                "max_abs_diff": a, "rel_diff": rel, "ms": t0.elapsed().as_secs_f64() * 1e3}),
            ),
            Err(e) => emit(
                json!({"check": "unet_tiny_forward", "dtype": format!("{dt:?}"), "error": format!("{e:#}")}),
            ),
        }
    }
    // Gradients of every parameter of the tiny UNet, f32 on both sides.
    let r: R<()> = (|| {
        let map_gpu = VarMap::new();
        let u_gpu =
            UNetSpatioTemporal::new(VarBuilder::from_varmap(&map_gpu, DType::F32, &gpu), &cfg)?;
        for (k, v) in map_gpu.data().lock().unwrap().iter() {
            v.set(&weights[k].to_device(&gpu)?)?;
        }
        let loss_cpu = unet_cpu.forward(&x, &ts, &ctx, &ids)?.sqr()?.mean_all()?;
        let g_cpu = loss_cpu.backward()?;
        let gpu_loss = || -> R<Tensor> {
            let y = u_gpu.forward(
                &x.to_device(&gpu)?,
                &ts.to_device(&gpu)?,
                &ctx.to_device(&gpu)?,
                &ids.to_device(&gpu)?,
            )?;
            Ok(y.sqr()?.mean_all()?)
        };
        let loss_gpu = gpu_loss()?;
        let g_gpu = loss_gpu.backward()?;
        let cpu_vars = map.data().lock().unwrap().clone();
        let mut rows = vec![];
        let mut missing = 0;
        for (k, v) in map_gpu.data().lock().unwrap().iter() {
            let (Some(a), Some(b)) = (g_cpu.get(cpu_vars[k].as_tensor()), g_gpu.get(v.as_tensor()))
            else {
                missing += 1;
                continue;
            };
            let (abs, rel) = diff(a, b)?;
            let norm = |t: &Tensor| -> R<f32> {
                Ok(t.to_device(&Device::Cpu)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()?
                    .sqrt())
            };
            let (na, nb) = (norm(a)?, norm(b)?);
            rows.push((rel, k.clone(), abs, na, nb, format!("{:?}", a.dims())));
        }
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (la, _) = diff(&loss_cpu, &loss_gpu)?;
        let over = rows.iter().filter(|r| r.0 > 1e-3).count();
        emit(
            json!({"check": "unet_tiny_gradients", "dtype": "F32", "params": rows.len(),
            "without_gradient": missing, "loss_abs_diff": la, "params_rel_diff_over_1e-3": over,
            "worst": rows.iter().take(8).map(|r| json!({"param": r.1, "rel": r.0, "abs": r.2,
                "norm_cpu": r.3, "norm_cuda": r.4, "shape": r.5})).collect::<Vec<_>>()}),
        );
        // The same gradients computed twice on CUDA: a difference is a race, not rounding.
        let g_gpu2 = gpu_loss()?.backward()?;
        let mut rerun = 0f64;
        for (_, v) in map_gpu.data().lock().unwrap().iter() {
            if let (Some(a), Some(b)) = (g_gpu.get(v.as_tensor()), g_gpu2.get(v.as_tensor())) {
                rerun = rerun.max(diff(a, b)?.0);
            }
        }
        emit(json!({"check": "unet_tiny_gradients_rerun_cuda", "max_abs_diff": rerun}));
        op_gradients(&gpu)?;
        Ok(())
    })();
    if let Err(e) = r {
        emit(json!({"check": "unet_tiny_gradients", "error": format!("{e:#}")}));
    }
    // VAE encode + decode.
    let r: R<()> = (|| {
        let vcfg = VaeConfig::tiny();
        let vmap = VarMap::new();
        let vae_cpu = AutoencoderKLTemporalDecoder::new(
            VarBuilder::from_varmap(&vmap, DType::F32, &cpu),
            &vcfg,
        )?;
        let vw = tensors_of(&vmap);
        let img = (randn(&[8, 3, 32, 32], 3)?.tanh())?;
        let run = |vae: &AutoencoderKLTemporalDecoder, img: &Tensor| -> R<(Tensor, Tensor)> {
            let z = vae.encode(img)?.mode().clone();
            let rec = vae.decode(&z, 8)?;
            Ok((z, rec))
        };
        let (z_cpu, rec_cpu) = run(&vae_cpu, &img)?;
        let vae_gpu = AutoencoderKLTemporalDecoder::new(
            VarBuilder::from_tensors(moved(&vw, &gpu, DType::F32)?, DType::F32, &gpu),
            &vcfg,
        )?;
        let (z_gpu, rec_gpu) = run(&vae_gpu, &img.to_device(&gpu)?)?;
        let (za, zr) = diff(&z_cpu, &z_gpu)?;
        let (ra, rr) = diff(&rec_cpu, &rec_gpu)?;
        emit(
            json!({"check": "vae_tiny_encode_decode", "dtype": "F32", "latent_max_abs_diff": za,
            "latent_rel_diff": zr, "decoded_max_abs_diff": ra, "decoded_rel_diff": rr}),
        );
        Ok(())
    })();
    if let Err(e) = r {
        emit(json!({"check": "vae_tiny_encode_decode", "error": format!("{e:#}")}));
    }
    // Four guided Euler steps of the SVD sampler over the tiny UNet.
    let r: R<()> = (|| {
        let cond = conditioning(1, 4, h, w, 64, &cpu)?;
        let noise = randn(&[1, t, 4, h, w], 5)?;
        let sc = SamplerConfig {
            steps: 4,
            min_guidance: 1.0,
            max_guidance: 3.0,
            ..SamplerConfig::default()
        };
        let mut no_fresh = || -> candle_core::Result<Tensor> { candle_core::bail!("unused") };
        let (s_cpu, _) = sample(
            &SvdDenoiser { unet: &unet_cpu },
            &cond,
            &noise,
            &sc,
            &mut no_fresh,
            |_, _| {},
        )?;
        let u_gpu = UNetSpatioTemporal::new(
            VarBuilder::from_tensors(moved(&weights, &gpu, DType::F32)?, DType::F32, &gpu),
            &cfg,
        )?;
        let (s_gpu, nfe) = sample(
            &SvdDenoiser { unet: &u_gpu },
            &cond_to(&cond, &gpu)?,
            &noise.to_device(&gpu)?,
            &sc,
            &mut no_fresh,
            |_, _| {},
        )?;
        let (a, rel) = diff(&s_cpu, &s_gpu)?;
        emit(
            json!({"check": "euler_cfg_4_steps_tiny", "dtype": "F32", "nfe": nfe,
            "max_abs_diff": a, "rel_diff": rel}),
        );
        Ok(())
    })();
    if let Err(e) = r {
        emit(json!({"check": "euler_cfg_4_steps_tiny", "error": format!("{e:#}")}));
    }
    // I3D, FVD's network, with random weights (the real 47 MB do not travel): onestep's CPU
    // kernels against the candle operations the `fvd` stage runs on CUDA, and their speeds.
    let r = (|| -> R<()> {
        use onestep::metrics::i3d::{Act, InceptionI3d};
        let net = InceptionI3d::random(7);
        let clips: Vec<Act> = (0..8u64)
            .map(|k| {
                let mut a = Act::zeros(16, 224, 224, 3);
                let mut s = 12345u32 + k as u32;
                for v in &mut a.data {
                    s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                    *v = (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0;
                }
                a
            })
            .collect();
        let t0 = std::time::Instant::now();
        let cpu_logits = net.forward(&clips[0], &[])?.logits;
        let cpu_s = t0.elapsed().as_secs_f64();
        let dnet = onestep::metrics::i3d_device::DeviceI3d::new(&net, &gpu)?;
        let first = dnet.forward(&clips[..1])?;
        let scale = cpu_logits
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-6);
        let rel = first[0]
            .logits
            .iter()
            .zip(&cpu_logits)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
        let (_, batch_s) = timed(&gpu, || Ok(dnet.forward(&clips)?))?;
        emit(
            json!({"check": "i3d_random_weights", "logits_max_rel_diff_vs_cpu_kernels": rel,
            "cpu_kernels_clips_per_s": 1.0 / cpu_s, "device_batch8_clips_per_s": 8.0 / batch_s}),
        );
        Ok(())
    })();
    if let Err(e) = r {
        emit(json!({"check": "i3d_random_weights", "error": format!("{e:#}")}));
    }
    // The diffusers-saved tiny SVD pipeline folder against diffusers' own frames.
    for (d, dt, variant) in [
        (&cpu, DType::F32, None),
        (&gpu, DType::F32, None),
        (&gpu, DType::F32, Some("fp16")),
        (&gpu, DType::BF16, Some("fp16")),
        (&gpu, DType::F16, Some("fp16")),
    ] {
        let name = if d.is_cuda() { "cuda" } else { "cpu" };
        match svd_pipeline_parity(d, dt, variant) {
            Ok(m) => emit(json!({"check": "svd_pipeline_vs_diffusers", "device": name,
                "dtype": format!("{dt:?}"), "variant": variant, "max_abs_diff_frames": m})),
            Err(e) => emit(json!({"check": "svd_pipeline_vs_diffusers", "device": name,
                "dtype": format!("{dt:?}"), "variant": variant, "error": format!("{e:#}")})),
        }
    }
    Ok(())
}

/// diffusers' tiny random StableVideoDiffusionPipeline (tests/fixtures/svd_pipeline, made by
/// tools/fixtures/svd_pipeline_reference.py) loaded from its folder and run from the fixture's
/// noise: the largest difference to diffusers' frames (in [0, 1]).
pub fn svd_pipeline_parity(dev: &Device, dtype: DType, variant: Option<&str>) -> R<f64> {
    use onestep::pipeline::{LoadOptions, VideoPipeline};
    let fix = std::path::Path::new("tests/fixtures");
    let io = candle_core::safetensors::load(fix.join("svd_pipeline_io.safetensors"), dev)?;
    let pipe = VideoPipeline::load_with(
        &fix.join("svd_pipeline"),
        dev,
        &LoadOptions {
            dtype: Some(dtype),
            variant: variant.map(String::from),
        },
    )?;
    let mut opts = pipe.default_options();
    opts.frames = 4;
    opts.sampler.steps = 3;
    opts.sampler.max_guidance = 2.5;
    opts.fps = 7.0;
    opts.motion_bucket_id = 100.0;
    opts.noise_aug_strength = 0.05;
    opts.decode_chunk_size = Some(2);
    let images = ((&io["image"] * 2.0)? - 1.0)?;
    let mut no_fresh = || -> candle_core::Result<Tensor> { candle_core::bail!("unused") };
    let (video, _) = pipe.generate_from_noise(
        &images,
        &io["latents"],
        &io["aug_noise"],
        &opts,
        &mut no_fresh,
        |_, _| {},
    )?;
    let frames = ((video + 1.0)? * 0.5)?.clamp(0f32, 1f32)?;
    let want = if variant == Some("fp16") {
        "frames_fp16_weights"
    } else {
        "frames"
    };
    Ok(diff(&io[want], &frames)?.0)
}

/// Gradients of single ops on CUDA vs the CPU, on random inputs: the pieces a UNet's backward
/// pass is made of, to localise a mismatch.
fn op_gradients(gpu: &Device) -> R<()> {
    use candle_core::Var;
    type Op = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;
    let cases: Vec<(&str, Vec<Vec<usize>>, Op)> = vec![
        (
            "broadcast_add_hw",
            vec![vec![4, 6, 5, 7], vec![4, 6]],
            Box::new(|v| {
                v[0].broadcast_add(&v[1].unsqueeze(2)?.unsqueeze(3)?)?
                    .sqr()?
                    .sum_all()
            }),
        ),
        (
            "linear_weight_t",
            vec![vec![16, 40], vec![24, 40]],
            Box::new(|v| v[0].matmul(&v[1].t()?)?.sqr()?.sum_all()),
        ),
        (
            "linear_silu",
            vec![vec![16, 40], vec![24, 40]],
            Box::new(|v| v[0].silu()?.matmul(&v[1].t()?)?.sin()?.sum_all()),
        ),
        (
            "repeat_broadcast_reshape",
            vec![vec![2, 40]],
            Box::new(|v| {
                v[0].unsqueeze(1)?
                    .broadcast_as((2, 8, 40))?
                    .reshape((16, 40))?
                    .sin()?
                    .sum_all()
            }),
        ),
        (
            "sum_keepdim_23",
            vec![vec![4, 6, 5, 7]],
            Box::new(|v| v[0].sum_keepdim(3)?.sum_keepdim(2)?.sin()?.sum_all()),
        ),
        (
            "batched_matmul_bcast",
            vec![vec![6, 30], vec![3, 30, 50]],
            Box::new(|v| v[0].broadcast_left(3)?.matmul(&v[1])?.sin()?.sum_all()),
        ),
        (
            "softmax_prims",
            vec![vec![3, 4, 9]],
            Box::new(|v| {
                onestep::models::layers::softmax_last(&v[0])?
                    .sqr()?
                    .sum_all()
            }),
        ),
        (
            "upsample_nearest2d",
            vec![vec![2, 3, 4, 5]],
            Box::new(|v| v[0].upsample_nearest2d(8, 10)?.sin()?.sum_all()),
        ),
        (
            "time_emb_chain",
            vec![vec![16, 64], vec![32, 64], vec![32], vec![16, 32, 8, 8]],
            Box::new(|v| {
                let t = v[0].silu()?.matmul(&v[1].t()?)?;
                let t = (t + onestep::models::layers::expand_param(&v[2], 16, 1)?.squeeze(2)?)?;
                v[3].broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
                    .sqr()?
                    .mean_all()
            }),
        ),
    ];
    for (i, (name, shapes, f)) in cases.into_iter().enumerate() {
        let r: R<()> = (|| {
            let xs: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(j, s)| randn(s, 100 + 10 * i as u64 + j as u64))
                .collect::<R<_>>()?;
            let run = |dev: &Device| -> R<Vec<Tensor>> {
                let vars: Vec<Var> = xs
                    .iter()
                    .map(|x| Var::from_tensor(&x.to_device(dev)?))
                    .collect::<candle_core::Result<_>>()?;
                let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let g = f(&ts)?.backward()?;
                Ok(ts
                    .iter()
                    .map(|t| g.get(t).cloned().unwrap_or(t.zeros_like().unwrap()))
                    .collect())
            };
            let (gc, gg) = (run(&Device::Cpu)?, run(gpu)?);
            let rels: Vec<f64> = gc
                .iter()
                .zip(&gg)
                .map(|(a, b)| diff(a, b).map(|d| d.1))
                .collect::<R<_>>()?;
            emit(json!({"check": "op_gradient", "op": name, "rel_diff_per_input": rels}));
            Ok(())
        })();
        if let Err(e) = r {
            emit(json!({"check": "op_gradient", "op": name, "error": format!("{e:#}")}));
        }
    }
    Ok(())
}

struct SvdArgs {
    dtype: DType,
    frames: usize,
    height: usize,
    width: usize,
    iters: usize,
    train_frames: usize,
    train_height: usize,
    train_width: usize,
    lora_rank: usize,
    sample_steps: usize,
    skip: Vec<String>,
    checkpointing: bool,
}

fn timed<T>(dev: &Device, f: impl FnOnce() -> R<T>) -> R<(T, f64)> {
    dev.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    dev.synchronize()?;
    Ok((out, t0.elapsed().as_secs_f64()))
}

fn svd(a: SvdArgs) -> R<()> {
    let dev = cuda()?;
    let cfg = UNetConfig::default();
    let t0 = Instant::now();
    // Random weights drawn in f32 on the GPU (curand), then cast.
    let base = {
        let map = VarMap::new();
        UNetSpatioTemporal::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg)?;
        moved(&tensors_of(&map), &dev, a.dtype)?
    };
    let params: usize = base.values().map(|t| t.elem_count()).sum();
    dev.synchronize()?;
    emit(
        json!({"check": "svd_unet_init", "dtype": format!("{:?}", a.dtype), "params": params,
        "s": t0.elapsed().as_secs_f64(), "mem_gib": mem_used(&dev)}),
    );
    let unet =
        UNetSpatioTemporal::new(VarBuilder::from_tensors(base.clone(), a.dtype, &dev), &cfg)?;
    let (lh, lw) = (a.height, a.width);
    let cond = cond_to(&conditioning(1, 4, lh, lw, 1024, &Device::Cpu)?, &dev)?;

    if !a.skip.iter().any(|s| s == "forward") {
        for batch in [1usize, 2] {
            let r: R<()> = (|| {
                let x = randn(&[batch, a.frames, 8, lh, lw], 7)?
                    .to_device(&dev)?
                    .to_dtype(a.dtype)?;
                let ts = Tensor::full(0.5f32, batch, &dev)?;
                let ctx = cond.image_embeds.repeat((batch, 1, 1))?.to_dtype(a.dtype)?;
                let ids = cond.added_time_ids.repeat((batch, 1))?;
                let mut ms = vec![];
                for i in 0..a.iters + 1 {
                    let (y, s) = timed(&dev, || Ok(unet.forward(&x, &ts, &ctx, &ids)?))?;
                    if i == 0 {
                        let finite = y
                            .to_dtype(DType::F32)?
                            .abs()?
                            .max_all()?
                            .to_scalar::<f32>()?;
                        emit(
                            json!({"check": "svd_unet_forward_warmup", "batch": batch, "s": s,
                            "max_abs_out": finite, "mem_gib": mem_used(&dev)}),
                        );
                    } else {
                        ms.push(s * 1e3);
                    }
                }
                emit(
                    json!({"check": "svd_unet_forward", "dtype": format!("{:?}", a.dtype),
                    "batch": batch, "frames": a.frames, "latent": [lh, lw], "ms": ms,
                    "mem_gib": mem_used(&dev)}),
                );
                Ok(())
            })();
            if let Err(e) = r {
                emit(
                    json!({"check": "svd_unet_forward", "batch": batch, "error": format!("{e:#}")}),
                );
            }
        }
    }

    if !a.skip.iter().any(|s| s == "sample") {
        let noise = randn(&[1, a.frames, 4, lh, lw], 9)?.to_device(&dev)?;
        let mut fresh = || {
            randn(&[1, a.frames, 4, lh, lw], 10)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .to_device(&dev)
        };
        let teacher = SvdDenoiser { unet: &unet };
        let cp = ConsistencyParam::default();
        let student = cp.wrap(&teacher);
        let runs: Vec<(&str, &dyn Denoiser, SamplerConfig)> = vec![
            (
                "consistency_1_step",
                &student,
                SamplerConfig {
                    method: SamplerMethod::Consistency,
                    steps: 1,
                    min_guidance: 1.0,
                    max_guidance: 1.0,
                    ..SamplerConfig::default()
                },
            ),
            (
                "time_travel",
                &student,
                SamplerConfig {
                    method: SamplerMethod::TimeTravel,
                    steps: 1,
                    min_guidance: 1.0,
                    max_guidance: 1.0,
                    ..SamplerConfig::default()
                },
            ),
            (
                "euler_cfg",
                &teacher,
                SamplerConfig {
                    steps: a.sample_steps,
                    ..SamplerConfig::default()
                },
            ),
        ];
        for (name, den, sc) in runs {
            let r: R<()> = (|| {
                let ((out, nfe), s) = timed(&dev, || {
                    Ok(sample(den, &cond, &noise, &sc, &mut fresh, |_, _| {})?)
                })?;
                let finite = out
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?
                    .is_finite();
                emit(
                    json!({"check": "svd_sampling", "sampler": name, "steps": sc.steps, "nfe": nfe,
                    "dtype": format!("{:?}", a.dtype), "frames": a.frames, "latent": [lh, lw],
                    "s": s, "finite": finite, "mem_gib": mem_used(&dev)}),
                );
                Ok(())
            })();
            if let Err(e) = r {
                emit(json!({"check": "svd_sampling", "sampler": name, "error": format!("{e:#}")}));
            }
        }
    }
    if !a.skip.iter().any(|s| s == "train") {
        let r: R<()> = (|| {
            let lora = LoraConfig {
                rank: a.lora_rank,
                ..LoraConfig::default()
            };
            let student = Student::lora_from_base(base.clone(), &cfg, &lora, 0, &dev)?;
            let vars = student.vars();
            let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            let mut opt = AdamW::new(
                vars,
                AdamWConfig {
                    warmup: 0,
                    ..AdamWConfig::default()
                },
            )?;
            let (f, th, tw) = (a.train_frames, a.train_height, a.train_width);
            let tcond = cond_to(&conditioning(1, 4, th, tw, 1024, &Device::Cpu)?, &dev)?;
            let x = randn(&[1, f, 4, th, tw], 13)?.to_device(&dev)?;
            let target = randn(&[1, f, 4, th, tw], 14)?.to_device(&dev)?;
            let sigma = Tensor::new(&[1.5f32], &dev)?;
            let mut ms = vec![];
            for i in 0..a.iters + 1 {
                let (loss, s) = timed(&dev, || {
                    let unet = student.for_step(a.checkpointing)?;
                    let out = unet.denoise(&(&x * 1.5)?, &sigma, &tcond)?;
                    let loss = (out - &target)?.sqr()?.mean_all()?;
                    let mut grads = loss.backward()?;
                    unet.merge_into(&mut grads)?;
                    opt.step(&grads, 1e-4)?;
                    Ok(loss.to_scalar::<f32>()?)
                })?;
                if i > 0 {
                    ms.push(s * 1e3);
                }
                if i == a.iters {
                    emit(
                        json!({"check": "svd_lora_train_step", "dtype": format!("{:?}", a.dtype),
                        "gradient_checkpointing": a.checkpointing, "lora_rank": a.lora_rank, "trainable_params": trainable, "frames": f,
                        "latent": [th, tw], "ms": ms, "loss": loss, "mem_gib": mem_used(&dev)}),
                    );
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            emit(json!({"check": "svd_lora_train_step", "error": format!("{e:#}")}));
        }
    }
    drop(unet);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// `parity`, or `svd [--dtype bf16|f16|f32] [--frames 25 --height 72 --width 128]
    /// [--iters 2] [--train-frames 14 --train-height 40 --train-width 64 --lora-rank 64]
    /// [--sample-steps 25] [--skip forward,sample,train] [--checkpointing]` (latent sizes).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn execute(a: Args) -> anyhow::Result<std::process::ExitCode> {
    let args = a.args;
    if !onestep::train::cuda_compiled()
        && std::env::var("ONESTEP_DEVICE_CHECK_CPU").as_deref() != Ok("1")
    {
        eprintln!(
            "onestep device-check: this build has no CUDA backend (build with tools/cuda/build.sh)"
        );
        return Ok(std::process::ExitCode::from(2));
    }
    let get = |k: &str, d: &str| -> String {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| d.to_string())
    };
    let num = |k: &str, d: usize| -> usize { get(k, &d.to_string()).parse().unwrap_or(d) };
    let r = match args.first().map(String::as_str) {
        Some("parity") => parity(),
        Some("svd") => svd(SvdArgs {
            dtype: match get("--dtype", "bf16").as_str() {
                "f32" => DType::F32,
                "f16" => DType::F16,
                _ => DType::BF16,
            },
            frames: num("--frames", 25),
            height: num("--height", 72),
            width: num("--width", 128),
            iters: num("--iters", 2),
            train_frames: num("--train-frames", 14),
            train_height: num("--train-height", 40),
            train_width: num("--train-width", 64),
            lora_rank: num("--lora-rank", 64),
            sample_steps: num("--sample-steps", 25),
            skip: get("--skip", "").split(',').map(String::from).collect(),
            checkpointing: args.iter().any(|x| x == "--checkpointing"),
        }),
        _ => {
            eprintln!("usage: onestep device-check parity | svd [--dtype bf16|f16|f32] [--frames 25 --height 72 --width 128] [--iters 2] [--train-frames 14 --train-height 40 --train-width 64 --lora-rank 64] [--sample-steps 25] [--skip forward,sample,train] [--checkpointing]");
            return Ok(std::process::ExitCode::from(2));
        }
    };
    match r {
        Ok(()) => Ok(std::process::ExitCode::SUCCESS),
        Err(e) => {
            emit(json!({"check": "fatal", "error": format!("{e:#}")}));
            Ok(std::process::ExitCode::FAILURE)
        }
    }
}
