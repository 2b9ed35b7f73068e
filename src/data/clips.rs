//! A set of equally-shaped RGB clips, stored as safetensors: `clips` u8 `[n, t, h, w, 3]`,
//! `source` i64 `[n]` (index into the manifest's sources) and `start` i64 `[n]` (first frame
//! of the clip in its source, at the stage's fps). Readable from Python with
//! `safetensors.numpy.load_file`.

use crate::error::{Error, IoContext, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClipSet {
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    /// `n * frames * height * width * 3` bytes, clip-major.
    pub data: Vec<u8>,
    pub source: Vec<i64>,
    pub start: Vec<i64>,
}

/// Summary statistics of a clip set, recorded as stage metrics.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ClipStats {
    pub clips: usize,
    /// Mean and standard deviation of pixel values in [0, 1].
    pub pixel_mean: f64,
    pub pixel_std: f64,
    /// Mean absolute difference between consecutive frames, in [0, 1]: how much clips move.
    pub motion: f64,
}

impl ClipSet {
    pub fn new(frames: usize, height: usize, width: usize) -> Self {
        ClipSet {
            frames,
            height,
            width,
            ..Default::default()
        }
    }

    pub fn clip_len(&self) -> usize {
        self.frames * self.height * self.width * 3
    }

    pub fn len(&self) -> usize {
        self.source.len()
    }

    pub fn is_empty(&self) -> bool {
        self.source.is_empty()
    }

    pub fn clip(&self, i: usize) -> &[u8] {
        let n = self.clip_len();
        &self.data[i * n..(i + 1) * n]
    }

    pub fn push(&mut self, clip: &[u8], source: i64, start: i64) {
        debug_assert_eq!(clip.len(), self.clip_len());
        self.data.extend_from_slice(clip);
        self.source.push(source);
        self.start.push(start);
    }

    pub fn extend(&mut self, other: &ClipSet) {
        self.data.extend_from_slice(&other.data);
        self.source.extend_from_slice(&other.source);
        self.start.extend_from_slice(&other.start);
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.len();
        let src: Vec<u8> = self.source.iter().flat_map(|v| v.to_le_bytes()).collect();
        let start: Vec<u8> = self.start.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bad = |e: safetensors::SafeTensorError| Error::Data(format!("{}: {e}", path.display()));
        let tensors = vec![
            (
                "clips",
                TensorView::new(
                    Dtype::U8,
                    vec![n, self.frames, self.height, self.width, 3],
                    &self.data,
                )
                .map_err(bad)?,
            ),
            (
                "source",
                TensorView::new(Dtype::I64, vec![n], &src).map_err(bad)?,
            ),
            (
                "start",
                TensorView::new(Dtype::I64, vec![n], &start).map_err(bad)?,
            ),
        ];
        let bytes = safetensors::serialize(tensors, &None).map_err(bad)?;
        crate::util::atomic_write(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        let bad = |m: String| Error::Data(format!("{}: not a valid clip set: {m}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let clips = st.tensor("clips").map_err(|e| bad(e.to_string()))?;
        let shape = clips.shape().to_vec();
        if clips.dtype() != Dtype::U8 || shape.len() != 5 || shape[4] != 3 {
            return Err(bad(format!(
                "`clips` must be u8 [n, t, h, w, 3], found {:?} {:?}",
                clips.dtype(),
                shape
            )));
        }
        let ints = |name: &str| -> Result<Vec<i64>> {
            let t = st.tensor(name).map_err(|e| bad(e.to_string()))?;
            if t.dtype() != Dtype::I64 || t.shape() != [shape[0]] {
                return Err(bad(format!("`{name}` must be i64 [{}]", shape[0])));
            }
            Ok(t.data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect())
        };
        Ok(ClipSet {
            frames: shape[1],
            height: shape[2],
            width: shape[3],
            data: clips.data().to_vec(),
            source: ints("source")?,
            start: ints("start")?,
        })
    }

    pub fn stats(&self) -> ClipStats {
        let n = self.data.len().max(1) as f64;
        let (mut s, mut s2) = (0f64, 0f64);
        for &b in &self.data {
            let v = b as f64;
            s += v;
            s2 += v * v;
        }
        let mean = s / n;
        let var = (s2 / n - mean * mean).max(0.0);
        let frame = self.height * self.width * 3;
        let (mut md, mut mc) = (0f64, 0usize);
        for i in 0..self.len() {
            let c = self.clip(i);
            for t in 1..self.frames {
                let (a, b) = (
                    &c[(t - 1) * frame..t * frame],
                    &c[t * frame..(t + 1) * frame],
                );
                md += a
                    .iter()
                    .zip(b)
                    .map(|(&x, &y)| (x as i32 - y as i32).unsigned_abs() as u64)
                    .sum::<u64>() as f64;
                mc += frame;
            }
        }
        ClipStats {
            clips: self.len(),
            pixel_mean: mean / 255.0,
            pixel_std: var.sqrt() / 255.0,
            motion: if mc == 0 { 0.0 } else { md / mc as f64 / 255.0 },
        }
    }

    /// A filmstrip image: one row per clip (at most `rows`), frames left to right.
    pub fn filmstrip(&self, rows: usize) -> image::RgbImage {
        let rows = rows.min(self.len()).max(1);
        let (h, w, t) = (self.height, self.width, self.frames);
        let mut img = image::RgbImage::new((w * t) as u32, (h * rows) as u32);
        for r in 0..rows.min(self.len()) {
            let c = self.clip(r);
            for f in 0..t {
                for y in 0..h {
                    for x in 0..w {
                        let o = ((f * h + y) * w + x) * 3;
                        img.put_pixel(
                            (f * w + x) as u32,
                            (r * h + y) as u32,
                            image::Rgb([c[o], c[o + 1], c[o + 2]]),
                        );
                    }
                }
            }
        }
        img
    }
}

impl ClipSet {
    /// An animated GIF of the first `clips` clips side by side, looping, at `fps`.
    pub fn write_gif(&self, out: &Path, clips: usize, fps: f64) -> Result<()> {
        let n = clips.min(self.len()).max(1);
        let (h, w) = (self.height, self.width);
        let frames = (0..self.frames).map(|f| {
            let mut img = image::RgbaImage::new((w * n) as u32, h as u32);
            for c in 0..n.min(self.len()) {
                let clip = self.clip(c);
                for y in 0..h {
                    for x in 0..w {
                        let o = ((f * h + y) * w + x) * 3;
                        img.put_pixel(
                            (c * w + x) as u32,
                            y as u32,
                            image::Rgba([clip[o], clip[o + 1], clip[o + 2], 255]),
                        );
                    }
                }
            }
            img
        });
        encode_gif(out, fps, frames)
    }
}

/// Write `frames` as a looping animated GIF at `fps`.
pub fn encode_gif(
    out: &Path,
    fps: f64,
    frames: impl IntoIterator<Item = image::RgbaImage>,
) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let file = std::fs::File::create(out).at(out)?;
    let gif_err = |e: image::ImageError| Error::Other(format!("{}: {e}", out.display()));
    let mut enc = GifEncoder::new_with_speed(file, 10);
    enc.set_repeat(Repeat::Infinite).map_err(gif_err)?;
    let delay_ms = (1000.0 / fps.max(0.1)).round() as u32;
    for img in frames {
        enc.encode_frame(image::Frame::from_parts(
            img,
            0,
            0,
            image::Delay::from_numer_denom_ms(delay_ms, 1),
        ))
        .map_err(gif_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip_and_corrupt_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ClipSet::new(2, 3, 4);
        let clip: Vec<u8> = (0..s.clip_len()).map(|i| (i % 251) as u8).collect();
        s.push(&clip, 5, 17);
        s.push(&clip.iter().map(|v| 255 - v).collect::<Vec<_>>(), 6, 33);
        let p = d.path().join("c.safetensors");
        s.save(&p).unwrap();
        assert_eq!(ClipSet::load(&p).unwrap(), s);
        std::fs::write(&p, b"garbage").unwrap();
        let e = ClipSet::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("c.safetensors") && e.contains("not a valid clip set"),
            "{e}"
        );
    }

    #[test]
    fn stats_measure_motion() {
        let mut still = ClipSet::new(3, 2, 2);
        still.push(&[100u8; 36], 0, 0);
        assert_eq!(still.stats().motion, 0.0);
        let mut moving = ClipSet::new(2, 1, 1);
        moving.push(&[0, 0, 0, 255, 255, 255], 0, 0);
        let st = moving.stats();
        assert!(
            (st.motion - 1.0).abs() < 1e-12
                && (st.pixel_mean - 0.5).abs() < 1e-12
                && (st.pixel_std - 0.5).abs() < 1e-12
        );
    }
}
