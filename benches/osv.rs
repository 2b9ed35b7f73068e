//! OSV's two efficiency claims at the tiny preset, measured in one run:
//!
//! 1. Per-iteration time and peak memory of a `gan` training iteration (discriminator step on
//!    real and fake, then generator step through the discriminator) with the VAE-decoder input
//!    vs. the decoder-free sub-pixel upsampler (the paper: 4.29 s vs 2.61 s per iteration,
//!    73.5 GB vs 35.8 GB at SVD scale). Each input mode runs in its own child process so its
//!    peak resident memory (VmHWM) is its own.
//! 2. Sampling latency of the 1-step consistency sampler, 1 step + Time-Travel Sampler (2 NFE)
//!    and the 25-step Euler teacher with frame-wise CFG (50 NFE), same UNet, as ratios.
//!
//! `cargo bench --bench osv` (EfficientNet-Lite0 weights from results/assets or
//! $ONESTEP_ASSETS, fetched on first use). Sizes: batch 4 x 8 frames x 8x8x4 latents (32x32
//! frames), `UNetConfig::tiny()`, `VaeConfig::tiny()`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use onestep::diffusion::{
    sample, Conditioning, ConsistencyParam, SamplerConfig, SamplerMethod, SvdDenoiser,
};
use onestep::models::discriminator::BackboneKind;
use onestep::models::discriminator::{Backbone, DiscInput};
use onestep::models::{
    AutoencoderKLTemporalDecoder, Discriminator, DiscriminatorConfig, UNetConfig,
    UNetSpatioTemporal, VaeConfig,
};
use onestep::train::losses::{d_loss, g_loss, GanLoss};

const B: usize = 4;
const T: usize = 8;
const HW: usize = 8;

mod common;
use common::best_of;

fn assets() -> std::path::PathBuf {
    std::env::var_os("ONESTEP_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/results/assets").into())
}

fn cond(dev: &Device, b: usize) -> Conditioning {
    Conditioning {
        image_latents: Tensor::randn(0f32, 1.0, (b, 1, 4, HW, HW), dev).unwrap(),
        image_embeds: Tensor::randn(0f32, 1.0, (b, 1, 64), dev).unwrap(),
        added_time_ids: Tensor::new(&[[7f32, 127.0, 0.02]], dev)
            .unwrap()
            .repeat((b, 1))
            .unwrap(),
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One mode's GAN iterations in this process; prints `seconds peak_mib`.
fn gan_child(mode: &str, reps: usize) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let unet = UNetSpatioTemporal::new(vb.pp("unet"), &UNetConfig::tiny()).unwrap();
    let vae = AutoencoderKLTemporalDecoder::new(vb.pp("vae"), &VaeConfig::tiny()).unwrap();
    let input = if mode == "decoder" {
        DiscInput::Decoder
    } else {
        DiscInput::Upsampler
    };
    let cfg = DiscriminatorConfig {
        input,
        backbone: onestep::models::discriminator::BackboneConfig {
            kind: BackboneKind::EfficientNetLite0,
            ..Default::default()
        },
        feature_layers: vec![2, 4],
        ..Default::default()
    };
    let dm = VarMap::new();
    let backbone = Backbone::EfficientNet(Box::new(
        onestep::assets::efficientnet_lite0(&assets(), &dev).unwrap(),
    ));
    let disc = Discriminator::new(
        VarBuilder::from_varmap(&dm, DType::F32, &dev),
        backbone,
        &cfg,
        4,
    )
    .unwrap();
    let vae_ref = (input == DiscInput::Decoder).then_some(&vae);
    let c = cond(&dev, B);
    let p = ConsistencyParam::default();
    let inner = SvdDenoiser { unet: &unet };
    let den = p.wrap(&inner);
    let x0 = Tensor::randn(0f32, 1.0, (B, T, 4, HW, HW), &dev).unwrap();
    let sigma = Tensor::new(&[0.5f32, 1.0, 2.0, 4.0], &dev).unwrap();
    let t = best_of(reps, || {
        use onestep::diffusion::Denoiser;
        let x = (&x0 + Tensor::randn_like(&x0, 0.0, 1.0).unwrap()).unwrap();
        let fake = den.denoise(&x, &sigma, &c).unwrap();
        let lr = disc.forward(&x0, vae_ref).unwrap();
        let lf = disc.forward(&fake.detach(), vae_ref).unwrap();
        let _gd = d_loss(&lr, &lf, GanLoss::Hinge)
            .unwrap()
            .backward()
            .unwrap();
        let lf2 = disc.forward(&fake, vae_ref).unwrap();
        let _gg = g_loss(&lf2, GanLoss::Hinge).unwrap().backward().unwrap();
    });
    println!("{t} {}", peak_rss_mib());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = std::env::var("ONESTEP_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    if let Some(i) = args.iter().position(|a| a == "--gan-child") {
        onestep::alloc::tune_for_tensors();
        gan_child(&args[i + 1], reps);
        return;
    }
    // Make sure the weights are there before timing anything.
    onestep::assets::efficientnet_lite0(&assets(), &Device::Cpu)
        .expect("EfficientNet-Lite0 weights");
    println!(
        "GAN iteration (D step + G step), batch {B} x {T} frames, 8x8 latents -> 32x32 frames"
    );
    let mut res = Vec::new();
    for mode in ["decoder", "upsampler"] {
        let out = std::process::Command::new(&args[0])
            .args(["--gan-child", mode])
            .output()
            .expect("child bench");
        let s = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = s
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 2 {
            eprintln!("{mode}: {}", String::from_utf8_lossy(&out.stderr));
            return;
        }
        println!(
            "  {mode:<10} {:8.3} s/iteration   peak RSS {:7.0} MiB",
            v[0], v[1]
        );
        res.push((v[0], v[1]));
    }
    println!(
        "  upsampler/decoder: time {:.2}x, peak memory {:.2}x   (paper at SVD scale: 0.61x, 0.49x)",
        res[1].0 / res[0].0,
        res[1].1 / res[0].1
    );

    onestep::alloc::tune_for_tensors();
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let unet = UNetSpatioTemporal::new(
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
        &UNetConfig::tiny(),
    )
    .unwrap();
    let inner = SvdDenoiser { unet: &unet };
    let p = ConsistencyParam::default();
    let student = p.wrap(&inner);
    let c = cond(&dev, 1);
    let noise = Tensor::randn(0f32, 1.0, (1, T, 4, HW, HW), &dev).unwrap();
    let mut fresh = || Tensor::randn(0f32, 1.0, (1, T, 4, HW, HW), &dev);
    let mut run = |den: &dyn onestep::diffusion::Denoiser, cfg: SamplerConfig| -> (f64, usize) {
        let mut nfe = 0;
        let t = best_of(reps, || {
            nfe = sample(den, &c, &noise, &cfg, &mut fresh, |_, _| {})
                .unwrap()
                .1;
        });
        (t, nfe)
    };
    let one = run(
        &student,
        SamplerConfig {
            method: SamplerMethod::Consistency,
            steps: 1,
            max_guidance: 1.0,
            ..Default::default()
        },
    );
    let tts = run(
        &student,
        SamplerConfig {
            method: SamplerMethod::TimeTravel,
            steps: 1,
            max_guidance: 1.0,
            ..Default::default()
        },
    );
    let teacher = run(&inner, SamplerConfig::default());
    println!("Sampling latency, 1 clip of {T} frames (denoiser only, tiny UNet)");
    for (name, (t, nfe)) in [
        ("1-step", one),
        ("1-step + TTS", tts),
        ("teacher 25 Euler + CFG", teacher),
    ] {
        println!(
            "  {name:<24} {:8.4} s  {nfe:3} NFE   {:6.1}x faster than the teacher",
            t,
            teacher.0 / t
        );
    }
}
