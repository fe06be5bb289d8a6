//! The `file` sink: appends one JSON event per line and syncs the file
//! before the batch counts as delivered.

use std::io::Write;
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
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
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
