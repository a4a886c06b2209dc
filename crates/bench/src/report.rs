//! The results: a flat JSON object of named figures (`bench/results.json`) and a table of
//! the same figures beside their baselines (`bench/results.md`, also printed).

use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value};

/// Figures collected so far.
#[derive(Default)]
pub struct Report {
    figures: Map<String, Value>,
    rows: Vec<[String; 4]>,
}

/// A figure rounded for reading (three significant decimals at most).
fn rounded(value: f64) -> f64 {
    let scale = if value.abs() >= 100.0 { 10.0 } else { 1_000.0 };
    (value * scale).round() / scale
}

impl Report {
    /// Records `key` = `value` in the JSON.
    pub fn figure(&mut self, key: &str, value: f64) {
        self.figures
            .insert(key.to_owned(), Value::from(rounded(value)));
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.get(key).and_then(Value::as_f64)
    }

    /// Records a setting or fact (not a figure) in the JSON.
    pub fn fact(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.to_owned(), value.into());
    }

    /// A table row: what was measured, xmirror's figure, the baseline it is compared with,
    /// and the ratio or target.
    pub fn row(&mut self, measure: &str, ours: String, baseline: String, ratio: String) {
        println!("  {measure}: {ours} | {baseline} | {ratio}");
        self.rows.push([measure.to_owned(), ours, baseline, ratio]);
    }

    pub fn table(&self) -> String {
        let mut table = String::from("| measure | xmirror | baseline | ratio / target |\n");
        table.push_str("|---|---|---|---|\n");
        for [measure, ours, baseline, ratio] in &self.rows {
            table.push_str(&format!("| {measure} | {ours} | {baseline} | {ratio} |\n"));
        }
        table
    }

    /// Writes `results.json` and `results.md` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let json = serde_json::to_string_pretty(&self.figures)?;
        std::fs::write(dir.join("results.json"), json + "\n")?;
        std::fs::write(dir.join("results.md"), self.table())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_round_and_rows_render() {
        let mut report = Report::default();
        report.figure("snapshot_1m_s", 1.234_567);
        report.figure("store_keys_s", 187_654.321);
        assert_eq!(report.get("snapshot_1m_s"), Some(1.235));
        assert_eq!(report.get("store_keys_s"), Some(187_654.3));
        report.row("snapshot", "1 s".into(), "2 s".into(), "0.5".into());
        assert!(report.table().ends_with("| snapshot | 1 s | 2 s | 0.5 |\n"));
        let dir = tempfile::tempdir().unwrap();
        report.write(dir.path()).unwrap();
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("results.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(json["snapshot_1m_s"], 1.235);
    }
}
