//! Human tables and `--json` output.

use serde_json::Value;

/// Print rows as aligned columns under a header.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// A field as display text ("-" when absent).
pub fn field(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Key: value lines for one record.
pub fn record(v: &Value) {
    if let Value::Object(map) = v {
        let w = map.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, val) in map {
            let text = match val {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{k:<w$}  {text}");
        }
    }
}
