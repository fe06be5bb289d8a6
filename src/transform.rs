//! What the Processor adds to each event before the sinks and the
//! analytics see it: columns from enrichment tables (`[[enrichment]]`, a
//! CSV file keyed by one column, as Vector's enrichment tables) and derived
//! fields (`[[derive]]`, one arithmetic step over two operands).
//!
//! The queue keeps each event as it came: an event is enriched when it is
//! processed, with the tables then in force (a DLQ entry keeps what its
//! sink was sent, and is enriched again when replayed). Tables are read with the configuration, at start and on SIGHUP;
//! a table that does not read keeps the configuration, and so the old
//! table, in force, and the error names its line.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{DeriveConfig, EnrichmentConfig, Operand};

/// An enrichment table: key → the row's other columns as JSON values.
pub type Table = HashMap<String, Map<String, Value>>;

/// Reads a CSV table with a header row, keyed by `key_column`. Cells that
/// read as numbers become numbers; empty cells are left out. A missing key
/// column, a row of the wrong width, an empty or repeated key is an error
/// naming the line.
pub fn load_table(path: &Path, key_column: &str) -> Result<Table, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| format!("line 1: {e}"))?
        .clone();
    let Some(key_at) = headers.iter().position(|h| h == key_column) else {
        return Err(format!(
            "line 1: no column `{key_column}` (the header has: {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        ));
    };
    let mut table = Table::new();
    let mut first_line: HashMap<String, u64> = HashMap::new();
    for row in reader.records() {
        let row = row.map_err(|e| match e.position() {
            Some(p) => format!("line {}: {e}", p.line()),
            None => e.to_string(),
        })?;
        let line = row.position().map_or(0, |p| p.line());
        let key = row.get(key_at).unwrap_or_default().to_owned();
        if key.is_empty() {
            return Err(format!("line {line}: the `{key_column}` cell is empty"));
        }
        if let Some(first) = first_line.insert(key.clone(), line) {
            return Err(format!(
                "line {line}: the key `{key}` is given twice (first on line {first})"
            ));
        }
        let columns: Map<String, Value> = headers
            .iter()
            .zip(row.iter())
            .enumerate()
            .filter(|(i, (_, cell))| *i != key_at && !cell.is_empty())
            .map(|(_, (name, cell))| (name.to_owned(), cell_value(cell)))
            .collect();
        table.insert(key, columns);
    }
    Ok(table)
}

/// A CSV cell as JSON: a number when it is written as one plainly (`300`,
/// `-4`, `12.5`, `0.25`), else text, so that `00501`, `+15551234` or a
/// 20-digit id stay as written.
fn cell_value(cell: &str) -> Value {
    let digits = cell.strip_prefix('-').unwrap_or(cell);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let plain = !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && (whole == "0" || !whole.starts_with('0'))
        && fraction.bytes().all(|b| b.is_ascii_digit())
        // A dot has digits after it.
        && (fraction.is_empty() != digits.contains('.'));
    if plain {
        if fraction.is_empty()
            && let Ok(i) = cell.parse::<i64>()
        {
            return Value::from(i);
        }
        if !fraction.is_empty()
            && let Ok(x) = cell.parse::<f64>()
            && x.is_finite()
        {
            return Value::from(x);
        }
    }
    Value::from(cell)
}

/// Adds the configured enrichment and derived fields to an event body
/// (JSON text); answers the new text, or `None` when there is nothing to
/// add (no transforms, or a body that is not a JSON object).
pub fn apply(
    body: &str,
    enrichment: &[EnrichmentConfig],
    derive: &[DeriveConfig],
) -> Option<String> {
    if enrichment.is_empty() && derive.is_empty() {
        return None;
    }
    let mut event: Value = serde_json::from_str(body).ok()?;
    if !event.is_object() {
        return None;
    }
    for table in enrichment {
        let key = match get(&event, &table.r#match) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(v @ Value::Number(_)) => Some(v.to_string()),
            _ => None,
        };
        let row = key.and_then(|k| table.rows.get(&k));
        // `enriched` is inletd's: what a sender put there is replaced, and
        // a table without a match leaves nothing under its name.
        if !event["enriched"].is_object() {
            event["enriched"] = Value::Object(Map::new());
        }
        let enriched = &mut event["enriched"];
        match row {
            Some(row) => enriched[table.name.as_str()] = Value::Object(row.clone()),
            None => {
                if let Some(object) = enriched.as_object_mut() {
                    object.remove(&table.name);
                }
            }
        }
    }
    if event["enriched"].as_object().is_some_and(Map::is_empty)
        && let Some(object) = event.as_object_mut()
    {
        object.remove("enriched");
    }
    for d in derive {
        let value = d
            .operation()
            .map(|(op, [a, b])| compute(op, number(&event, a), number(&event, b)))
            .unwrap_or(Value::Null);
        set(&mut event, &d.field, value);
    }
    serde_json::to_string(&event).ok()
}

/// The value at a dotted path.
fn get<'a>(event: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(event, |v, part| v.get(part))
}

/// An operand's number: a literal, or the number at its path.
fn number(event: &Value, operand: &Operand) -> Option<f64> {
    match operand {
        Operand::Number(x) => Some(*x),
        Operand::Field(path) => get(event, path)?.as_f64(),
    }
}

/// `a op b` as JSON: null when an operand is missing or not a number, or
/// the result is not a finite number (a division by zero).
fn compute(op: &str, a: Option<f64>, b: Option<f64>) -> Value {
    let (Some(a), Some(b)) = (a, b) else {
        return Value::Null;
    };
    let x = match op {
        "divide" => a / b,
        "multiply" => a * b,
        "add" => a + b,
        _ => a - b,
    };
    if !x.is_finite() {
        return Value::Null;
    }
    if x.fract() == 0.0 && x.abs() < 9e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// Sets the value at a dotted path, making the objects on the way. A path
/// through a value that is not an object is left alone: the event's own
/// data on the way is not replaced (the field itself is).
fn set(event: &mut Value, path: &str, value: Value) {
    let mut at = event;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let Some(object) = at.as_object_mut() else {
            return;
        };
        if parts.peek().is_none() {
            object.insert(part.to_owned(), value);
            return;
        }
        at = object
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// Loads every configured table into its config; errors name the table,
/// its file and the line.
pub fn load_tables(enrichment: &mut [EnrichmentConfig]) -> Result<(), Vec<String>> {
    let mut bad = Vec::new();
    for (i, table) in enrichment.iter_mut().enumerate() {
        match load_table(&table.file, &table.key_column) {
            Ok(rows) => table.rows = Arc::new(rows),
            Err(e) => bad.push(format!(
                "enrichment[{i}].file {}: {e}",
                table.file.display()
            )),
        }
    }
    if bad.is_empty() { Ok(()) } else { Err(bad) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EnrichmentConfig;

    fn table(dir: &Path, text: &str) -> Result<Table, String> {
        let path = dir.join("t.csv");
        std::fs::write(&path, text).unwrap();
        load_table(&path, "id")
    }

    #[test]
    fn a_table_reads_numbers_as_numbers_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(
            dir.path(),
            "id,type,length_seconds\nc1,video,300\nc2,article,12.5\nc3,,\n",
        )
        .unwrap();
        assert_eq!(
            Value::Object(t["c1"].clone()),
            serde_json::json!({"type": "video", "length_seconds": 300})
        );
        assert_eq!(t["c2"]["length_seconds"], 12.5);
        assert!(t["c3"].is_empty());
        let twice = table(dir.path(), "id,x\na,1\nb,2\na,3\n").unwrap_err();
        assert!(
            twice.starts_with("line 4:") && twice.contains("first on line 2"),
            "{twice}"
        );
        let short = table(dir.path(), "id,x\na,1\nb\n").unwrap_err();
        assert!(short.starts_with("line 3:"), "{short}");
        let no_key = table(dir.path(), "name,x\na,1\n").unwrap_err();
        assert!(no_key.contains("no column `id`"), "{no_key}");
    }

    #[test]
    fn cells_become_numbers_only_when_written_plainly_as_one() {
        for (cell, value) in [
            ("300", serde_json::json!(300)),
            ("-4", serde_json::json!(-4)),
            ("12.5", serde_json::json!(12.5)),
            ("0.25", serde_json::json!(0.25)),
            ("00501", serde_json::json!("00501")),
            ("+15551234", serde_json::json!("+15551234")),
            (
                "12345678901234567890",
                serde_json::json!("12345678901234567890"),
            ),
            ("1e5", serde_json::json!("1e5")),
            ("12.", serde_json::json!("12.")),
            (".5", serde_json::json!(".5")),
            ("NaN", serde_json::json!("NaN")),
        ] {
            assert_eq!(cell_value(cell), value, "{cell}");
        }
    }

    #[test]
    fn a_sender_cannot_fake_or_block_enrichment() {
        let table = EnrichmentConfig {
            name: "content".into(),
            file: "unused".into(),
            key_column: "id".into(),
            r#match: "properties.content_id".into(),
            rows: Arc::new(
                [("c1".to_owned(), serde_json::json!({"type": "video"}))]
                    .into_iter()
                    .map(|(k, v)| (k, v.as_object().cloned().unwrap_or_default()))
                    .collect(),
            ),
        };
        let enrich = |body: serde_json::Value| -> serde_json::Value {
            let text = apply(&body.to_string(), std::slice::from_ref(&table), &[]).unwrap();
            serde_json::from_str(&text).unwrap()
        };
        let faked = enrich(serde_json::json!({
            "properties": {"content_id": "c9"}, "enriched": {"content": {"type": "fake"}}
        }));
        assert!(faked.get("enriched").is_none(), "{faked}");
        let blocked =
            enrich(serde_json::json!({"properties": {"content_id": "c1"}, "enriched": 1}));
        assert_eq!(
            blocked["enriched"],
            serde_json::json!({"content": {"type": "video"}})
        );
    }

    #[test]
    fn derived_fields_are_null_when_an_operand_is_missing() {
        assert_eq!(compute("divide", Some(90_000.0), Some(1000.0)), 90);
        assert_eq!(compute("divide", Some(1.0), Some(4.0)), 0.25);
        assert_eq!(compute("divide", Some(1.0), Some(0.0)), Value::Null);
        assert_eq!(compute("subtract", None, Some(1.0)), Value::Null);
        let mut event = serde_json::json!({"a": 1, "x": 5});
        set(&mut event, "derived.y.z", Value::from(2));
        set(&mut event, "x.w", Value::from(3));
        assert_eq!(
            event,
            serde_json::json!({"a": 1, "x": 5, "derived": {"y": {"z": 2}}})
        );
    }
}
