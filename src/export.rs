//! Export the run store as CSV or Parquet tables through polars: `runs` (one row per run with
//! its final metrics as columns), `params`, `metrics` (every logged value) and `artifacts`.

use crate::error::{Error, Result};
use crate::store::Store;
use polars::prelude::*;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Table {
    Runs,
    Params,
    Metrics,
    Artifacts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Parquet,
}

fn pe(e: PolarsError) -> Error {
    Error::Other(format!("export: {e}"))
}

fn query_strings(
    store: &Store,
    sql: &str,
    experiment: Option<&str>,
    ncols: usize,
) -> Result<Vec<Vec<Option<String>>>> {
    let conn = store.conn();
    let mut st = conn
        .prepare(sql)
        .map_err(|e| Error::Other(format!("export query: {e}")))?;
    let rows = st
        .query_map([experiment], |r| {
            (0..ncols)
                .map(|i| {
                    let v: rusqlite::types::Value = r.get(i)?;
                    Ok(match v {
                        rusqlite::types::Value::Null => None,
                        rusqlite::types::Value::Integer(i) => Some(i.to_string()),
                        rusqlite::types::Value::Real(f) => Some(f.to_string()),
                        rusqlite::types::Value::Text(t) => Some(t),
                        rusqlite::types::Value::Blob(_) => None,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| Error::Other(format!("export query: {e}")))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Other(format!("export query: {e}")))
}

/// Build a polars frame of one store table (filtered by experiment name when given).
pub fn frame(store: &Store, table: Table, experiment: Option<&str>) -> Result<DataFrame> {
    let filter = "(?1 IS NULL OR e.name = ?1)";
    match table {
        Table::Metrics => {
            let sql = format!(
                "SELECT e.name, r.id, r.variant, r.seed, rs.stage_name, m.key, m.step, m.value, m.wall_time
                 FROM metrics m JOIN run_stages rs ON rs.stage_hash = m.stage_hash JOIN runs r ON r.id = rs.run_id
                 JOIN experiments e ON e.id = r.experiment_id WHERE {filter} ORDER BY r.id, rs.position, m.key, m.step"
            );
            let conn = store.conn();
            let mut st = conn
                .prepare(&sql)
                .map_err(|e| Error::Other(format!("export query: {e}")))?;
            let mut cols: (
                Vec<String>,
                Vec<i64>,
                Vec<String>,
                Vec<i64>,
                Vec<String>,
                Vec<String>,
                Vec<i64>,
                Vec<f64>,
                Vec<f64>,
            ) = Default::default();
            let mut rows = st
                .query([experiment])
                .map_err(|e| Error::Other(format!("export query: {e}")))?;
            while let Some(r) = rows
                .next()
                .map_err(|e| Error::Other(format!("export query: {e}")))?
            {
                let g = |e: rusqlite::Error| Error::Other(format!("export query: {e}"));
                cols.0.push(r.get(0).map_err(g)?);
                cols.1.push(r.get(1).map_err(g)?);
                cols.2.push(r.get(2).map_err(g)?);
                cols.3.push(r.get(3).map_err(g)?);
                cols.4.push(r.get(4).map_err(g)?);
                cols.5.push(r.get(5).map_err(g)?);
                cols.6.push(r.get(6).map_err(g)?);
                cols.7.push(r.get(7).map_err(g)?);
                cols.8.push(r.get(8).map_err(g)?);
            }
            DataFrame::new(vec![
                Column::new("experiment".into(), cols.0),
                Column::new("run_id".into(), cols.1),
                Column::new("variant".into(), cols.2),
                Column::new("seed".into(), cols.3),
                Column::new("stage".into(), cols.4),
                Column::new("key".into(), cols.5),
                Column::new("step".into(), cols.6),
                Column::new("value".into(), cols.7),
                Column::new("wall_time".into(), cols.8),
            ])
            .map_err(pe)
        }
        Table::Params => {
            let sql = format!(
                "SELECT e.name, r.id, r.variant, r.seed, p.key, p.value FROM params p JOIN runs r ON r.id = p.run_id
                 JOIN experiments e ON e.id = r.experiment_id WHERE {filter} ORDER BY r.id, p.key"
            );
            string_frame(
                store,
                &sql,
                experiment,
                &["experiment", "run_id", "variant", "seed", "key", "value"],
            )
        }
        Table::Artifacts => {
            let sql = format!(
                "SELECT e.name, r.id, rs.stage_name, a.path, a.kind, a.sha256, a.bytes FROM artifacts a
                 JOIN run_stages rs ON rs.stage_hash = a.stage_hash JOIN runs r ON r.id = rs.run_id
                 JOIN experiments e ON e.id = r.experiment_id WHERE {filter} ORDER BY r.id, a.path"
            );
            string_frame(
                store,
                &sql,
                experiment,
                &[
                    "experiment",
                    "run_id",
                    "stage",
                    "path",
                    "kind",
                    "sha256",
                    "bytes",
                ],
            )
        }
        Table::Runs => {
            let sql = format!(
                "SELECT e.name, r.id, r.variant, r.seed, r.status, r.spec_hash, r.started_at, r.ended_at, r.git_commit, r.git_dirty, r.host, r.device, r.error
                 FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE {filter} ORDER BY r.id"
            );
            let names = [
                "experiment",
                "run_id",
                "variant",
                "seed",
                "status",
                "spec_hash",
                "started_at",
                "ended_at",
                "git_commit",
                "git_dirty",
                "host",
                "device",
                "error",
            ];
            let mut df = string_frame(store, &sql, experiment, &names)?;
            // One column per final metric, `stage/key`, so a table of results is one export.
            let ids: Vec<i64> = store
                .runs(experiment, None, &[])?
                .iter()
                .map(|r| r.id)
                .collect();
            let mut metric_cols: std::collections::BTreeMap<String, Vec<Option<f64>>> =
                Default::default();
            for (row, id) in ids.iter().enumerate() {
                for (stage, key, _, value) in store.final_metrics(*id)? {
                    let col = metric_cols
                        .entry(format!("{stage}/{key}"))
                        .or_insert_with(|| vec![None; ids.len()]);
                    col[row] = Some(value);
                }
            }
            for (name, values) in metric_cols {
                df.with_column(Column::new(name.into(), values))
                    .map_err(pe)?;
            }
            Ok(df)
        }
    }
}

fn string_frame(
    store: &Store,
    sql: &str,
    experiment: Option<&str>,
    names: &[&str],
) -> Result<DataFrame> {
    let rows = query_strings(store, sql, experiment, names.len())?;
    let cols = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Column::new(
                (*n).into(),
                rows.iter()
                    .map(|r| r[i].clone())
                    .collect::<Vec<Option<String>>>(),
            )
        })
        .collect();
    DataFrame::new(cols).map_err(pe)
}

pub fn write(df: &mut DataFrame, format: Format, out: &Path) -> Result<()> {
    let tmp = out.with_extension("tmp-export");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    match format {
        Format::Csv => CsvWriter::new(&mut f).finish(df).map_err(pe)?,
        Format::Parquet => {
            ParquetWriter::new(&mut f).finish(df).map_err(pe)?;
        }
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
}
