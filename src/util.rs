//! Small helpers shared by the store, the cache and the stages: atomic writes, hashing, time.

use crate::error::{IoContext, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// Write a file so that a reader (or a process killed mid-write) sees either the old content
/// or the new one, never a torn file: temp file in the same folder, fsync, rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).at(dir)?;
    let tmp = temp_path(path);
    {
        let mut f = std::fs::File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
    }
    std::fs::rename(&tmp, path).at(path)?;
    Ok(())
}

/// The temporary file beside `path` that an atomic write fills before its rename:
/// `.NAME.tmp-PID`.
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Whether a file name is a temporary file left behind by a killed writer: one of
/// [`temp_path`]'s (`.NAME.tmp-PID`), or the `tempfile` crate's default `.tmpXXXXXX` (six
/// random alphanumerics), which `safetensors::serialize_to_file` (under candle's `save`) fills
/// beside its target before the rename.
pub fn is_temp_name(name: &str) -> bool {
    let ours = name.starts_with('.') && name.contains(".tmp-");
    let tempfile_crate = name
        .strip_prefix(".tmp")
        .is_some_and(|r| r.len() == 6 && r.bytes().all(|b| b.is_ascii_alphanumeric()));
    ours || tempfile_crate
}

/// Remove the temporary files that killed writers left anywhere under `dir` (a stage folder
/// that the caller holds the lease of, so no live writer owns them).
pub fn remove_stale_temps(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let e = e.at(dir)?;
        let p = e.path();
        if e.file_type().at(&p)?.is_dir() {
            remove_stale_temps(&p)?;
        } else if e.file_name().to_str().is_some_and(is_temp_name) {
            std::fs::remove_file(&p).at(&p)?;
        }
    }
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).at(path)?;
    Ok(hex::encode(h.finalize()))
}

/// Seconds since the Unix epoch, as stored in the run store.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether a process of this host is alive (used to expire leases of killed runners early).
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Canonical TOML text of a value: tables with sorted keys, so equal content hashes equal.
pub fn canonical_toml(v: &toml::Value) -> String {
    fn sort(v: &toml::Value) -> toml::Value {
        match v {
            toml::Value::Table(t) => {
                let mut keys: Vec<_> = t.keys().collect();
                keys.sort();
                let mut out = toml::Table::new();
                for k in keys {
                    out.insert(k.clone(), sort(&t[k]));
                }
                toml::Value::Table(out)
            }
            toml::Value::Array(a) => toml::Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    match sort(v) {
        toml::Value::Table(t) => toml::to_string(&t).unwrap_or_default(),
        other => other.to_string(),
    }
}

/// Short display form of a TOML value for names and tables (`32`, `pan`, `[1, 2]`).
pub fn short_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A test hook that kills this process with SIGKILL at a named point, as a crash or a
/// `kill -9` would, so tests can check that every write sequence survives an interruption
/// between any two of its writes.
///
/// `ONESTEP_FAILPOINT=NAME@STAGE:STEP[,...]` fires when stage `STAGE` (`*`: any) reaches point
/// `NAME` while writing step `STEP` (`*`: any step). With `ONESTEP_FAILPOINT_ONCE=DIR` each
/// (stage, point, step) fires once: a marker file in `DIR` records that it did, so a rerun
/// with the same environment gets past it. Unset, this costs one environment lookup.
pub fn failpoint(name: &str, stage: &str, step: u64) {
    let Ok(spec) = std::env::var("ONESTEP_FAILPOINT") else {
        return;
    };
    let hit = spec.split(',').any(|f| {
        let (point, at) = f.trim().split_once('@').unwrap_or((f.trim(), "*:*"));
        let (s, k) = at.split_once(':').unwrap_or((at, "*"));
        point == name && (s == "*" || s == stage) && (k == "*" || k == step.to_string())
    });
    if !hit {
        return;
    }
    if let Ok(dir) = std::env::var("ONESTEP_FAILPOINT_ONCE") {
        let marker = Path::new(&dir).join(format!("{stage}-{name}-{step}"));
        if marker.exists() {
            return;
        }
        let _ = std::fs::create_dir_all(&dir);
        if std::fs::write(&marker, b"").is_err() {
            return;
        }
    }
    eprintln!("failpoint {name} (stage {stage}, step {step}): killing the process");
    // SAFETY: getpid and kill have no preconditions; SIGKILL ends the process here.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// Format seconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc_time(t: Option<f64>) -> String {
    let Some(t) = t else { return "-".into() };
    let secs = t as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_of_both_writers_are_recognised_and_nothing_else() {
        let ours = temp_path(Path::new("/x/vae/config.json"));
        assert!(is_temp_name(ours.file_name().unwrap().to_str().unwrap()));
        // The `tempfile` crate's default name, as safetensors' serialize_to_file leaves it.
        let d = tempfile::tempdir().unwrap();
        let t = tempfile::NamedTempFile::new_in(d.path()).unwrap();
        assert!(is_temp_name(
            t.path().file_name().unwrap().to_str().unwrap()
        ));
        for name in [
            "config.json",
            "diffusion_pytorch_model.safetensors",
            ".tmp",
            ".tmpfile.json",
            "tmpabcdef",
            ".tmpab-def",
        ] {
            assert!(!is_temp_name(name), "{name}");
        }
        // A killed writer's files go, the real ones stay, in subfolders too.
        let sub = d.path().join("vae");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(".tmpVbhe2e"), b"torn").unwrap();
        std::fs::write(sub.join("config.json"), b"{}").unwrap();
        std::fs::write(temp_path(&d.path().join("checkpoint.safetensors")), b"torn").unwrap();
        drop(t);
        remove_stale_temps(d.path()).unwrap();
        let mut left: Vec<_> = walk_names(d.path());
        left.sort();
        assert_eq!(left, ["vae", "vae/config.json"]);
    }

    fn walk_names(root: &Path) -> Vec<String> {
        let mut out = vec![];
        for e in std::fs::read_dir(root).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                for n in walk_names(&p) {
                    out.push(format!("{}/{n}", p.file_name().unwrap().to_str().unwrap()));
                }
            }
        }
        out
    }
}
