//! The `file` sink: appends one JSON event per line and syncs the file
//! before the batch counts as delivered. A line cut short by a crash
//! mid-write (its batch was not acknowledged, so it comes again) is cut off
//! before the next append: the file only ever holds whole lines.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use super::{Delivery, Sink, SinkError};
use crate::event::Queued;

/// Appends events to a JSON-lines file.
pub struct FileSink {
    /// Sink name.
    name: String,
    /// The file; reopened per batch so that log rotation just works.
    path: PathBuf,
}

impl FileSink {
    /// A sink writing to `path` (created if missing).
    pub fn new(name: &str, path: PathBuf) -> Self {
        FileSink {
            name: name.to_owned(),
            path,
        }
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, events: &'a [Queued]) -> Delivery<'a> {
        let mut lines = Vec::new();
        for q in events {
            // Bodies are JSON text already; one per line.
            lines.extend_from_slice(q.record.body_json().to_string().as_bytes());
            lines.push(b'\n');
        }
        let path = self.path.clone();
        Box::pin(async move {
            let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut f = open_for_append(&path)?;
                cut_torn_tail(&mut f, &path)?;
                f.write_all(&lines)?;
                f.sync_data()
            })
            .await;
            match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SinkError::Retryable {
                    message: format!("writing {}: {e}", self.path.display()),
                    retry_after: None,
                }),
                Err(e) => Err(SinkError::Retryable {
                    message: format!("file writer task failed: {e}"),
                    retry_after: None,
                }),
            }
        })
    }
}

/// Opens (creating) the sink's file to append, and to read its tail.
fn open_for_append(path: &std::path::Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
}

/// Truncates `f` after its last newline when it does not end with one: the
/// rest is a line a crash cut short.
fn cut_torn_tail(f: &mut File, path: &std::path::Path) -> std::io::Result<()> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Look back for the last newline, a chunk at a time.
    let mut end = len;
    let mut keep = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(buf)?;
        if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
            keep = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    tracing::warn!(path = %path.display(), bytes = len - keep, "cut a line a crash left unfinished");
    f.set_len(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crash left half a line: it goes, whole lines stay, and the next
    /// append starts on a line of its own.
    #[test]
    fn a_torn_last_line_is_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let whole = "{\"a\":1}\n".repeat(10_000); // longer than one look-back chunk
        std::fs::write(&path, format!("{whole}{{\"torn\":")).unwrap();
        let mut f = open_for_append(&path).unwrap();
        cut_torn_tail(&mut f, &path).unwrap();
        f.write_all(b"{\"b\":2}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{whole}{{\"b\":2}}\n")
        );

        // The same handle: the file is rewritten in place.
        std::fs::write(&path, "no newline at all").unwrap();
        cut_torn_tail(&mut f, &path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        // Whole lines are left alone.
        std::fs::write(&path, "{}\n").unwrap();
        cut_torn_tail(&mut f, &path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
    }
}
