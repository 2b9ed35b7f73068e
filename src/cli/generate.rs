//! `onestep generate`: image-to-video with a trained model folder on a user's own image.

use super::Global;
use anyhow::Context;
use onestep::data::ClipSet;
use onestep::diffusion::SamplerMethod;
use onestep::pipeline::{load_image, Fit, LoadOptions, VideoPipeline};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A model folder: onestep's (vae/, unet/, image_encoder/, onestep.json), e.g. a teacher
    /// stage's cache folder `results/cache/<hash>`, or a diffusers StableVideoDiffusionPipeline
    /// folder (model_index.json, ...) such as stabilityai/stable-video-diffusion-img2vid-xt.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The conditioning image (PNG, JPEG or GIF; any size, see --fit).
    #[arg(long)]
    pub image: PathBuf,
    /// Output: .gif (animation), .mp4 (H.264 through ffmpeg) or .png (filmstrip).
    #[arg(long)]
    pub out: PathBuf,
    /// Sampling steps (default: the model's preview sampler).
    #[arg(long)]
    pub steps: Option<usize>,
    /// euler, heun (ODE samplers, any model), consistency (1 or `--steps` evaluations) or
    /// time-travel (2 evaluations) for consistency students.
    #[arg(long)]
    pub sampler: Option<SamplerArg>,
    /// Time-Travel Sampler: the sigma re-noised to after the first prediction.
    #[arg(long)]
    pub travel_sigma: Option<f64>,
    /// Seed of the noise (the sample is reproducible from it alone).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Guidance scale at the first and the last frame (SVD: 1 and 3).
    #[arg(long)]
    pub min_guidance: Option<f64>,
    #[arg(long)]
    pub max_guidance: Option<f64>,
    /// Motion bucket id (default: the median of the training clips).
    #[arg(long)]
    pub motion_bucket: Option<f64>,
    /// Frames per second id (default: the training clips' fps).
    #[arg(long)]
    pub fps: Option<f64>,
    /// Noise augmentation of the conditioning image (default 0.02).
    #[arg(long)]
    pub noise_aug: Option<f64>,
    /// How an image of another size is made to fit: crop (centre crop, then resize), stretch,
    /// or reject.
    #[arg(long, default_value = "crop")]
    pub fit: FitArg,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: super::run::DeviceArg,
    /// Frames per clip (default: the model's; SVD 14, SVD-XT 25).
    #[arg(long)]
    pub frames: Option<usize>,
    /// Image height and width in pixels (default: the model's; SVD 576x1024).
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long)]
    pub width: Option<usize>,
    /// Frames the VAE decodes at once (diffusers' decode_chunk_size; default all).
    #[arg(long)]
    pub decode_chunk_size: Option<usize>,
    /// Dtype of the UNet and image encoder: auto (bf16 on CUDA, f32 on the CPU), f32, f16 or
    /// bf16 (half precision keeps norms, softmax and the sampler in f32).
    #[arg(long, default_value = "auto")]
    pub dtype: DTypeArg,
    /// Weight variant of a diffusers folder (fp16 reads *.fp16.safetensors).
    #[arg(long)]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DTypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SamplerArg {
    Euler,
    Heun,
    Consistency,
    TimeTravel,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FitArg {
    Crop,
    Stretch,
    Reject,
}

pub fn execute(g: &Global, a: Args) -> anyhow::Result<ExitCode> {
    let ext = a
        .out
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if !matches!(ext.as_deref(), Some("gif" | "mp4" | "png")) {
        anyhow::bail!(
            "{}: the output must end in .gif, .mp4 or .png",
            a.out.display()
        );
    }
    let device = onestep::train::device(match a.device {
        super::run::DeviceArg::Cpu => onestep::spec::Device::Cpu,
        super::run::DeviceArg::Cuda => onestep::spec::Device::Cuda,
    })?;
    let dtype = match a.dtype {
        DTypeArg::Auto if device.is_cuda() => candle_core::DType::BF16,
        DTypeArg::Auto | DTypeArg::F32 => candle_core::DType::F32,
        DTypeArg::F16 => candle_core::DType::F16,
        DTypeArg::Bf16 => candle_core::DType::BF16,
    };
    let load = LoadOptions {
        dtype: Some(dtype),
        variant: a.variant.clone(),
    };
    let pipe = VideoPipeline::load_with(&a.checkpoint, &device, &load)?;
    let mut s = pipe.settings.clone();
    if let Some(v) = a.frames {
        s.frames = v;
    }
    if let Some(v) = a.height {
        s.height = v;
    }
    if let Some(v) = a.width {
        s.width = v;
    }
    let fit = match a.fit {
        FitArg::Crop => Fit::Crop,
        FitArg::Stretch => Fit::Stretch,
        FitArg::Reject => Fit::Reject,
    };
    let image = load_image(&a.image, s.height, s.width, fit)?
        .unsqueeze(0)?
        .to_device(&device)?;
    let mut opts = pipe.default_options();
    opts.frames = s.frames;
    if a.decode_chunk_size.is_some() {
        opts.decode_chunk_size = a.decode_chunk_size;
    }
    if let Some(n) = a.steps {
        opts.sampler.steps = n;
    }
    if let Some(m) = a.sampler {
        opts.sampler.method = match m {
            SamplerArg::Euler => SamplerMethod::Euler,
            SamplerArg::Heun => SamplerMethod::Heun,
            SamplerArg::Consistency => SamplerMethod::Consistency,
            SamplerArg::TimeTravel => SamplerMethod::TimeTravel,
        };
    }
    if a.travel_sigma.is_some() {
        opts.sampler.travel_sigma = a.travel_sigma;
    }
    if let Some(v) = a.min_guidance {
        opts.sampler.min_guidance = v;
    }
    if let Some(v) = a.max_guidance {
        opts.sampler.max_guidance = v;
    }
    if let Some(v) = a.motion_bucket {
        opts.motion_bucket_id = v;
    }
    if let Some(v) = a.fps {
        opts.fps = v;
    }
    if let Some(v) = a.noise_aug {
        opts.noise_aug_strength = v;
    }
    opts.sampler
        .validate()
        .map_err(|e| anyhow::anyhow!("sampler: {e}"))?;
    let mut progress = onestep::progress::Progress::new(g.progress(), 1);
    progress.stage_start("generate", "sample");
    let total = opts.sampler.steps as u64;
    let t0 = std::time::Instant::now();
    let (video, nfe) = pipe.generate(&image, &[a.seed], &opts, |i, _| {
        progress.stage_step(i as u64, total, "sampling")
    })?;
    progress.stage_end("done");
    progress.finish();
    let frames = onestep::train::to_u8_frames(&video.get(0)?)?;
    let mut clip = ClipSet::new(s.frames, s.height, s.width);
    clip.push(&frames, 0, 0);
    match ext.as_deref() {
        Some("gif") => clip.write_gif(&a.out, 1, opts.fps)?,
        Some("png") => clip
            .filmstrip(1)
            .save(&a.out)
            .with_context(|| format!("writing {}", a.out.display()))?,
        _ => {
            let ffmpeg = onestep::data::video::ffmpeg(&g.assets())?;
            onestep::data::video::encode_mp4(
                &ffmpeg, &frames, s.height, s.width, opts.fps, &a.out,
            )?;
        }
    }
    println!(
        "wrote {} ({} frames, {}x{}, {} sampling steps, {nfe} denoiser evaluations, seed {}, {:.1}s)",
        a.out.display(),
        s.frames,
        s.width,
        s.height,
        opts.sampler.steps,
        a.seed,
        t0.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
