//! Side-by-side samples of every method on the same conditioning frames: a labelled filmstrip
//! (PNG: for each conditioning clip, the real clip above each method's generation, frames left
//! to right) and an animated GIF (methods side by side, conditioning clips stacked). The `fvd`
//! stages keep their generations (`generated.safetensors`), clip i made from real test clip
//! i's first frame, so no model runs again here.

use crate::data::ClipSet;
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// One row of the comparison: a label and its clips (clip i from conditioning clip i).
pub struct Lane<'a> {
    pub label: String,
    pub clips: &'a ClipSet,
}

const LABEL_W: usize = 300;
const FONT: &str = "sans-serif";

/// Integer upscale so a tile is at least `min` pixels high.
fn scale_for(h: usize, min: usize) -> usize {
    min.div_ceil(h.max(1)).max(1)
}

fn blit(
    buf: &mut [u8],
    buf_w: usize,
    clips: &ClipSet,
    clip: usize,
    frame: usize,
    at: (usize, usize),
    s: usize,
) {
    let (h, w) = (clips.height, clips.width);
    let c = clips.clip(clip);
    let frame = frame.min(clips.frames - 1);
    for y in 0..h * s {
        for x in 0..w * s {
            let o = ((frame * h + y / s) * w + x / s) * 3;
            let d = ((at.1 + y) * buf_w + at.0 + x) * 3;
            buf[d..d + 3].copy_from_slice(&c[o..o + 3]);
        }
    }
}

/// Draw `texts` (x, y, text, size) onto an RGB buffer with the bundled font.
fn label(buf: &mut [u8], (w, h): (usize, usize), texts: &[(i32, i32, String, u32)]) -> Result<()> {
    super::figures::register_fonts();
    let root = BitMapBackend::with_buffer(buf, (w as u32, h as u32)).into_drawing_area();
    for (x, y, t, size) in texts {
        root.draw(&Text::new(
            t.clone(),
            (*x, *y),
            (FONT, *size as f64).into_font().color(&BLACK),
        ))
        .map_err(|e| Error::Other(format!("filmstrip label: {e}")))?;
    }
    root.present()
        .map_err(|e| Error::Other(format!("filmstrip label: {e}")))
}

fn check(lanes: &[Lane<'_>], clips: usize) -> Result<(usize, usize, usize)> {
    let first = lanes
        .first()
        .ok_or_else(|| Error::Data("a filmstrip needs at least one set of clips".into()))?;
    let (h, w) = (first.clips.height, first.clips.width);
    for l in lanes {
        if (l.clips.height, l.clips.width) != (h, w) || l.clips.len() < clips || l.clips.frames == 0
        {
            return Err(Error::Data(format!(
                "filmstrip: `{}` has {} clips of {}x{} but {clips} of {w}x{h} are shown",
                l.label,
                l.clips.len(),
                l.clips.width,
                l.clips.height
            )));
        }
    }
    Ok((
        h,
        w,
        lanes.iter().map(|l| l.clips.frames).max().unwrap_or(1),
    ))
}

/// A labelled filmstrip PNG: `clips` conditioning clips, each a block with one row per lane,
/// at most `max_frames` frames per row (evenly spaced).
pub fn filmstrip(lanes: &[Lane<'_>], clips: usize, max_frames: usize, out: &Path) -> Result<()> {
    let (h, w, frames) = check(lanes, clips)?;
    let shown: Vec<usize> = if frames <= max_frames {
        (0..frames).collect()
    } else {
        (0..max_frames)
            .map(|i| i * (frames - 1) / (max_frames - 1).max(1))
            .collect()
    };
    let s = scale_for(h, 48);
    let (tw, th) = (w * s, h * s);
    let gap = 12;
    let header = 28;
    let width = LABEL_W + shown.len() * (tw + 2);
    let height = header + clips * (lanes.len() * (th + 2) + gap);
    let mut buf = vec![255u8; width * height * 3];
    let mut texts = vec![(8, 6, "frame:".to_string(), 16)];
    for (j, f) in shown.iter().enumerate() {
        texts.push(((LABEL_W + j * (tw + 2) + 2) as i32, 6, f.to_string(), 16));
    }
    for c in 0..clips {
        for (li, lane) in lanes.iter().enumerate() {
            let y = header + c * (lanes.len() * (th + 2) + gap) + li * (th + 2);
            for (j, &f) in shown.iter().enumerate() {
                blit(
                    &mut buf,
                    width,
                    lane.clips,
                    c,
                    f,
                    (LABEL_W + j * (tw + 2), y),
                    s,
                );
            }
            let name = if li == 0 {
                format!("clip {c}: {}", lane.label)
            } else {
                lane.label.clone()
            };
            texts.push((8, (y + th / 2) as i32 - 8, name, 15));
        }
    }
    label(&mut buf, (width, height), &texts)?;
    image::save_buffer(
        out,
        &buf,
        width as u32,
        height as u32,
        image::ColorType::Rgb8,
    )
    .map_err(|e| Error::Other(format!("{}: {e}", out.display())))
}

/// An animated GIF: lanes side by side (labelled above), `clips` conditioning clips stacked,
/// looping at `fps`. A lane shorter than the longest holds its last frame.
pub fn gif(lanes: &[Lane<'_>], clips: usize, fps: f64, out: &Path) -> Result<()> {
    let (h, w, frames) = check(lanes, clips)?;
    let s = scale_for(h, 96);
    let (tw, th) = (w * s, h * s);
    let col = tw.max(150) + 6;
    let header = 40;
    let width = col * lanes.len();
    let height = header + clips * (th + 4);
    let mut base = vec![255u8; width * height * 3];
    let texts: Vec<_> = lanes
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut t = l.label.clone();
            if t.chars().count() > 22 {
                t = t.chars().take(21).collect::<String>() + "…";
            }
            ((i * col + 3) as i32, 12, t, 13)
        })
        .collect();
    label(&mut base, (width, height), &texts)?;
    let frames = (0..frames).map(|f| {
        let mut buf = base.clone();
        for (i, lane) in lanes.iter().enumerate() {
            for c in 0..clips {
                let at = (i * col + (col - tw) / 2, header + c * (th + 4));
                blit(&mut buf, width, lane.clips, c, f, at, s);
            }
        }
        let rgba: Vec<u8> = buf
            .chunks(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect();
        image::RgbaImage::from_raw(width as u32, height as u32, rgba)
            .expect("the buffer holds width x height pixels")
    });
    crate::data::clips::encode_gif(out, fps, frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize, frames: usize, value: u8) -> ClipSet {
        let mut s = ClipSet::new(frames, 4, 6);
        for i in 0..n {
            // A colour no text or background pixel has: (v, 255 - v, 77).
            let v = value.wrapping_add(i as u8);
            let clip: Vec<u8> = (0..s.clip_len() / 3)
                .flat_map(|_| [v, 255 - v, 77])
                .collect();
            s.push(&clip, 0, 0);
        }
        s
    }

    #[test]
    fn filmstrip_and_gif_place_every_lane() {
        let dir = tempfile::tempdir().unwrap();
        let (real, gen) = (set(3, 5, 10), set(3, 5, 200));
        let lanes = [
            Lane {
                label: "real".into(),
                clips: &real,
            },
            Lane {
                label: "teacher".into(),
                clips: &gen,
            },
        ];
        let png = dir.path().join("strip.png");
        filmstrip(&lanes, 2, 3, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        // Both lanes' pixel values appear (scaled tiles), and labels drew dark text.
        let has = |v: u8| img.pixels().any(|p| p.0 == [v, 255 - v, 77]);
        assert!(has(10) && has(11) && has(200) && has(201));
        assert!(!has(12), "only 2 conditioning clips are shown");
        let g = dir.path().join("side.gif");
        gif(&lanes, 2, 8.0, &g).unwrap();
        let frames = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&g).unwrap(),
        ))
        .unwrap();
        use image::AnimationDecoder;
        assert_eq!(frames.into_frames().count(), 5);
        // Too few clips in a lane is a clear error.
        let short = set(1, 5, 0);
        let bad = [Lane {
            label: "short".into(),
            clips: &short,
        }];
        let e = filmstrip(&bad, 2, 3, &png).unwrap_err().to_string();
        assert!(e.contains("`short` has 1 clips"), "{e}");
    }
}
