//! Reading videos for metrics: a video file (mp4, webm, avi, mkv, mov, m4v; decoded by ffmpeg
//! at its own frame rate and size) or a folder of numbered PNG frames (sorted by the number in
//! the file name). Frames come back as u8 RGB `[t, h, w, 3]`.

use crate::data::video::VIDEO_EXTENSIONS;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Decoded RGB frames.
#[derive(Debug, Clone)]
pub struct Frames {
    pub t: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<u8>,
}

impl Frames {
    /// The first `n` frames (error naming `what` if there are fewer).
    pub fn first(&self, n: usize, what: &Path) -> Result<Frames> {
        if self.t < n {
            return Err(Error::Data(format!(
                "{}: {} frame(s), at least {n} are needed",
                what.display(),
                self.t
            )));
        }
        Ok(Frames {
            t: n,
            h: self.h,
            w: self.w,
            data: self.data[..n * self.h * self.w * 3].to_vec(),
        })
    }
}

fn is_video_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| VIDEO_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Read one video: a file or a folder of numbered PNG frames. `ffmpeg` is only needed (and
/// only called) for files.
pub fn read_video(path: &Path, ffmpeg: impl FnOnce() -> Result<PathBuf>) -> Result<Frames> {
    if path.is_dir() {
        read_png_folder(path)
    } else if path.is_file() {
        if !is_video_file(path) {
            return Err(Error::Data(format!(
                "{}: not a video (expected one of {} or a folder of PNG frames)",
                path.display(),
                VIDEO_EXTENSIONS.join(", ")
            )));
        }
        decode_native(&ffmpeg()?, path)
    } else {
        Err(Error::Data(format!(
            "{}: no such file or folder",
            path.display()
        )))
    }
}

/// The videos inside a folder: its video files and its sub-folders of PNG frames, sorted by
/// name. A folder that itself holds PNG frames (and nothing else video-like) is one video.
pub fn list_videos(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Error::Data(format!("{}: cannot read the folder: {e}", dir.display())))?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let p = entry.path();
        if (p.is_file() && is_video_file(&p)) || (p.is_dir() && !png_frames(&p)?.is_empty()) {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::Data(format!(
            "{}: no videos in it (video files, or folders of numbered PNG frames)",
            dir.display()
        )));
    }
    Ok(out)
}

/// PNG files of a folder ordered by the (last) number in their names.
fn png_frames(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Error::Data(format!("{}: cannot read the folder: {e}", dir.display())))?;
    let mut frames: Vec<(u64, String, PathBuf)> = Vec::new();
    for entry in rd.flatten() {
        let p = entry.path();
        let is_png = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if !p.is_file() || !is_png {
            continue;
        }
        let stem = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        let digits: String = stem
            .chars()
            .rev()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(|c| c.is_ascii_digit())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let num = digits.parse().unwrap_or(u64::MAX);
        frames.push((num, stem, p));
    }
    frames.sort();
    Ok(frames.into_iter().map(|(_, _, p)| p).collect())
}

fn read_png_folder(dir: &Path) -> Result<Frames> {
    let files = png_frames(dir)?;
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: a video folder must hold numbered PNG frames; it has none",
            dir.display()
        )));
    }
    let mut data = Vec::new();
    let mut size = None;
    for f in &files {
        let img = image::open(f)
            .map_err(|e| Error::Data(format!("{}: cannot read the PNG frame: {e}", f.display())))?
            .to_rgb8();
        let dims = (img.height() as usize, img.width() as usize);
        match size {
            None => size = Some(dims),
            Some(s) if s != dims => {
                return Err(Error::Data(format!(
                    "{}: frame is {}x{} but the first frame of the folder is {}x{}",
                    f.display(),
                    dims.1,
                    dims.0,
                    s.1,
                    s.0
                )))
            }
            _ => {}
        }
        data.extend_from_slice(img.as_raw());
    }
    let (h, w) = size.unwrap();
    Ok(Frames {
        t: files.len(),
        h,
        w,
        data,
    })
}

/// Decode every frame of a video file at its own size, through a PPM pipe (each frame carries
/// its size, so no probing is needed).
pub fn decode_native(ffmpeg: &Path, file: &Path) -> Result<Frames> {
    let stdout = crate::data::video::run_decoder(
        ffmpeg,
        file,
        &["-an", "-f", "image2pipe", "-vcodec", "ppm", "pipe:1"],
    )?;
    parse_ppm_stream(&stdout).map_err(|e| Error::Data(format!("{}: {e}", file.display())))
}

/// Parse concatenated binary PPM (P6, maxval 255) images of one size.
pub fn parse_ppm_stream(b: &[u8]) -> std::result::Result<Frames, String> {
    let mut pos = 0;
    let mut data = Vec::new();
    let mut dims: Option<(usize, usize)> = None;
    let mut t = 0;
    let token = |pos: &mut usize| -> std::result::Result<String, String> {
        while *pos < b.len() && (b[*pos] as char).is_ascii_whitespace() {
            *pos += 1;
        }
        let start = *pos;
        while *pos < b.len() && !(b[*pos] as char).is_ascii_whitespace() {
            *pos += 1;
        }
        if start == *pos {
            return Err("truncated PPM header".into());
        }
        Ok(String::from_utf8_lossy(&b[start..*pos]).into_owned())
    };
    while pos < b.len() {
        if token(&mut pos)? != "P6" {
            return Err("ffmpeg output is not a PPM stream".into());
        }
        let w: usize = token(&mut pos)?.parse().map_err(|_| "bad PPM width")?;
        let h: usize = token(&mut pos)?.parse().map_err(|_| "bad PPM height")?;
        let maxval = token(&mut pos)?;
        if maxval != "255" {
            return Err(format!(
                "PPM maxval {maxval} (only 8-bit frames are supported)"
            ));
        }
        pos += 1; // one whitespace byte after maxval
        let n = w * h * 3;
        if pos + n > b.len() {
            return Err("truncated PPM frame".into());
        }
        match dims {
            None => dims = Some((h, w)),
            Some(d) if d != (h, w) => return Err("frame size changes inside the video".into()),
            _ => {}
        }
        data.extend_from_slice(&b[pos..pos + n]);
        pos += n;
        t += 1;
        while pos < b.len() && (b[pos] as char).is_ascii_whitespace() {
            pos += 1;
        }
    }
    let (h, w) = dims.ok_or("no video frames decoded")?;
    Ok(Frames { t, h, w, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppm_stream_parses_frames() {
        let mut s = Vec::new();
        for v in [1u8, 2] {
            s.extend_from_slice(b"P6\n2 1\n255\n");
            s.extend_from_slice(&[v; 6]);
        }
        let f = parse_ppm_stream(&s).unwrap();
        assert_eq!((f.t, f.h, f.w), (2, 1, 2));
        assert_eq!(f.data, vec![1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]);
        assert!(parse_ppm_stream(&s[..s.len() - 1]).is_err());
    }

    #[test]
    fn png_folders_sort_by_number() {
        let dir = std::env::temp_dir().join(format!("onestep-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, v) in [(10, 30u8), (2, 20), (1, 10)] {
            image::RgbImage::from_pixel(3, 2, image::Rgb([v, v, v]))
                .save(dir.join(format!("frame_{i}.png")))
                .unwrap();
        }
        let f = read_video(&dir, || unreachable!()).unwrap();
        assert_eq!((f.t, f.h, f.w), (3, 2, 3));
        assert_eq!([f.data[0], f.data[18], f.data[36]], [10, 20, 30]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
