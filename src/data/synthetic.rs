//! Procedural synthetic video, deterministic from a seed: textured sprites moving and bouncing
//! over textured backgrounds, and camera pans over a still. Clip `i` of a set depends only on
//! `(seed, i)`, so a set can be generated in any order, resumed, or grown.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Motion {
    /// Textured sprites bouncing over a textured background.
    Sprites,
    /// A camera panning over a larger still.
    Pan,
    /// Each clip picks sprites or pan at random.
    Mixed,
}

/// The random generator for clip `index` of the set made from `seed`.
pub fn clip_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(index);
    r
}

/// A smooth random colour field: a few oriented sinusoidal gratings with random colours, 0.5 to
/// 3 cycles across the frame with amplitude falling as 1/frequency (like natural images, most
/// energy is at low spatial frequencies, so a 4x-downsampling autoencoder can represent it).
struct Texture {
    base: [f32; 3],
    waves: Vec<([f32; 2], f32, [f32; 3])>,
}

impl Texture {
    fn random(rng: &mut ChaCha8Rng, scale: f32) -> Self {
        let base = [
            rng.random_range(0.2..0.8),
            rng.random_range(0.2..0.8),
            rng.random_range(0.2..0.8),
        ];
        let waves = (0..4)
            .map(|_| {
                let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
                let cycles: f32 = rng.random_range(0.5..3.0);
                let freq = cycles * std::f32::consts::TAU / scale;
                let a = 0.25 / cycles.max(1.0);
                let amp = [
                    rng.random_range(-a..a),
                    rng.random_range(-a..a),
                    rng.random_range(-a..a),
                ];
                (
                    [angle.cos() * freq, angle.sin() * freq],
                    rng.random_range(0.0..std::f32::consts::TAU),
                    amp,
                )
            })
            .collect();
        Texture { base, waves }
    }

    fn at(&self, x: f32, y: f32) -> [f32; 3] {
        let mut c = self.base;
        for (k, phase, amp) in &self.waves {
            let s = (k[0] * x + k[1] * y + phase).sin();
            for i in 0..3 {
                c[i] += amp[i] * s;
            }
        }
        c
    }
}

#[derive(Clone, Copy)]
enum Shape {
    Disc,
    Square,
    Diamond,
}

struct Sprite {
    shape: Shape,
    radius: f32,
    pos: [f32; 2],
    vel: [f32; 2],
    color: [f32; 3],
    stripes: f32,
}

fn to_u8(c: f32) -> u8 {
    (c.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// Render clip `index` of the set `(seed, motion)`: `frames * size * size * 3` bytes, HWC.
pub fn render_clip(
    seed: u64,
    index: u64,
    motion: Motion,
    frames: usize,
    size: usize,
    max_sprites: usize,
) -> Vec<u8> {
    let mut rng = clip_rng(seed, index);
    let kind = match motion {
        Motion::Mixed => {
            if rng.random_bool(0.5) {
                Motion::Sprites
            } else {
                Motion::Pan
            }
        }
        m => m,
    };
    match kind {
        Motion::Pan => render_pan(&mut rng, frames, size),
        _ => render_sprites(&mut rng, frames, size, max_sprites.max(1)),
    }
}

fn render_sprites(rng: &mut ChaCha8Rng, frames: usize, size: usize, max_sprites: usize) -> Vec<u8> {
    let s = size as f32;
    let bg = Texture::random(rng, s);
    let n = rng.random_range(1..=max_sprites);
    let mut sprites: Vec<Sprite> = (0..n)
        .map(|_| {
            let radius = rng.random_range(0.08..0.2) * s;
            let speed = rng.random_range(0.02..0.08) * s;
            let dir: f32 = rng.random_range(0.0..std::f32::consts::TAU);
            Sprite {
                shape: match rng.random_range(0..3) {
                    0 => Shape::Disc,
                    1 => Shape::Square,
                    _ => Shape::Diamond,
                },
                radius,
                pos: [
                    rng.random_range(radius..s - radius),
                    rng.random_range(radius..s - radius),
                ],
                vel: [dir.cos() * speed, dir.sin() * speed],
                color: [
                    rng.random_range(0.0..1.0),
                    rng.random_range(0.0..1.0),
                    rng.random_range(0.0..1.0),
                ],
                stripes: rng.random_range(0.15..0.5),
            }
        })
        .collect();
    let mut out = vec![0u8; frames * size * size * 3];
    let mut background = vec![[0f32; 3]; size * size];
    for y in 0..size {
        for x in 0..size {
            background[y * size + x] = bg.at(x as f32, y as f32);
        }
    }
    for f in 0..frames {
        let frame = &mut out[f * size * size * 3..(f + 1) * size * size * 3];
        for y in 0..size {
            for x in 0..size {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let mut c = background[y * size + x];
                for sp in &sprites {
                    let (dx, dy) = (px - sp.pos[0], py - sp.pos[1]);
                    let inside = match sp.shape {
                        Shape::Disc => dx * dx + dy * dy <= sp.radius * sp.radius,
                        Shape::Square => dx.abs() <= sp.radius && dy.abs() <= sp.radius,
                        Shape::Diamond => dx.abs() + dy.abs() <= sp.radius * 1.3,
                    };
                    if inside {
                        let shade = 0.75 + 0.25 * ((dx + dy) * sp.stripes).sin();
                        c = [
                            sp.color[0] * shade,
                            sp.color[1] * shade,
                            sp.color[2] * shade,
                        ];
                    }
                }
                let o = (y * size + x) * 3;
                frame[o] = to_u8(c[0]);
                frame[o + 1] = to_u8(c[1]);
                frame[o + 2] = to_u8(c[2]);
            }
        }
        for sp in &mut sprites {
            for a in 0..2 {
                sp.pos[a] += sp.vel[a];
                if sp.pos[a] < sp.radius {
                    sp.pos[a] = 2.0 * sp.radius - sp.pos[a];
                    sp.vel[a] = -sp.vel[a];
                } else if sp.pos[a] > s - sp.radius {
                    sp.pos[a] = 2.0 * (s - sp.radius) - sp.pos[a];
                    sp.vel[a] = -sp.vel[a];
                }
            }
        }
    }
    out
}

fn render_pan(rng: &mut ChaCha8Rng, frames: usize, size: usize) -> Vec<u8> {
    let s = size as f32;
    let world = 2.5 * s;
    let tex = Texture::random(rng, s);
    // A few blobs so the still has landmarks, not just gratings.
    let blobs: Vec<([f32; 2], f32, [f32; 3])> = (0..6)
        .map(|_| {
            (
                [rng.random_range(0.0..world), rng.random_range(0.0..world)],
                rng.random_range(0.05..0.15) * s,
                [
                    rng.random_range(0.0..1.0),
                    rng.random_range(0.0..1.0),
                    rng.random_range(0.0..1.0),
                ],
            )
        })
        .collect();
    let speed = rng.random_range(0.02..0.06) * s;
    let dir: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let vel = [dir.cos() * speed, dir.sin() * speed];
    let span = world - s;
    let mut cam = [rng.random_range(0.0..span), rng.random_range(0.0..span)];
    let mut v = vel;
    let mut out = vec![0u8; frames * size * size * 3];
    for f in 0..frames {
        let frame = &mut out[f * size * size * 3..(f + 1) * size * size * 3];
        for y in 0..size {
            for x in 0..size {
                let (wx, wy) = (cam[0] + x as f32 + 0.5, cam[1] + y as f32 + 0.5);
                let mut c = tex.at(wx, wy);
                for (p, r, col) in &blobs {
                    let d2 = (wx - p[0]).powi(2) + (wy - p[1]).powi(2);
                    let a = (-d2 / (r * r)).exp();
                    for i in 0..3 {
                        c[i] = c[i] * (1.0 - a) + col[i] * a;
                    }
                }
                let o = (y * size + x) * 3;
                frame[o] = to_u8(c[0]);
                frame[o + 1] = to_u8(c[1]);
                frame[o + 2] = to_u8(c[2]);
            }
        }
        for a in 0..2 {
            cam[a] += v[a];
            if cam[a] < 0.0 || cam[a] > span {
                v[a] = -v[a];
                cam[a] = cam[a].clamp(0.0, span);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_are_deterministic_per_index_and_they_move() {
        for motion in [Motion::Sprites, Motion::Pan] {
            let a = render_clip(7, 3, motion, 6, 24, 3);
            assert_eq!(a, render_clip(7, 3, motion, 6, 24, 3));
            assert_ne!(a, render_clip(7, 4, motion, 6, 24, 3));
            assert_ne!(a, render_clip(8, 3, motion, 6, 24, 3));
            let frame = 24 * 24 * 3;
            let diff: u64 = a[..frame]
                .iter()
                .zip(&a[5 * frame..])
                .map(|(&x, &y)| (x as i64 - y as i64).unsigned_abs())
                .sum();
            assert!(diff > 0, "{motion:?} clip does not move");
        }
    }
}
