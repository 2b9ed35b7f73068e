//! Sweeps beyond one process (issue 17): `run --jobs N` and Slurm job arrays (`submit`,
//! `status`, `collect`) must leave the store a local sequential run of the same spec leaves.
//!
//! The Slurm test brings up a real single-node Slurm with tools/slurm/local-cluster.sh (Debian's
//! slurm-wlm and munge; `.ci/run` installs them). Where Slurm cannot start, it says why on
//! stderr and checks the scripts against the real `sbatch` option parser when one is installed.

use rusqlite::Connection;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const SPEC: &str = "tests/fixtures/good/cluster.toml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn assets() -> PathBuf {
    std::env::var_os("ONESTEP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("results/assets"))
}

fn onestep_env(results: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_onestep"));
    c.current_dir(root())
        .env_remove("ONESTEP_RESULTS")
        .env_remove("ONESTEP_STORE")
        .env_remove("ONESTEP_INTERRUPT_AT")
        .arg("--results")
        .arg(results)
        .arg("--assets")
        .arg(assets())
        .args(["--progress", "lines"])
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run onestep")
}

fn onestep(results: &Path, args: &[&str]) -> Output {
    onestep_env(results, args, &[])
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    t
}

/// What a store says about an experiment, without row ids and times: runs, params, stages,
/// run x stage links, metrics (timings zeroed), artifacts and attempt outcomes, each row keyed
/// by the (variant, seed) of its run.
fn contents(store: &Path, attempts: bool) -> BTreeMap<&'static str, Vec<String>> {
    let c = Connection::open(store).unwrap();
    let q = |sql: &str| -> Vec<String> {
        let mut st = c.prepare(sql).unwrap();
        let n = st.column_count();
        let mut rows: Vec<String> = st
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join(" | "))
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        rows.sort();
        rows
    };
    let mut m = BTreeMap::new();
    m.insert(
        "runs",
        q("SELECT variant, seed, spec_hash, config, status, error FROM runs"),
    );
    m.insert(
        "params",
        q("SELECT r.variant, r.seed, p.key, p.value FROM params p JOIN runs r ON r.id = p.run_id"),
    );
    m.insert("stages", q("SELECT hash, kind, name, params, code_version, status, error, lease_holder FROM stages"));
    m.insert("run_stages", q("SELECT r.variant, r.seed, rs.position, rs.stage_name, rs.stage_hash FROM run_stages rs JOIN runs r ON r.id = rs.run_id"));
    m.insert("metrics", q("SELECT m.stage_hash, m.key, m.step, CASE WHEN m.key LIKE '%seconds%' THEN 0 ELSE m.value END, r.variant, r.seed FROM metrics m LEFT JOIN runs r ON r.id = m.run_id"));
    m.insert("artifacts", q("SELECT a.stage_hash, a.path, a.kind, a.sha256, a.bytes, r.variant, r.seed FROM artifacts a LEFT JOIN runs r ON r.id = a.run_id"));
    if attempts {
        m.insert("attempts", q("SELECT a.stage_hash, a.outcome, a.resumed_from, r.variant, r.seed FROM stage_attempts a LEFT JOIN runs r ON r.id = a.run_id"));
    }
    m
}

fn assert_same(a: &Path, b: &Path, attempts: bool) {
    let (x, y) = (contents(a, attempts), contents(b, attempts));
    for (k, rows) in &x {
        assert!(
            !rows.is_empty() || *k == "attempts",
            "{k}: no rows in {}",
            a.display()
        );
        assert_eq!(
            rows,
            &y[k],
            "{k} differ between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// The reference: a sequential local run of the spec.
fn local_run(dir: &Path, set: &[&str]) -> PathBuf {
    let results = dir.join("local");
    let mut args = vec!["run", SPEC];
    args.extend(set.iter().flat_map(|s| ["--set", s]));
    ok(onestep(&results, &args));
    results.join("onestep.sqlite")
}

fn hashes(status: &str, state: &str) -> Vec<String> {
    status
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(state))
        .map(|l| l.split_whitespace().nth(2).unwrap().to_string())
        .collect()
}

#[test]
fn jobs_run_matches_a_sequential_run_and_collect_refuses_bad_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = local_run(tmp.path(), &[]);

    let results = tmp.path().join("jobs");
    let out = ok(onestep(&results, &["run", SPEC, "--jobs", "2"]));
    assert_eq!(out.matches("[jobs] start ").count(), 9, "{out}");
    assert_eq!(out.matches("[jobs] finished ").count(), 9, "{out}");
    assert!(out.contains("4 runs: 4 finished"), "{out}");
    // Two independent autoencoders (one per seed) ran side by side.
    let first = out.find("start vae").unwrap();
    let second = first + 1 + out[first + 1..].find("start vae").unwrap();
    assert!(second < out.find("finished vae").unwrap(), "{out}");
    let store = results.join("onestep.sqlite");
    assert_same(&reference, &store, true);
    let status = ok(onestep(&results, &["status", SPEC]));
    assert!(status.trim_end().ends_with("9 done"), "{status}");

    // A failing node: the other runs go on, the failure is named with its cause.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let failing = tmp.path().join("failing.toml");
    let spec = std::fs::read_to_string(root().join("tests/fixtures/good/failing.toml"))
        .unwrap()
        .replace("PLACEHOLDER", empty.to_str().unwrap());
    std::fs::write(&failing, spec).unwrap();
    let o = onestep(
        &tmp.path().join("failing"),
        &["run", failing.to_str().unwrap(), "--jobs", "2"],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("[jobs] FAILED data (data)") && t.contains("[jobs] finished data (data)"),
        "{t}"
    );
    assert!(
        t.contains("1 finished, 1 failed") && t.contains("no video files"),
        "{t}"
    );

    // A node alone: refused before its upstream stages are finished, named by a prefix.
    let fresh = tmp.path().join("fresh");
    let plan = ok(onestep(&fresh, &["plan", SPEC]));
    let teacher = plan
        .lines()
        .find(|l| l.trim_start().starts_with("teacher"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap()
        .to_string();
    let o = onestep(&fresh, &["run", SPEC, "--node", &teacher]);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("needs stage `vae`") && t.contains("run that node first"),
        "{t}"
    );
    let o = onestep(&fresh, &["run", SPEC, "--node", "0123456789ab"]);
    assert!(
        text(&o).contains("no stage of experiment `cluster`"),
        "{}",
        text(&o)
    );

    // Shards: a corrupt file is reported and left; collecting twice changes nothing.
    let shards = tmp.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let data = plan
        .lines()
        .find(|l| l.trim_start().starts_with("data"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap();
    let full = std::fs::read_dir(results.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|h| h.starts_with(data))
        .unwrap();
    std::fs::write(shards.join(format!("{full}.sqlite")), b"not a database").unwrap();
    let before = contents(&store, true);
    let out = ok(onestep(
        &results,
        &["collect", SPEC, "--shards", shards.to_str().unwrap()],
    ));
    assert!(
        out.contains("unreadable") && out.contains("left for a retry"),
        "{out}"
    );
    assert!(out.contains("0 merged, 1 left"), "{out}");
    assert_eq!(before, contents(&store, true));
}

/// Bring up the local single-node Slurm and run one trivial job through it; Err(reason) where
/// that cannot happen on this machine.
fn slurm_up() -> Result<(), String> {
    let o = Command::new("bash")
        .arg(root().join("tools/slurm/local-cluster.sh"))
        .arg("start")
        .output()
        .map_err(|e| format!("bash: {e}"))?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
    }
    let o = Command::new("sbatch")
        .args(["--parsable", "--output=/dev/null", "--wrap", "true"])
        .output()
        .map_err(|e| format!("sbatch: {e}"))?;
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if !o.status.success() || id.is_empty() {
        return Err(format!(
            "sbatch of a trivial job failed: {}",
            text(&o).trim()
        ));
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(90) {
        let q = Command::new("squeue")
            .args(["-h", "--states=all", "-j", &id, "-o", "%T"])
            .output()
            .map_err(|e| format!("squeue: {e}"))?;
        let state = String::from_utf8_lossy(&q.stdout).trim().to_string();
        match state.as_str() {
            "COMPLETED" => return Ok(()),
            "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING" | "" => {}
            other => return Err(format!("a trivial job ended {other}")),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err("a trivial job did not finish in 90 s".into())
}

fn has(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every job of the experiment's submissions has left the queue.
fn wait_for_queue(results: &Path) {
    let subs = std::fs::read_to_string(results.join("cluster/cluster/submissions.jsonl")).unwrap();
    let ids: Vec<String> = subs
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["job_id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let t0 = Instant::now();
    loop {
        let o = Command::new("squeue")
            .args(["-h", "-j", &ids.join(","), "-o", "%i %T"])
            .output()
            .unwrap();
        let q = String::from_utf8_lossy(&o.stdout).to_string();
        if !o.status.success() || q.trim().is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "Slurm jobs still queued after 15 min:\n{q}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn slurm_arrays_match_a_local_run_resubmit_only_what_stopped_and_collect_idempotently() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("slurm");
    // Checkpoint every step, so the teacher interrupted at step 1 resumes from it (not part of
    // any stage's identity; the local reference carries the same override).
    let set = "stages.teacher.checkpoint_every=1";

    // The scripts, against the real sbatch option parser where sbatch is installed.
    let dry = ok(onestep(
        &results,
        &[
            "submit",
            SPEC,
            "--set",
            set,
            "--slurm",
            "--dry-run",
            "--time",
            "10:00",
            "--array-limit",
            "2",
            "--sbatch=--nice=0",
        ],
    ));
    assert!(
        dry.contains("in 4 waves") && dry.contains("dry run: nothing submitted"),
        "{dry}"
    );
    assert!(
        dry.contains("--dependency=afterok:<job of wave 2>"),
        "{dry}"
    );
    assert!(!results.join("cluster/cluster/submissions.jsonl").exists());
    let up = slurm_up();
    if has("sbatch") {
        for w in 0..4 {
            let script = results.join(format!("cluster/cluster/wave-{w}.sbatch"));
            let o = Command::new("sbatch")
                .arg("--test-only")
                .arg(&script)
                .output()
                .unwrap();
            let t = text(&o);
            for bad in ["unrecognized option", "invalid", "Invalid", "unknown"] {
                assert!(!t.contains(bad), "sbatch rejects {}: {t}", script.display());
            }
            if up.is_ok() {
                assert!(
                    o.status.success(),
                    "sbatch --test-only {}: {t}",
                    script.display()
                );
            }
        }
    }
    if let Err(why) = up {
        eprintln!("SKIPPED the Slurm part of this test: Slurm cannot run on this machine: {why}");
        return;
    }

    // First submission: both teachers stop at step 1 (as a preempted or timed-out task would),
    // so their wave fails and the students' wave is cancelled.
    let out = ok(onestep_env(
        &results,
        &["submit", SPEC, "--set", set, "--slurm", "--time", "10:00"],
        &[("ONESTEP_INTERRUPT_AT", "teacher:1")],
    ));
    assert!(out.contains("wave 3: job"), "{out}");
    wait_for_queue(&results);
    let status = ok(onestep(&results, &["status", SPEC, "--set", set]));
    assert_eq!(hashes(&status, "done").len(), 3, "{status}");
    let stopped = hashes(&status, "stopped");
    assert_eq!(stopped.len(), 2, "{status}");
    assert!(status.contains("resubmit to resume"), "{status}");
    let out = ok(onestep(&results, &["collect", SPEC, "--set", set]));
    assert!(out.contains("3 merged, 2 left"), "{out}");
    assert!(
        out.contains("incomplete (stage interrupted), left for a retry"),
        "{out}"
    );
    assert!(out.contains("0 finished, 4 queued"), "{out}");

    // Resubmission: only the stopped teachers and what needs them, resuming from checkpoints.
    let out = ok(onestep(
        &results,
        &["submit", SPEC, "--set", set, "--slurm", "--time", "10:00"],
    ));
    assert!(
        out.contains("6 of 9 stages to compute, in 2 waves"),
        "{out}"
    );
    wait_for_queue(&results);
    let out = ok(onestep(&results, &["collect", SPEC, "--set", set]));
    assert!(
        out.contains("9 merged, 0 left") && out.contains("4 finished"),
        "{out}"
    );
    let store = results.join("onestep.sqlite");
    let reference = local_run(tmp.path(), &[set]);
    assert_same(&reference, &store, false);
    // Every stage ran once, but the teachers: stopped, then resumed from the checkpoint.
    let c = Connection::open(&store).unwrap();
    let attempts: Vec<(String, String, Option<i64>)> = c
        .prepare("SELECT s.name, a.outcome, a.resumed_from FROM stage_attempts a JOIN stages s ON s.hash = a.stage_hash ORDER BY a.stage_hash, a.started_at")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(attempts.len(), 11, "{attempts:?}");
    let teacher: Vec<_> = attempts.iter().filter(|a| a.0 == "teacher").collect();
    assert_eq!(teacher.len(), 4, "{attempts:?}");
    assert!(teacher.iter().filter(|a| a.1 == "interrupted").count() == 2);
    assert!(
        teacher.iter().any(|a| a.1 == "finished" && a.2 == Some(1)),
        "{attempts:?}"
    );

    // Collecting again changes nothing; status reads it all back.
    let dump = |p: &Path| contents(p, true);
    let before = dump(&store);
    ok(onestep(&results, &["collect", SPEC, "--set", set]));
    assert_eq!(before, dump(&store));
    let status = ok(onestep(&results, &["status", SPEC, "--set", set]));
    assert!(status.trim_end().ends_with("9 done"), "{status}");
    assert!(!status.contains("not collected"), "{status}");
    let report = ok(onestep(&results, &["runs", "--experiment", "cluster"]));
    assert_eq!(report.matches("finished").count(), 4, "{report}");
}
