//! onestep's SVD models against diffusers: fixtures written by tools/fixtures/svd_reference.py
//! (tiny random-weight configurations, every parameter perturbed). Tolerance 1e-4 max abs, f32.

use candle_core::{Device, Tensor};
use onestep::diffusion::sampler::{karras_sigmas, sample, SamplerConfig, SamplerMethod};
use onestep::diffusion::{Conditioning, Scalings, SvdDenoiser};
use onestep::models::{
    checkpoint, load_component, save_component, AutoencoderKLTemporalDecoder, UNetConfig,
    UNetSpatioTemporal, VaeConfig,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/svd")
}

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn load_unet(dir: &Path) -> (UNetConfig, UNetSpatioTemporal, candle_nn::VarMap) {
    load_component(dir, &Device::Cpu, UNetSpatioTemporal::new).unwrap()
}

fn load_vae(dir: &Path) -> (VaeConfig, AutoencoderKLTemporalDecoder, candle_nn::VarMap) {
    load_component(dir, &Device::Cpu, AutoencoderKLTemporalDecoder::new).unwrap()
}

#[test]
fn unet_matches_diffusers() {
    let (_, unet, _) = load_unet(&fixtures().join("unet"));
    let d = io("unet_io.safetensors");
    let out = unet
        .forward(
            &d["sample"],
            &d["timestep"],
            &d["encoder_hidden_states"],
            &d["added_time_ids"],
        )
        .unwrap();
    let err = max_abs(&out, &d["out"]);
    assert!(err < 1e-4, "UNet max|diff| = {err}");
    // Odd latent size: upsampling must meet the skip connection's size.
    let out = unet
        .forward(
            &d["sample_odd"],
            &d["timestep"].narrow(0, 0, 1).unwrap(),
            &d["encoder_hidden_states"].narrow(0, 0, 1).unwrap(),
            &d["added_time_ids"].narrow(0, 0, 1).unwrap(),
        )
        .unwrap();
    let err = max_abs(&out, &d["out_odd"]);
    assert!(err < 1e-4, "UNet (odd size) max|diff| = {err}");
}

#[test]
fn vae_matches_diffusers() {
    let (cfg, vae, _) = load_vae(&fixtures().join("vae"));
    assert_eq!(cfg.block_out_channels, vec![32, 32]);
    let d = io("vae_io.safetensors");
    let post = vae.encode(&d["x"]).unwrap();
    let e1 = max_abs(&post.mean, &d["mean"]);
    let e2 = max_abs(&post.logvar, &d["logvar"]);
    let frames = d["z"].dim(0).unwrap();
    let dec = vae.decode(&d["z"], frames).unwrap();
    let e3 = max_abs(&dec, &d["decoded"]);
    assert!(
        e1 < 1e-4 && e2 < 1e-4 && e3 < 1e-4,
        "VAE max|diff| mean {e1} logvar {e2} decode {e3}"
    );
}

/// The SVD pipeline's denoising loop (EulerDiscreteScheduler with SVD's config, Karras sigmas,
/// v-prediction, frame-wise CFG 1 -> 3) reproduced through the denoiser interface.
#[test]
fn euler_sampler_with_cfg_matches_diffusers_pipeline_loop() {
    let (_, unet, _) = load_unet(&fixtures().join("unet"));
    let d = io("sampler_io.safetensors");
    let steps = d["timesteps"].dim(0).unwrap();
    let ours = karras_sigmas(steps, 0.002, 700.0, 7.0);
    let theirs = d["sigmas"].to_vec1::<f32>().unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!(
            (a - *b as f64).abs() <= 1e-5 * a.max(1.0),
            "sigmas {ours:?} vs {theirs:?}"
        );
    }
    for (s, t) in ours.iter().zip(d["timesteps"].to_vec1::<f32>().unwrap()) {
        assert!((Scalings::svd(*s).c_noise - t as f64).abs() < 1e-5);
    }
    let cond = Conditioning {
        image_latents: d["image_latents"].clone(),
        image_embeds: d["image_embeds"].clone(),
        added_time_ids: d["added_time_ids"].clone(),
    };
    let cfg = SamplerConfig {
        steps,
        method: SamplerMethod::Euler,
        ..Default::default()
    };
    let (x, nfe) = sample(
        &SvdDenoiser { unet: &unet },
        &cond,
        &d["noise"],
        &cfg,
        &mut || unreachable!(),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(nfe, 2 * steps, "guided steps count both passes");
    let err = max_abs(&x, &d["latents"]);
    let scale = d["latents"]
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        err < 1e-4 * scale.max(1.0),
        "sampled latents max|diff| = {err} (max |x| {scale})"
    );
}

/// A checkpoint written by onestep reads back identically (names, shapes, config). With
/// ONESTEP_ROUNDTRIP_DIR set it is also left there for `svd_reference.py --load-onestep`.
#[test]
fn checkpoint_roundtrip_in_diffusers_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var_os("ONESTEP_ROUNDTRIP_DIR")
        .map(PathBuf::from)
        .unwrap_or(tmp.path().to_path_buf());
    let (ucfg, _, uvars) = load_unet(&fixtures().join("unet"));
    let (vcfg, _, vvars) = load_vae(&fixtures().join("vae"));
    save_component(&out.join("unet"), &ucfg, &uvars).unwrap();
    save_component(&out.join("vae"), &vcfg, &vvars).unwrap();
    let (ucfg2, unet2, _) = load_unet(&out.join("unet"));
    assert_eq!(ucfg, ucfg2);
    let d = io("unet_io.safetensors");
    let o = unet2
        .forward(
            &d["sample"],
            &d["timestep"],
            &d["encoder_hidden_states"],
            &d["added_time_ids"],
        )
        .unwrap();
    assert!(max_abs(&o, &d["out"]) < 1e-4);
    let (vcfg2, _, _) = load_vae(&out.join("vae"));
    assert_eq!(vcfg, vcfg2);
}

#[test]
fn loading_rejects_renamed_or_reshaped_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("unet");
    let mut t =
        candle_core::safetensors::load(src.join(checkpoint::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let dir = tmp.path().join("unet");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let key = "down_blocks.0.resnets.0.temporal_res_block.conv1.weight";
    let w = t.remove(key).unwrap();
    t.insert(key.replace("conv1", "conv_1"), w);
    checkpoint::save_tensors(&dir.join(checkpoint::WEIGHTS_FILE), &t).unwrap();
    let err = load_component(&dir, &Device::Cpu, UNetSpatioTemporal::new)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing") && err.contains(key), "{err}");

    std::fs::write(dir.join(checkpoint::WEIGHTS_FILE), b"not safetensors").unwrap();
    let err = load_component(&dir, &Device::Cpu, UNetSpatioTemporal::new)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn edm_scalings_invariants() {
    // c_skip -> 1, c_out -> 0 as sigma -> 0 (the boundary condition D(x; 0) = x).
    let s = Scalings::svd(1e-6);
    assert!((s.c_skip - 1.0).abs() < 1e-9 && s.c_out.abs() < 1e-5);
    // sigma = 1: c_skip = 1/2, c_out = -1/sqrt 2, c_in = 1/sqrt 2, c_noise = 0.
    let s = Scalings::svd(1.0);
    assert!((s.c_skip - 0.5).abs() < 1e-12);
    assert!((s.c_out + std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
    assert!((s.c_in - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
    assert!(s.c_noise.abs() < 1e-12);
    let sig = karras_sigmas(25, 0.002, 700.0, 7.0);
    assert_eq!(sig.len(), 26);
    assert!((sig[0] - 700.0).abs() < 1e-9 && (sig[24] - 0.002).abs() < 1e-12 && sig[25] == 0.0);
    assert!(sig.windows(2).all(|w| w[0] > w[1]));
}

/// The exact denoiser of data ~ N(0, I): D(x; sigma) = x / (sigma^2 + 1). Its probability-flow
/// ODE dx/dsigma = (x - D)/sigma has the solution x(sigma) = x(sigma_0) sqrt((sigma^2 + 1) /
/// (sigma_0^2 + 1)), so both samplers can be checked against a closed form.
struct GaussianDenoiser;

impl onestep::diffusion::Denoiser for GaussianDenoiser {
    fn denoise(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        _c: &Conditioning,
    ) -> candle_core::Result<Tensor> {
        let b = sigma.dim(0)?;
        let s2 = (sigma.sqr()? + 1.0)?.reshape((b, 1, 1, 1, 1))?;
        x.broadcast_div(&s2)
    }
}

#[test]
fn euler_and_heun_integrate_the_probability_flow_ode() {
    let dev = Device::Cpu;
    let noise = Tensor::new(&[1.0f32, -0.5, 2.0, 0.25], &dev)
        .unwrap()
        .reshape((1, 1, 1, 2, 2))
        .unwrap();
    let cond = Conditioning {
        image_latents: Tensor::zeros((1, 1, 1, 2, 2), candle_core::DType::F32, &dev).unwrap(),
        image_embeds: Tensor::zeros((1, 1, 1), candle_core::DType::F32, &dev).unwrap(),
        added_time_ids: Tensor::zeros((1, 3), candle_core::DType::F32, &dev).unwrap(),
    };
    let (smin, smax) = (0.002, 80.0);
    // Integrate down to sigma_min only (the last step to 0 is exact for this denoiser anyway:
    // D(x; sigma_min) ~ x), and compare with the closed form at sigma = 0.
    let exact = |x0: f32| x0 as f64 * smax * (1.0 / (smax * smax + 1.0)).sqrt();
    let run = |method, steps| {
        let cfg = SamplerConfig {
            method,
            steps,
            sigma_min: smin,
            sigma_max: smax,
            min_guidance: 1.0,
            max_guidance: 1.0,
            ..Default::default()
        };
        let (x, nfe) = sample(
            &GaussianDenoiser,
            &cond,
            &noise,
            &cfg,
            &mut || unreachable!(),
            |_, _| {},
        )
        .unwrap();
        let got: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f64> = noise
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(exact)
            .collect();
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        (err, nfe)
    };
    let (e_euler, nfe_euler) = run(SamplerMethod::Euler, 10);
    let (e_euler_fine, _) = run(SamplerMethod::Euler, 40);
    let (e_heun, nfe_heun) = run(SamplerMethod::Heun, 10);
    let (e_heun_fine, _) = run(SamplerMethod::Heun, 40);
    assert_eq!(nfe_euler, 10, "unguided Euler: one evaluation per step");
    assert_eq!(
        nfe_heun, 19,
        "Heun: two per step but the last (to sigma = 0)"
    );
    // Four times the steps: first order cuts the error about 4x, second order about 16x
    // (a python transcription of k-diffusion's loops gives 0.498 -> 0.128 and 0.351 -> 0.016).
    assert!(
        e_euler / e_euler_fine > 3.0 && e_euler / e_euler_fine < 6.0,
        "Euler {e_euler} -> {e_euler_fine}"
    );
    assert!(
        e_heun / e_heun_fine > 12.0,
        "Heun {e_heun} -> {e_heun_fine}"
    );
    assert!(
        e_heun_fine < e_euler_fine / 5.0,
        "Heun {e_heun_fine} vs Euler {e_euler_fine}"
    );
    assert!((e_heun_fine - 0.01596).abs() < 1e-3, "{e_heun_fine}");
}

/// Autograd through onestep's layers (im2col convolutions, expanded per-channel parameters,
/// group and layer norms, attention, temporal convolutions, mix factors) agrees with central
/// finite differences on the fixture VAE and UNet.
#[test]
fn gradients_match_finite_differences() {
    let (_, vae, vars) = load_vae(&fixtures().join("vae"));
    let d = io("vae_io.safetensors");
    let x = d["x"].clone();
    let frames = x.dim(0).unwrap();
    let loss = || -> Tensor {
        let post = vae.encode(&x).unwrap();
        let xr = vae.decode(post.mode(), frames).unwrap();
        ((xr - &x).unwrap().sqr().unwrap().mean_all().unwrap() + post.logvar.mean_all().unwrap())
            .unwrap()
    };
    let (_, unet, uvars) = load_unet(&fixtures().join("unet"));
    let u = io("unet_io.safetensors");
    let uloss = || -> Tensor {
        unet.forward(
            &u["sample"],
            &u["timestep"],
            &u["encoder_hidden_states"],
            &u["added_time_ids"],
        )
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
    };
    let check = |vars: &candle_nn::VarMap, name: &str, f: &dyn Fn() -> Tensor| {
        let var = vars.data().lock().unwrap()[name].clone();
        let grads = f().backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let g0 = g
            .flatten_all()
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let orig = var.as_tensor().copy().unwrap();
        let flat = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-2f32.max(flat[0].abs() * 1e-2);
        let at = |delta: f32| {
            let mut v = flat.clone();
            v[0] += delta;
            var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                .unwrap();
            f().to_scalar::<f32>().unwrap() as f64
        };
        let fd = (at(h) - at(-h)) / (2.0 * h as f64);
        var.set(&orig).unwrap();
        let tol = 0.05 * fd.abs().max(g0.abs()) + 1e-5;
        assert!(
            (g0 - fd).abs() <= tol,
            "{name}: autograd {g0:e}, finite difference {fd:e}"
        );
    };
    for name in [
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.resnets.0.norm1.weight",
        "decoder.mid_block.resnets.0.temporal_res_block.conv1.weight",
        "decoder.up_blocks.0.resnets.0.time_mixer.mix_factor",
        "decoder.time_conv_out.bias",
        "decoder.conv_out.bias",
    ] {
        check(&vars, name, &loss);
    }
    for name in [
        "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1.bias",
        "down_blocks.0.attentions.0.time_pos_embed.linear_1.bias",
        "add_embedding.linear_1.weight",
        "up_blocks.1.resnets.0.temporal_res_block.norm2.weight",
        "mid_block.attentions.0.time_mixer.mix_factor",
    ] {
        check(&uvars, name, &uloss);
    }
}

#[test]
fn dinov2_matches_transformers_with_interpolated_positions() {
    // tools/fixtures/dinov2_reference.py: a random Dinov2Model (pretrained grid 4x4) on 20x28
    // inputs, whose 5x7 grid needs bicubic position interpolation.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dinov2");
    let net = onestep::models::dinov2::Dinov2::load(&dir, &Device::Cpu).unwrap();
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let (states, last) = net.forward(&r["pixel_values"]).unwrap();
    assert_eq!(states.len(), 4);
    for (i, s) in states.iter().enumerate() {
        let d = max_abs(s, &r[&format!("hidden_states.{i}")]);
        assert!(d < 1e-4, "hidden state {i}: max abs diff {d}");
    }
    let d = max_abs(&last, &r["last_hidden_state"]);
    assert!(d < 1e-4, "last hidden state: max abs diff {d}");
    // Features: the patch tokens of every layer as [n, d, 5, 7] maps.
    let f = net.features(&r["pixel_values"]).unwrap();
    assert_eq!(f.len(), 3);
    assert_eq!(f[0].dims(), &[2, 32, 5, 7]);
    // A wrong folder is a clear error naming the file.
    let err = onestep::models::dinov2::Dinov2::load(&fixtures(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn dinov2_discriminator_trains_its_heads_and_upsampler_through_the_frozen_vit() {
    use onestep::models::discriminator::{
        Backbone, BackboneConfig, BackboneKind, Discriminator, DiscriminatorConfig,
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dinov2");
    let dev = Device::Cpu;
    let cfg = DiscriminatorConfig {
        backbone: BackboneConfig {
            kind: BackboneKind::Dinov2,
            path: dir.display().to_string(),
            image_size: 16,
            ..Default::default()
        },
        feature_layers: vec![0, 2],
        head_channels: 8,
        ..Default::default()
    };
    cfg.validate().unwrap();
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, candle_core::DType::F32, &dev);
    let vit = onestep::models::dinov2::Dinov2::load(&dir, &dev).unwrap();
    let d = Discriminator::new(vb, Backbone::Dinov2(Box::new(vit), 16), &cfg, 4).unwrap();
    // Latents [b, t, c, h, w]: 2x2 latents -> 8x8 images (r = 4) -> resized to 16 -> 4x4 patches.
    let z = Tensor::randn(0f32, 1.0, (1, 3, 4, 2, 2), &dev).unwrap();
    let logits = d.forward(&z, None).unwrap();
    assert_eq!(logits.len(), 4, "spatial and temporal heads on two layers");
    let loss = logits
        .iter()
        .map(|l| l.sum_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    let vars = map.data().lock().unwrap();
    assert!(
        vars.keys().all(|k| !k.contains("encoder.layer")),
        "the ViT is not trainable"
    );
    for (k, v) in vars.iter() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {k}"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if k.starts_with("upsampler") {
            assert!(n > 0.0, "the upsampler learns through the frozen ViT: {k}");
        }
    }
    // Validation names the missing folder.
    let bad = DiscriminatorConfig {
        backbone: BackboneConfig {
            kind: BackboneKind::Dinov2,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(bad.validate().unwrap_err().contains("backbone.path"));
}

#[test]
fn sfv_discriminator_reads_the_frozen_teacher_unet_encoder_with_conditioning() {
    use onestep::diffusion::Conditioning;
    use onestep::models::discriminator::{
        Backbone, BackboneConfig, BackboneKind, DiscInput, Discriminator, DiscriminatorConfig,
    };
    let dev = Device::Cpu;
    let ucfg = UNetConfig::tiny();
    // The teacher's weights as constants: a frozen copy.
    let vm = candle_nn::VarMap::new();
    UNetSpatioTemporal::new(
        candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev),
        &ucfg,
    )
    .unwrap();
    let consts: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let unet = UNetSpatioTemporal::new(
        candle_nn::VarBuilder::from_tensors(consts, candle_core::DType::F32, &dev),
        &ucfg,
    )
    .unwrap();
    let layers = ucfg.encoder_channels().len();
    let cfg = DiscriminatorConfig {
        input: DiscInput::Latent,
        backbone: BackboneConfig {
            kind: BackboneKind::TeacherUnet,
            noise_sigma: 0.5,
            ..Default::default()
        },
        feature_layers: (0..layers).collect(),
        head_channels: 8,
        ..Default::default()
    };
    cfg.validate().unwrap();
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, candle_core::DType::F32, &dev);
    let lc = ucfg.out_channels;
    let d = Discriminator::new(vb, Backbone::TeacherUnet(Box::new(unet), 0.5), &cfg, lc).unwrap();
    let (b, t) = (2, 3);
    let z = Tensor::randn(0f32, 1.0, (b, t, lc, 8, 8), &dev).unwrap();
    let noise = Tensor::randn(0f32, 1.0, (b, t, lc, 8, 8), &dev).unwrap();
    let cond = Conditioning {
        image_latents: Tensor::randn(0f32, 1.0, (b, 1, lc, 8, 8), &dev).unwrap(),
        // UNetConfig::tiny()'s cross-attention width.
        image_embeds: Tensor::randn(0f32, 1.0, (b, 1, 64), &dev).unwrap(),
        added_time_ids: Tensor::new(&[[6f32, 127.0, 0.02], [6.0, 127.0, 0.02]], &dev).unwrap(),
    };
    // Without the conditioning it cannot run, and says why.
    let err = d.forward(&z, None).unwrap_err().to_string();
    assert!(err.contains("conditioning"), "{err}");
    let logits = d.forward_cond(&z, None, Some((&cond, &noise))).unwrap();
    assert_eq!(logits.len(), 2 * layers);
    for l in &logits {
        assert_eq!(l.dim(0).unwrap(), b);
    }
    let loss = logits
        .iter()
        .map(|l| l.sum_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let grads = loss.backward().unwrap();
    let vars = map.data().lock().unwrap();
    assert!(!vars.is_empty());
    assert!(
        vars.keys().all(|k| k.starts_with("heads.")),
        "only heads train: {:?}",
        vars.keys()
    );
    for (k, v) in vars.iter() {
        assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {k}");
    }
    // The latent input needs the teacher backbone, and the teacher backbone the latent input.
    let mut bad = cfg.clone();
    bad.input = DiscInput::Upsampler;
    assert!(bad.validate().unwrap_err().contains("input = \"latent\""));
    let mut bad = cfg;
    bad.backbone.kind = BackboneKind::Conv;
    assert!(bad.validate().unwrap_err().contains("teacher_unet"));
}

// ---- A real Stable Video Diffusion folder (tools/fixtures/svd_pipeline_reference.py): a tiny
// random StableVideoDiffusionPipeline saved by diffusers, fp32 and fp16 variant files.

fn svd_pipeline_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/svd_pipeline")
}

fn svd_pipeline_io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/svd_pipeline_io.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// The fixture's call: 4 frames, 3 Euler steps, guidance 1 -> 2.5, fps 7, motion bucket 100,
/// augmentation 0.05, decode chunks of 2 frames; frames in [0, 1].
fn run_svd_pipeline(
    pipe: &onestep::pipeline::VideoPipeline,
    d: &HashMap<String, Tensor>,
) -> Tensor {
    let mut opts = pipe.default_options();
    opts.frames = 4;
    opts.sampler.steps = 3;
    opts.sampler.max_guidance = 2.5;
    opts.fps = 7.0;
    opts.motion_bucket_id = 100.0;
    opts.noise_aug_strength = 0.05;
    opts.decode_chunk_size = Some(2);
    let images = ((&d["image"] * 2.0).unwrap() - 1.0).unwrap();
    let mut no_fresh = || -> candle_core::Result<Tensor> { candle_core::bail!("unused") };
    let (video, nfe) = pipe
        .generate_from_noise(
            &images,
            &d["latents"],
            &d["aug_noise"],
            &opts,
            &mut no_fresh,
            |_, _| {},
        )
        .unwrap();
    assert_eq!(nfe, 6, "3 guided steps");
    ((video + 1.0).unwrap() * 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
}

#[test]
fn clip_vision_encoder_matches_transformers() {
    let d = svd_pipeline_io();
    let dir = svd_pipeline_dir().join("image_encoder");
    let cfg: onestep::models::clip::ClipVisionConfig = checkpoint::load_config(&dir).unwrap();
    assert_eq!((cfg.hidden_act.as_str(), cfg.projection_dim), ("gelu", 16));
    let model = checkpoint::load_frozen(
        &checkpoint::weight_files(&dir, "model", None).unwrap(),
        candle_core::DType::F32,
        &Device::Cpu,
        |vb| onestep::models::clip::ClipVisionModelWithProjection::new(vb, &cfg),
    )
    .unwrap();
    let err = max_abs(&model.forward(&d["clip_in"]).unwrap(), &d["clip_out"]);
    assert!(err < 1e-4, "CLIP image_embeds max|diff| = {err}");
}

#[test]
fn svd_pipeline_folder_generates_what_diffusers_generates() {
    use onestep::pipeline::{LoadOptions, VideoPipeline};
    let d = svd_pipeline_io();
    let pipe = VideoPipeline::load(&svd_pipeline_dir(), &Device::Cpu).unwrap();
    // The settings of a diffusers folder: the pipeline call's defaults.
    let s = &pipe.settings;
    assert_eq!((s.frames, s.height, s.width), (4, 576, 1024));
    assert_eq!(
        (s.fps, s.motion_bucket_id, s.noise_aug_strength),
        (7.0, 127.0, 0.02)
    );
    assert_eq!(
        (s.sampler.steps, s.sampler.sigma_max, s.sampler.max_guidance),
        (25, 700.0, 3.0)
    );
    // CLIP's input: antialiased resize to 224 and CLIP normalisation, then the embedding.
    let images = ((&d["image"] * 2.0).unwrap() - 1.0).unwrap();
    let px = pipe.image_encoder.clip_pixels(&images).unwrap();
    let err = max_abs(&px, &d["clip_pixels"]);
    assert!(err < 1e-4, "CLIP pixels max|diff| = {err}");
    let err = max_abs(
        &pipe.image_encoder.embed(&images).unwrap(),
        &d["image_embeds"],
    );
    assert!(err < 1e-4, "image embedding max|diff| = {err}");
    // The whole call from the same noise (diffusers starts at sqrt(700^2 + 1) sigma, onestep at
    // 700: 1e-6 relative).
    let err = max_abs(&run_svd_pipeline(&pipe, &d), &d["frames"]);
    assert!(err < 1e-3, "frames max|diff| = {err}");
    // The fp16 variant files, computed in f32.
    let pipe16 = VideoPipeline::load_with(
        &svd_pipeline_dir(),
        &Device::Cpu,
        &LoadOptions {
            dtype: None,
            variant: Some("fp16".into()),
        },
    )
    .unwrap();
    let f16 = run_svd_pipeline(&pipe16, &d);
    let err = max_abs(&f16, &d["frames_fp16_weights"]);
    assert!(err < 1e-3, "fp16-variant frames max|diff| = {err}");
    assert!(
        max_abs(&f16, &d["frames"]) > 1e-4,
        "the fp16 variant must really be read"
    );
}

#[test]
fn svd_folder_weight_files_variants_and_strict_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = svd_pipeline_dir().join("unet");
    // A folder with only the fp16 variant loads it by default; asking for a missing variant
    // names what is there.
    let only16 = tmp.path().join("unet");
    std::fs::create_dir_all(&only16).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.fp16.safetensors"] {
        std::fs::copy(unet.join(f), only16.join(f)).unwrap();
    }
    let files = checkpoint::weight_files(&only16, "diffusion_pytorch_model", None).unwrap();
    assert!(files[0].ends_with("diffusion_pytorch_model.fp16.safetensors"));
    let err = checkpoint::weight_files(&only16, "diffusion_pytorch_model", Some("bf16"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("diffusion_pytorch_model.bf16.safetensors") && err.contains("fp16"),
        "{err}"
    );
    // A tensor the config does not use is an error, not silently ignored.
    let mut ts = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap();
    ts.insert(
        "extra.weight".into(),
        Tensor::zeros(3, candle_core::DType::F16, &Device::Cpu).unwrap(),
    );
    let extra = tmp.path().join("extra.safetensors");
    candle_core::safetensors::save(&ts, &extra).unwrap();
    let cfg: UNetConfig = checkpoint::load_config(&unet).unwrap();
    let err = checkpoint::load_frozen(&[extra], candle_core::DType::F32, &Device::Cpu, |vb| {
        UNetSpatioTemporal::new(vb, &cfg)
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("extra.weight"), "{err}");
    // Not a model folder at all.
    let err = onestep::pipeline::VideoPipeline::load(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model_index.json") && err.contains("onestep.json"),
        "{err}"
    );
}

#[test]
fn clip_resize_matrix_is_identity_at_the_same_size_and_blurs_when_shrinking() {
    let m = onestep::models::clip::svd_resize_matrix(5, 5);
    for i in 0..5 {
        for j in 0..5 {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!(
                (m[i * 5 + j] - want).abs() < 1e-6,
                "{i},{j}: {}",
                m[i * 5 + j]
            );
        }
    }
    // 576 -> 224: every row sums to one.
    let m = onestep::models::clip::svd_resize_matrix(576, 224);
    for o in 0..224 {
        let row = &m[o * 576..(o + 1) * 576];
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    // Where it blurs (72x128 -> 24x40), against diffusers' `_resize_with_antialiasing`.
    let d = svd_pipeline_io();
    let out = onestep::models::dinov2::resample2d(
        &d["resize_in"],
        &onestep::models::clip::svd_resize_matrix(72, 24),
        &onestep::models::clip::svd_resize_matrix(128, 40),
        24,
        40,
    )
    .unwrap();
    let err = max_abs(&out, &d["resize_out"]);
    assert!(err < 1e-5, "antialiased resize max|diff| = {err}");
}

#[test]
fn gradient_checkpointing_gives_the_gradients_of_the_plain_backward_pass() {
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    use onestep::models::grad_checkpoint::Checkpointing;
    use std::sync::Arc;
    let dev = Device::Cpu;
    let cfg = UNetConfig::tiny();
    let map = VarMap::new();
    let unet = Arc::new(
        UNetSpatioTemporal::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg).unwrap(),
    );
    let frozen: HashMap<String, Tensor> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let frozen = Arc::new(
        UNetSpatioTemporal::new(VarBuilder::from_tensors(frozen, DType::F32, &dev), &cfg).unwrap(),
    );
    let randn = |shape: &[usize], seed: u64| {
        let mut r = onestep::diffusion::noise::NormalRng::new(seed);
        r.tensor(shape, &dev).unwrap()
    };
    let x = randn(&[2, 4, 8, 8, 8], 1);
    let ts = Tensor::new(&[0.3f32, -1.0], &dev).unwrap();
    // The context is a variable too: its gradient must come out of the checkpointed units.
    let ctx = candle_core::Var::from_tensor(&randn(&[2, 1, 64], 2)).unwrap();
    let ids = Tensor::new(&[[6f32, 127.0, 0.02], [6.0, 30.0, 0.1]], &dev).unwrap();
    let target = randn(&[2, 4, 4, 8, 8], 3);
    let loss = |y: Tensor| (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
    let plain = loss(unet.forward(&x, &ts, ctx.as_tensor(), &ids).unwrap());
    let g_plain = plain.backward().unwrap();
    let vars: Vec<candle_core::Var> = map.all_vars();
    let ck = Checkpointing::new(vars.clone()).unwrap();
    let y = UNetSpatioTemporal::forward_checkpointed(
        &unet,
        &frozen,
        &ck,
        &x,
        &ts,
        ctx.as_tensor(),
        &ids,
    )
    .unwrap();
    let checkpointed = loss(y);
    assert_eq!(
        plain.to_scalar::<f32>().unwrap(),
        checkpointed.to_scalar::<f32>().unwrap(),
        "same forward pass"
    );
    let mut g_ck = checkpointed.backward().unwrap();
    ck.merge_into(&mut g_ck).unwrap();
    let mut worst = 0f32;
    let mut scale = 0f32;
    for v in vars.iter().chain(std::iter::once(&ctx)) {
        let a = g_plain.get(v.as_tensor()).expect("plain gradient");
        let b = g_ck.get(v.as_tensor()).expect("checkpointed gradient");
        worst = worst.max(max_abs(a, b));
        scale = scale.max(
            a.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
    }
    assert!(scale > 0.0);
    assert!(
        worst <= 1e-6 * scale.max(1.0),
        "checkpointed gradients differ by {worst} (scale {scale})"
    );
}

#[test]
fn gradient_checkpointing_reaches_lora_adapters() {
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    use onestep::models::grad_checkpoint::Checkpointing;
    use onestep::train::lora::{LoraConfig, Student};
    use std::sync::Arc;
    let dev = Device::Cpu;
    let cfg = UNetConfig::tiny();
    let map = VarMap::new();
    UNetSpatioTemporal::new(VarBuilder::from_varmap(&map, DType::F32, &dev), &cfg).unwrap();
    let base: HashMap<String, Tensor> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let lora = LoraConfig {
        rank: 2,
        train_also: vec!["conv_out".into()],
        ..LoraConfig::default()
    };
    let student = Student::lora_from_base(base, &cfg, &lora, 3, &dev).unwrap();
    // Non-zero B, so that A's gradients are not zero either.
    for (n, v) in student.vars() {
        if n.ends_with(".B") {
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.01).unwrap())
                .unwrap();
        }
    }
    let mut r = onestep::diffusion::noise::NormalRng::new(9);
    let x = r.tensor(&[1, 3, 8, 8, 8], &dev).unwrap();
    let ts = Tensor::new(&[0.3f32], &dev).unwrap();
    let ctx = r.tensor(&[1, 1, 64], &dev).unwrap();
    let ids = Tensor::new(&[[6f32, 127.0, 0.02]], &dev).unwrap();
    let loss = |y: Tensor| y.sqr().unwrap().mean_all().unwrap();
    let vars: Vec<candle_core::Var> = student.vars().into_iter().map(|(_, v)| v).collect();
    let plain = loss(
        student
            .unet()
            .unwrap()
            .forward(&x, &ts, &ctx, &ids)
            .unwrap(),
    );
    let g_plain = plain.backward().unwrap();
    let tr = Arc::new(student.unet().unwrap().into_owned());
    let fr = Arc::new(
        UNetSpatioTemporal::new(
            VarBuilder::from_tensors(student.merged().unwrap(), DType::F32, &dev),
            &cfg,
        )
        .unwrap(),
    );
    let ck = Checkpointing::new(vars.clone()).unwrap();
    let checkpointed =
        loss(UNetSpatioTemporal::forward_checkpointed(&tr, &fr, &ck, &x, &ts, &ctx, &ids).unwrap());
    assert_eq!(
        plain.to_scalar::<f32>().unwrap(),
        checkpointed.to_scalar::<f32>().unwrap()
    );
    let mut g_ck = checkpointed.backward().unwrap();
    ck.merge_into(&mut g_ck).unwrap();
    let mut nonzero = 0;
    let names: Vec<String> = student.vars().into_iter().map(|(n, _)| n).collect();
    for (v, name) in vars.iter().zip(&names) {
        let a = g_plain.get(v.as_tensor()).expect("plain gradient");
        let b = g_ck
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no checkpointed gradient for {name}"));
        let scale = a
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if scale > 0.0 {
            nonzero += 1;
        }
        let err = max_abs(a, b);
        assert!(
            err <= 1e-5 * scale.max(1e-3),
            "gradient differs by {err} (scale {scale})"
        );
    }
    assert!(
        nonzero > vars.len() / 2,
        "{nonzero} of {} gradients non-zero",
        vars.len()
    );
}

/// `D(x; sigma) = x / (1 + sigma^2)`: the exact denoiser of unit Gaussian data.
struct GaussianData;
impl onestep::diffusion::Denoiser for GaussianData {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, _: &Conditioning) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        x.broadcast_div(&(sigma.sqr()? + 1.0)?.reshape((b, 1, 1, 1, 1))?)
    }
}

fn scalar_cond(b: usize) -> Conditioning {
    let dev = Device::Cpu;
    Conditioning {
        image_latents: Tensor::ones((b, 1, 1, 1, 1), candle_core::DType::F32, &dev).unwrap(),
        image_embeds: Tensor::zeros((b, 1, 1), candle_core::DType::F32, &dev).unwrap(),
        added_time_ids: Tensor::zeros((b, 3), candle_core::DType::F32, &dev).unwrap(),
    }
}

#[test]
fn consistency_and_time_travel_samplers_follow_their_algorithms() {
    let dev = Device::Cpu;
    let noise = Tensor::new(&[0.7f32, -1.3], &dev)
        .unwrap()
        .reshape((1, 2, 1, 1, 1))
        .unwrap();
    let fresh_values = [0.4f64, -0.9, 1.1];
    let d = |x: f64, s: f64| x / (1.0 + s * s);
    let run = |cfg: &SamplerConfig| {
        let mut k = 0;
        let mut fresh = || {
            let v = fresh_values[k];
            k += 1;
            Tensor::full(v as f32, (1, 2, 1, 1, 1), &dev)
        };
        let (x, nfe) = sample(
            &GaussianData,
            &scalar_cond(1),
            &noise,
            cfg,
            &mut fresh,
            |_, _| {},
        )
        .unwrap();
        (x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), nfe)
    };
    let unguided = SamplerConfig {
        min_guidance: 1.0,
        max_guidance: 1.0,
        ..Default::default()
    };
    // Song et al. 2023, Algorithm 1 with 3 steps: denoise, re-noise to the next sigma with
    // std sqrt(sigma^2 - sigma_min^2), denoise again.
    let cfg = SamplerConfig {
        method: SamplerMethod::Consistency,
        steps: 3,
        ..unguided.clone()
    };
    // Its noise levels: the first 3 of the Karras schedule of 4 (the last above sigma_min).
    let s = karras_sigmas(4, cfg.sigma_min, cfg.sigma_max, cfg.rho);
    assert_eq!(
        onestep::diffusion::sampler::consistency_sigmas(&cfg),
        s[..3].to_vec()
    );
    assert!(s[2] > 10.0 * cfg.sigma_min);
    let (got, nfe) = run(&cfg);
    assert_eq!(nfe, 3);
    for (f, &z) in [0.7f64, -1.3].iter().enumerate() {
        let mut x = z * s[0];
        let mut x0 = 0.0;
        for i in 0..3 {
            x0 = d(x, s[i]);
            if i + 1 < 3 {
                x = x0
                    + fresh_values[i] * (s[i + 1].powi(2) - cfg.sigma_min.powi(2)).max(0.0).sqrt();
            }
        }
        assert!(
            (got[f] as f64 - x0).abs() < 1e-5,
            "consistency frame {f}: {} vs {x0}",
            got[f]
        );
    }
    // OSV's Time-Travel Sampler: f = D(x, sigma_max), eps_hat = (x - f) / sigma_max,
    // x' = f + s (eps_0 + eps_hat) / 2, output D(x', s).
    let cfg = SamplerConfig {
        method: SamplerMethod::TimeTravel,
        travel_sigma: Some(0.8),
        ..unguided
    };
    let (got, nfe) = run(&cfg);
    assert_eq!(nfe, 2);
    for (f, &z) in [0.7f64, -1.3].iter().enumerate() {
        let x = z * cfg.sigma_max;
        let fx = d(x, cfg.sigma_max);
        let eps_hat = (x - fx) / cfg.sigma_max;
        let x1 = fx + 0.8 * (fresh_values[0] + eps_hat) / 2.0;
        let want = d(x1, 0.8);
        assert!(
            (got[f] as f64 - want).abs() < 1e-5,
            "tts frame {f}: {} vs {want}",
            got[f]
        );
    }
    // Guidance doubles the evaluations of every step (NFE counts both passes).
    let cfg = SamplerConfig {
        method: SamplerMethod::TimeTravel,
        min_guidance: 1.0,
        max_guidance: 2.0,
        ..Default::default()
    };
    assert_eq!(run(&cfg).1, 4);
}

#[test]
fn adamw_follows_pytorch() {
    // tools/fixtures/adamw_reference.py: torch.optim.AdamW after clip_grad_norm_, 6 steps.
    use onestep::train::{AdamW, AdamWConfig};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adamw/adamw.json");
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vec = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let c = &f["config"];
    let cfg = AdamWConfig {
        lr: 0.0,
        beta1: c["beta1"].as_f64().unwrap(),
        beta2: c["beta2"].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        warmup: 0,
        grad_clip: c["grad_clip"].as_f64().unwrap(),
        lr_min: None,
    };
    let dev = Device::Cpu;
    let mut names: Vec<String> = f["shapes"].as_object().unwrap().keys().cloned().collect();
    names.sort();
    let vars: Vec<(String, candle_core::Var)> = names
        .iter()
        .map(|n| {
            let shape: Vec<usize> = f["shapes"][n]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let t = Tensor::from_vec(vec(&f["params0"][n]), shape, &dev).unwrap();
            (n.clone(), candle_core::Var::from_tensor(&t).unwrap())
        })
        .collect();
    let mut opt = AdamW::new(vars.clone(), cfg).unwrap();
    let lrs = vec(&f["lrs"]);
    for (i, g) in f["grads"].as_array().unwrap().iter().enumerate() {
        // A loss whose gradient is exactly the fixture's: sum(p * g).
        let mut loss = Tensor::new(0f32, &dev).unwrap();
        for (n, v) in &vars {
            let gt = Tensor::from_vec(vec(&g[n]), v.shape(), &dev).unwrap();
            loss = (loss + (v.as_tensor() * gt).unwrap().sum_all().unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        let norm = opt.step(&grads, lrs[i] as f64).unwrap();
        let want_norm = f["grad_norms"][i].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() < 1e-4 * want_norm,
            "step {i}: norm {norm} vs {want_norm}"
        );
        for (n, v) in &vars {
            let got = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = vec(&f["trajectory"][i][n]);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 2e-6, "step {i} `{n}`: {a} vs {b} (PyTorch)");
            }
        }
    }
}

/// `norm_num_groups` (a toy-scale key diffusers lacks): absent from `config.json` at diffusers'
/// 32, written and read back otherwise, and it changes the network (the same weights normalised
/// over 8 groups give other latents).
#[test]
fn vae_norm_num_groups_is_written_only_when_it_differs_from_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, vae32, vars) = load_vae(&fixtures().join("vae"));
    assert_eq!(cfg.norm_num_groups, 32);
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(!json.contains("norm_num_groups"), "{json}");
    let mut cfg8 = cfg.clone();
    cfg8.norm_num_groups = 8;
    save_component(&tmp.path().join("vae8"), &cfg8, &vars).unwrap();
    let written = std::fs::read_to_string(tmp.path().join("vae8/config.json")).unwrap();
    assert!(written.contains("\"norm_num_groups\": 8"), "{written}");
    let (back, vae8, _) = load_vae(&tmp.path().join("vae8"));
    assert_eq!(back, cfg8);
    let d = io("vae_io.safetensors");
    let m32 = vae32.encode(&d["x"]).unwrap().mean;
    let m8 = vae8.encode(&d["x"]).unwrap().mean;
    assert!(max_abs(&m32, &d["mean"]) < 1e-4);
    assert!(
        max_abs(&m8, &m32) > 1e-3,
        "8 groups gave the 32-group latents"
    );
    // Widths must divide into the groups.
    let mut bad = cfg.clone();
    bad.norm_num_groups = 24;
    let e = bad.validate().unwrap_err();
    assert!(e.contains("norm_num_groups = 24"), "{e}");
}
