//! Writes events to a Redis stream, for the `redis-stream` sink.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::MirrorError;

/// A connection that XADDs to one stream.
pub struct StreamWriter {
    /// Reconnects by itself.
    conn: ConnectionManager,
    /// The stream's key.
    stream: String,
    /// `MAXLEN ~` for every XADD; `None`: the stream is never trimmed.
    maxlen: Option<u64>,
    /// Longest wait for one batch's XADDs.
    timeout: Duration,
}

/// One stream entry: its field-value pairs.
pub type Entry = Vec<(&'static str, String)>;

impl StreamWriter {
    /// A writer to `stream` on the Redis at `url`; it connects on first use.
    pub fn new(
        url: &str,
        stream: &str,
        maxlen: Option<u64>,
        timeout: Duration,
    ) -> Result<StreamWriter, MirrorError> {
        let conn = super::connection(url, timeout)?;
        Ok(StreamWriter {
            conn,
            stream: stream.to_owned(),
            maxlen,
            timeout,
        })
    }

    /// Adds every entry, in order, in one pipelined round trip.
    pub async fn add(&self, entries: &[Entry]) -> Result<(), MirrorError> {
        let mut pipe = redis::pipe();
        for entry in entries {
            let xadd = pipe.cmd("XADD").arg(&self.stream);
            if let Some(n) = self.maxlen {
                xadd.arg("MAXLEN").arg("~").arg(n);
            }
            xadd.arg("*");
            for (field, value) in entry {
                xadd.arg(*field).arg(value);
            }
            xadd.ignore();
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(MirrorError::Redis(e.to_string())),
            Err(_) => Err(MirrorError::Timeout(self.timeout.as_millis() as u64)),
        }
    }
}
