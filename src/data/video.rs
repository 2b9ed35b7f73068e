//! Decoding videos to RGB frames with ffmpeg, and listing a user's folder of videos.
//!
//! ffmpeg is taken, in order, from `$ONESTEP_FFMPEG`, from the assets folder (the static
//! binary of the pinned `imageio-ffmpeg` wheel, fetched on first use so decoded pixels are the
//! same on every machine), or from `PATH`.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const VIDEO_EXTENSIONS: &[&str] = &["mp4", "webm", "avi", "mov", "mkv", "m4v"];

/// Find ffmpeg, fetching the pinned static build into `assets` when none is there yet.
pub fn ffmpeg(assets: &Path) -> Result<PathBuf> {
    if let Ok(p) = std::env::var("ONESTEP_FFMPEG") {
        let p = PathBuf::from(p);
        if runs(&p) {
            return Ok(p);
        }
        return Err(Error::Data(format!(
            "$ONESTEP_FFMPEG = {} does not run",
            p.display()
        )));
    }
    let pinned = super::registry::ffmpeg_path(assets);
    if runs(&pinned) {
        return Ok(pinned);
    }
    match super::registry::fetch_ffmpeg(assets) {
        Ok(p) if runs(&p) => Ok(p),
        fetched => {
            let path = PathBuf::from("ffmpeg");
            if runs(&path) {
                return Ok(path);
            }
            let why = match fetched {
                Err(e) => e.to_string(),
                Ok(p) => format!("{} does not run on this machine", p.display()),
            };
            Err(Error::Data(format!(
                "no ffmpeg: fetching the imageio-ffmpeg wheel failed ({why}) and none is on PATH; install one (apt-get install ffmpeg) or set ONESTEP_FFMPEG"
            )))
        }
    }
}

fn runs(p: &Path) -> bool {
    Command::new(p)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The first line of `ffmpeg -version`, recorded with decoded data.
pub fn ffmpeg_version(ffmpeg: &Path) -> String {
    Command::new(ffmpeg)
        .arg("-version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Run `ffmpeg -i file <output args>` and return its standard output; a failure is an error
/// naming the file with the last lines ffmpeg printed.
pub fn run_decoder(ffmpeg: &Path, file: &Path, output: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(ffmpeg)
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(file)
        .args(output)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            Error::Data(format!(
                "{}: cannot run ffmpeg {}: {e}",
                file.display(),
                ffmpeg.display()
            ))
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(Error::Data(format!(
            "{}: ffmpeg could not decode it: {}",
            file.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(out.stdout)
}

/// Decoded frames of one video: `frames * height * width * 3` bytes.
pub struct Decoded {
    pub frames: usize,
    pub data: Vec<u8>,
}

/// The ffmpeg filter that resamples to `fps`, centre-crops to the aspect ratio of
/// `height x width` (the largest such rectangle) and resizes to it (area filter).
pub fn decode_filter(fps: f64, (height, width): (usize, usize)) -> String {
    let crop = if height == width {
        "crop='min(iw,ih)':'min(iw,ih)'".to_string()
    } else {
        format!("crop='min(iw,ih*{width}/{height})':'min(ih,iw*{height}/{width})'")
    };
    format!("fps={fps},{crop},scale={width}:{height}:flags=area,setsar=1")
}

/// Decode a video at `fps`, centre-cropped to the aspect ratio of `height x width` and
/// resized to it (area filter).
pub fn decode(
    ffmpeg: &Path,
    file: &Path,
    fps: f64,
    (height, width): (usize, usize),
) -> Result<Decoded> {
    let filter = decode_filter(fps, (height, width));
    let stdout = run_decoder(
        ffmpeg,
        file,
        &[
            "-an", "-vf", &filter, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        ],
    )?;
    let frame = height * width * 3;
    if stdout.is_empty() {
        return Err(Error::Data(format!(
            "{}: no video frames decoded",
            file.display()
        )));
    }
    let frames = stdout.len() / frame;
    let mut data = stdout;
    data.truncate(frames * frame);
    Ok(Decoded { frames, data })
}

/// The video files of a folder (not recursive), sorted by name, and the other files in it.
pub fn list_folder(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        Error::Data(format!(
            "{}: cannot read the video folder: {e}",
            dir.display()
        ))
    })?;
    let mut videos = Vec::new();
    let mut other = Vec::new();
    for entry in rd.flatten() {
        let p = entry.path();
        if !p.is_file() {
            continue;
        }
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if ext
            .as_deref()
            .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e))
        {
            videos.push(p);
        } else {
            other.push(p);
        }
    }
    videos.sort();
    other.sort();
    Ok((videos, other))
}

/// Encodes u8 RGB frames (`[t, h, w, 3]`, frame-major) as an H.264 MP4 with ffmpeg (odd sizes
/// are padded to even, as yuv420p needs).
pub fn encode_mp4(
    ffmpeg: &Path,
    frames: &[u8],
    height: usize,
    width: usize,
    fps: f64,
    out: &Path,
) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new(ffmpeg)
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
        ])
        .args([
            "-s",
            &format!("{width}x{height}"),
            "-r",
            &format!("{fps}"),
            "-i",
            "-",
        ])
        .args([
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
        ])
        .arg(out)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(ffmpeg, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(frames).map_err(|e| Error::io(ffmpeg, e))?;
    }
    let o = child.wait_with_output().map_err(|e| Error::io(ffmpeg, e))?;
    if !o.status.success() {
        return Err(Error::Other(format!(
            "ffmpeg could not write {}: {}",
            out.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}
