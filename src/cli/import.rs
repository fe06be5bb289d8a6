//! `inletd import FILE`: streams a CSV or JSON-lines file to a running
//! daemon's batch endpoint and reports what was accepted, what was a
//! duplicate, and which lines were rejected and why.
//!
//! The file is read one record at a time; at most one batch is held in
//! memory. A line that does not parse here is reported without being sent;
//! an event the daemon rejects is mapped back from the answer's
//! `rejected[].index` to its line. Importing the same file again is safe:
//! the daemon answers every event it already has as a duplicate.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal as _, Read, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Map, Value};

use super::Outcome;
use super::client::{Answer, Client, ClientError, DaemonArgs};
use crate::config::Config;

/// Tries per batch while the daemon answers 429 or 503.
const MAX_TRIES: u32 = 8;
/// Wait before a retry when the daemon sent no `Retry-After`.
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// Longest single wait, whatever `Retry-After` says.
const MAX_RETRY: Duration = Duration::from_secs(60);
/// `{"events":[` + `]}` around the events of a batch body.
const ENVELOPE_BYTES: usize = 13;
/// The CSV columns of an import file.
const CSV_COLUMNS: [&str; 5] = [
    "event_id",
    "occurred_at",
    "user_id",
    "event_type",
    "properties_json",
];

/// `inletd import` flags.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
CSV files have the header `event_id,occurred_at,user_id,event_type,properties_json`
(any order; event_id and event_type are required columns). properties_json is a
JSON object in a quoted field, e.g. \"{\"\"page\"\": \"\"/home\"\"}\", or empty. Empty
fields are left out of the event. JSON-lines files hold one event object a line;
blank lines are skipped.

Exit status: 0 every event was accepted or a duplicate; 1 some lines were
rejected (each is named with its line number and why); 2 the import could not
run (file unreadable, daemon unreachable or refusing the batches).
Importing the same file again is safe: what was taken comes back as duplicates.")]
pub struct Args {
    /// The file to import: CSV (the header below) or JSON lines; `-` reads
    /// standard input (JSON lines unless --format csv).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Send to this configured source (POST /webhook/NAME/batch) instead of
    /// the default one (POST /webhook/batch); each source has its own
    /// idempotency scope.
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
    /// Events per batch request (a batch is also split to stay under the
    /// config's max_body_bytes, and halved if the daemon answers 413).
    #[arg(long, value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
    /// File format [default: csv for a .csv file, else jsonl].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<Format>,
    /// Where the daemon is.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// The formats `import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Comma-separated values with the header event_id,occurred_at,user_id,event_type,properties_json.
    Csv,
    /// One JSON event object per line.
    Jsonl,
}

impl Format {
    /// The format a file's name suggests: `.csv` is CSV, anything else JSON lines.
    pub fn of_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("csv") => Format::Csv,
            _ => Format::Jsonl,
        }
    }
}

/// Why an import could not run (exit 2). Rejected lines are not errors:
/// they are in the [`Report`].
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        error: io::Error,
    },
    /// The CSV header lacks a required column or has an unknown one.
    #[error("{path}: {reason}")]
    Header {
        /// The file.
        path: String,
        /// What is wrong with the header.
        reason: String,
    },
    /// `--source` is not a name a source can have.
    #[error("--source `{0}`: a source name is 1-64 of a-z, 0-9, - and _")]
    BadSource(String),
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon refused a batch as a whole (wrong source, bad signature, …).
    #[error("the daemon refused the batch with {status}: {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The daemon's `error: detail`.
        detail: String,
    },
    /// The daemon kept answering 429/503.
    #[error("the daemon still answered {status} after {tries} tries: {detail}")]
    GaveUp {
        /// The last status.
        status: u16,
        /// How many tries were made.
        tries: u32,
        /// The daemon's last `error: detail`.
        detail: String,
    },
    /// The report could not be written to stdout.
    #[error("writing the report: {0}")]
    Output(io::Error),
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Records read from the file (events and bad lines; blank lines not counted).
    pub records: u64,
    /// Events the daemon accepted (new).
    pub accepted: u64,
    /// Events the daemon already had (same id in the same source).
    pub duplicates: u64,
    /// Bad lines: line number in the file and why, in file order once finished.
    pub rejected: Vec<(u64, String)>,
    /// Events sent to the daemon so far (to tell how far a failed run got).
    pub sent: u64,
}

/// The `s` of a count's noun: "1 duplicate", "2 duplicates".
fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

impl Report {
    /// Prints the report: a summary line, then each rejected line.
    pub fn write(&self, out: &mut impl io::Write, input: &str) -> io::Result<()> {
        writeln!(
            out,
            "imported {input}: {} accepted, {} duplicate{}, {} rejected ({} record{} read)",
            self.accepted,
            self.duplicates,
            plural(self.duplicates),
            self.rejected.len(),
            self.records,
            plural(self.records)
        )?;
        if !self.rejected.is_empty() {
            writeln!(out, "rejected lines:")?;
            for (line, why) in &self.rejected {
                writeln!(out, "  line {line}: {why}")?;
            }
        }
        Ok(())
    }
}

/// Imports `args.file` into the daemon; prints the report on stdout.
pub async fn run(config: &Config, args: &Args) -> Result<Outcome, ImportError> {
    let client = Client::new(config, args.daemon.url.as_deref())?;
    let path = match &args.source {
        Some(name) if valid_source(name) => format!("/webhook/{name}/batch"),
        Some(name) => return Err(ImportError::BadSource(name.clone())),
        None => "/webhook/batch".to_owned(),
    };
    let format = args.format.unwrap_or_else(|| Format::of_path(&args.file));
    let (input, size, display): (Input, Option<u64>, String) = if args.file.as_os_str() == "-" {
        (Box::new(io::stdin()), None, "standard input".to_owned())
    } else {
        let display = args.file.display().to_string();
        let file = File::open(&args.file).map_err(|error| ImportError::Read {
            path: display.clone(),
            error,
        })?;
        let size = file.metadata().ok().map(|m| m.len());
        (Box::new(file), size, display)
    };
    let mut records = Records::open(input, format, &display)?;
    let progress = progress_bar(size);
    let mut importer = Importer {
        client: &client,
        path,
        max_events: args.batch_size as usize,
        max_body: config.max_body_bytes.max(ENVELOPE_BYTES + 2),
        batch: Batch::default(),
        report: Report::default(),
        progress: &progress,
    };
    let result = importer.feed(&mut records).await;
    progress.finish_and_clear();
    let mut report = importer.report;
    report.rejected.sort_by_key(|(line, _)| *line);
    let mut out = io::stdout().lock();
    if let Err(e) = result {
        if report.sent > 0 {
            let _ = report.write(&mut out, &display);
            let _ = writeln!(
                out,
                "import stopped early, after {} events were sent; running it again is safe \
                 (what was taken comes back as duplicates)",
                report.sent
            );
        }
        return Err(e);
    }
    report
        .write(&mut out, &display)
        .map_err(ImportError::Output)?;
    Ok(if report.rejected.is_empty() {
        Outcome::Clean
    } else {
        Outcome::Rejections
    })
}

/// A source name as the config allows it (it goes into the URL path as is).
fn valid_source(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A bar on stderr over the file's bytes; hidden when stderr is not a terminal.
fn progress_bar(size: Option<u64>) -> ProgressBar {
    let target = if io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(size, target);
    // A bar of its own width leaves room for the figures at 80 columns; a
    // stream of unknown length (stdin) shows what was read and how fast.
    let template = if size.is_some() {
        "{elapsed_precise} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}"
    } else {
        "{spinner} {elapsed_precise} {bytes} read, {bytes_per_sec} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// What `import` reads: a file, or standard input.
type Input = Box<dyn Read + Send>;

/// One record of the file: its (first) line and the event or why it is bad.
type Record = (u64, Result<Value, String>);

/// The file being read, record by record.
enum Records {
    /// A CSV file with its column layout.
    Csv(CsvRecords),
    /// A JSON-lines file.
    Jsonl(JsonlRecords),
}

impl Records {
    fn open(input: Input, format: Format, path: &str) -> Result<Records, ImportError> {
        Ok(match format {
            Format::Csv => Records::Csv(CsvRecords::open(input, path)?),
            Format::Jsonl => Records::Jsonl(JsonlRecords {
                reader: BufReader::new(input),
                line: 0,
                bytes: 0,
                buf: Vec::new(),
                path: path.to_owned(),
            }),
        })
    }

    /// The next record; `None` at the end of the file.
    fn next(&mut self, max_line: usize) -> Result<Option<Record>, ImportError> {
        match self {
            Records::Csv(r) => r.next(),
            Records::Jsonl(r) => r.next(max_line),
        }
    }

    /// Bytes of the file read so far (for the progress bar).
    fn bytes_read(&self) -> u64 {
        match self {
            Records::Csv(r) => r.reader.position().byte(),
            Records::Jsonl(r) => r.bytes,
        }
    }
}

/// A CSV import file.
struct CsvRecords {
    /// The csv reader (it tracks line numbers, quoted newlines included).
    reader: csv::Reader<Input>,
    /// For each column of the file, the CSV_COLUMNS name it holds.
    columns: Vec<&'static str>,
    /// Reused record buffer.
    record: csv::ByteRecord,
    /// The file name, for error messages.
    path: String,
}

impl CsvRecords {
    fn open(input: Input, path: &str) -> Result<CsvRecords, ImportError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(input);
        let header = |reason: String| ImportError::Header {
            path: path.to_owned(),
            reason,
        };
        let headers = reader.byte_headers().map_err(|e| match e.into_kind() {
            csv::ErrorKind::Io(error) => ImportError::Read {
                path: path.to_owned(),
                error,
            },
            other => header(format!("the header line is not CSV: {other:?}")),
        })?;
        let columns = csv_columns(headers).map_err(header)?;
        Ok(CsvRecords {
            reader,
            columns,
            record: csv::ByteRecord::new(),
            path: path.to_owned(),
        })
    }

    fn next(&mut self) -> Result<Option<Record>, ImportError> {
        match self.reader.read_byte_record(&mut self.record) {
            Ok(false) => Ok(None),
            Ok(true) => {
                let line = self.record.position().map_or(0, |p| p.line());
                Ok(Some((line, csv_event(&self.columns, &self.record))))
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                match e.into_kind() {
                    csv::ErrorKind::Io(error) => Err(ImportError::Read {
                        path: self.path.clone(),
                        error,
                    }),
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => Ok(Some((
                        line,
                        Err(format!("has {len} fields, the header has {expected_len}")),
                    ))),
                    other => Ok(Some((line, Err(format!("not CSV: {other:?}"))))),
                }
            }
        }
    }
}

/// Maps the header's names to CSV_COLUMNS; refuses unknown or repeated
/// names (a typo would silently drop a field) and a missing id or type.
fn csv_columns(headers: &csv::ByteRecord) -> Result<Vec<&'static str>, String> {
    if headers.is_empty() {
        return Err(format!(
            "the file is empty; a CSV import starts with the header {}",
            CSV_COLUMNS.join(",")
        ));
    }
    let mut columns = Vec::with_capacity(headers.len());
    for (i, raw) in headers.iter().enumerate() {
        let mut name = String::from_utf8_lossy(raw).trim().to_owned();
        if i == 0 {
            name = name.trim_start_matches('\u{feff}').to_owned();
        }
        let known = CSV_COLUMNS
            .iter()
            .find(|c| c.eq_ignore_ascii_case(&name))
            .ok_or_else(|| {
                format!(
                    "unknown column `{name}` in the header; expected {}",
                    CSV_COLUMNS.join(",")
                )
            })?;
        if columns.contains(known) {
            return Err(format!("column `{known}` appears twice in the header"));
        }
        columns.push(*known);
    }
    for required in ["event_id", "event_type"] {
        if !columns.contains(&required) {
            return Err(format!(
                "the header has no `{required}` column; expected {}",
                CSV_COLUMNS.join(",")
            ));
        }
    }
    Ok(columns)
}

/// One CSV row as an event: empty fields are left out, `properties_json`
/// becomes `properties`. The daemon judges the rest (types, timestamps).
fn csv_event(columns: &[&'static str], record: &csv::ByteRecord) -> Result<Value, String> {
    let mut event = Map::new();
    for (name, raw) in columns.iter().zip(record.iter()) {
        let text = std::str::from_utf8(raw).map_err(|_| format!("{name}: is not UTF-8"))?;
        if text.is_empty() {
            continue;
        }
        if *name == "properties_json" {
            let properties: Value = serde_json::from_str(text)
                .map_err(|e| format!("properties_json: is not JSON ({e})"))?;
            event.insert("properties".to_owned(), properties);
        } else {
            event.insert((*name).to_owned(), Value::String(text.to_owned()));
        }
    }
    Ok(Value::Object(event))
}

/// A JSON-lines file.
struct JsonlRecords {
    /// The buffered input.
    reader: BufReader<Input>,
    /// The number of the last line read (1-based).
    line: u64,
    /// Bytes read so far.
    bytes: u64,
    /// Reused line buffer.
    buf: Vec<u8>,
    /// The file name, for error messages.
    path: String,
}

impl JsonlRecords {
    /// The next non-blank line; one longer than `max_line` is reported, not held.
    fn next(&mut self, max_line: usize) -> Result<Option<Record>, ImportError> {
        loop {
            self.buf.clear();
            let (consumed, too_long) = read_line_capped(&mut self.reader, &mut self.buf, max_line)
                .map_err(|error| ImportError::Read {
                    path: self.path.clone(),
                    error,
                })?;
            if consumed == 0 {
                return Ok(None);
            }
            self.line += 1;
            self.bytes += consumed as u64;
            if too_long {
                return Ok(Some((
                    self.line,
                    Err(format!(
                        "is longer than the daemon takes in one request ({max_line} bytes)"
                    )),
                )));
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event = serde_json::from_slice(&self.buf).map_err(|e| format!("not JSON: {e}"));
            return Ok(Some((self.line, event)));
        }
    }
}

/// Reads up to and including the next `\n`, keeping at most `cap` bytes of
/// it in `buf` (without the line end). Returns the bytes consumed and
/// whether the line was longer than `cap`.
fn read_line_capped(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<(usize, bool)> {
    let mut consumed = 0;
    let mut too_long = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            break;
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if !too_long && buf.len() + chunk.len() <= cap {
            buf.extend_from_slice(chunk);
        } else {
            too_long = true;
            buf.clear();
        }
        let used = done.unwrap_or(available.len());
        reader.consume(used);
        consumed += used;
        if done.is_some() {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok((consumed, too_long))
}

/// Events waiting to be sent, with their lines.
#[derive(Debug, Default)]
struct Batch {
    /// Line of each event, by position in the batch.
    lines: Vec<u64>,
    /// Each event, already serialized.
    events: Vec<Vec<u8>>,
    /// Body size if sent now.
    body_bytes: usize,
}

impl Batch {
    fn from_parts(lines: Vec<u64>, events: Vec<Vec<u8>>) -> Batch {
        let body_bytes = body_size(&events);
        Batch {
            lines,
            events,
            body_bytes,
        }
    }

    /// `{"events":[…]}`.
    fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.body_bytes);
        body.extend_from_slice(b"{\"events\":[");
        for (i, event) in self.events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(event);
        }
        body.extend_from_slice(b"]}");
        body
    }

    /// Splits in two halves (for a 413).
    fn halve(self) -> (Batch, Batch) {
        let mid = self.events.len() / 2;
        let mut lines = self.lines;
        let mut events = self.events;
        let rest_lines = lines.split_off(mid);
        let rest_events = events.split_off(mid);
        (
            Batch::from_parts(lines, events),
            Batch::from_parts(rest_lines, rest_events),
        )
    }
}

/// The body size of a batch of these events.
fn body_size(events: &[Vec<u8>]) -> usize {
    ENVELOPE_BYTES + events.iter().map(Vec::len).sum::<usize>() + events.len().saturating_sub(1)
}

/// The state of one import run.
struct Importer<'a> {
    /// The daemon.
    client: &'a Client,
    /// The batch endpoint (default or `--source`).
    path: String,
    /// `--batch-size`.
    max_events: usize,
    /// Largest body to send (the config's `max_body_bytes`).
    max_body: usize,
    /// Events read but not sent yet.
    batch: Batch,
    /// Counts and bad lines so far.
    report: Report,
    /// The progress bar (hidden when stderr is not a terminal).
    progress: &'a ProgressBar,
}

impl Importer<'_> {
    /// Reads every record, sending full batches as it goes and the rest at the end.
    async fn feed(&mut self, records: &mut Records) -> Result<(), ImportError> {
        let max_line = self.max_body - ENVELOPE_BYTES;
        while let Some((line, event)) = records.next(max_line)? {
            self.report.records += 1;
            self.progress.set_position(records.bytes_read());
            let event = match event {
                Ok(event) => event,
                Err(why) => {
                    self.report.rejected.push((line, why));
                    self.update_message();
                    continue;
                }
            };
            let bytes = event.to_string().into_bytes();
            if ENVELOPE_BYTES + bytes.len() > self.max_body {
                self.report.rejected.push((
                    line,
                    format!(
                        "the event is {} bytes, more than the daemon takes in one request (max_body_bytes {})",
                        bytes.len(),
                        self.max_body
                    ),
                ));
                continue;
            }
            if !self.batch.events.is_empty()
                && self.batch.body_bytes + 1 + bytes.len() > self.max_body
            {
                self.flush().await?;
            }
            self.batch.body_bytes = if self.batch.events.is_empty() {
                ENVELOPE_BYTES + bytes.len()
            } else {
                self.batch.body_bytes + 1 + bytes.len()
            };
            self.batch.lines.push(line);
            self.batch.events.push(bytes);
            if self.batch.events.len() >= self.max_events {
                self.flush().await?;
            }
        }
        self.flush().await?;
        self.progress.set_position(records.bytes_read());
        Ok(())
    }

    /// Sends the pending batch, halving it on 413 and waiting out 429/503.
    async fn flush(&mut self) -> Result<(), ImportError> {
        let mut queue = VecDeque::from([std::mem::take(&mut self.batch)]);
        while let Some(batch) = queue.pop_front() {
            if batch.events.is_empty() {
                continue;
            }
            let answer = self.send(&batch).await?;
            if answer.status.is_success() {
                self.record_answer(&batch, &answer)?;
            } else if answer.status.as_u16() == 413 {
                if batch.events.len() > 1 {
                    let (first, second) = batch.halve();
                    queue.push_front(second);
                    queue.push_front(first);
                } else {
                    let line = batch.lines.first().copied().unwrap_or(0);
                    self.report.rejected.push((
                        line,
                        format!("too large for the daemon ({})", answer.error_text()),
                    ));
                }
            } else {
                return Err(ImportError::Refused {
                    status: answer.status.as_u16(),
                    detail: answer.error_text(),
                });
            }
            self.update_message();
        }
        Ok(())
    }

    /// POSTs one batch, retrying while the daemon answers 429 or 503.
    async fn send(&self, batch: &Batch) -> Result<Answer, ImportError> {
        let body = batch.body();
        let mut tries = 0;
        loop {
            tries += 1;
            let answer = self.client.post_json(&self.path, body.clone()).await?;
            let busy = matches!(answer.status.as_u16(), 429 | 503);
            if !busy {
                return Ok(answer);
            }
            if tries >= MAX_TRIES {
                return Err(ImportError::GaveUp {
                    status: answer.status.as_u16(),
                    tries,
                    detail: answer.error_text(),
                });
            }
            let wait = answer.retry_after.unwrap_or(DEFAULT_RETRY).min(MAX_RETRY);
            self.note(&format!(
                "the daemon answered {} ({}); retrying in {}s (try {} of {MAX_TRIES})",
                answer.status.as_u16(),
                answer.error_text(),
                wait.as_secs(),
                tries + 1
            ));
            tokio::time::sleep(wait).await;
        }
    }

    /// Adds a batch answer to the report, mapping rejections to lines.
    fn record_answer(&mut self, batch: &Batch, answer: &Answer) -> Result<(), ImportError> {
        let body = answer.json()?;
        let count = |field: &str| {
            body[field]
                .as_u64()
                .ok_or_else(|| answer.bad(format!("no `{field}` count in {body}")))
        };
        self.report.accepted += count("accepted")?;
        self.report.duplicates += count("duplicates")?;
        self.report.sent += batch.events.len() as u64;
        // Another instance of a deployment was storing the same keys: they
        // end up stored once either way, and an import run again settles it.
        let in_progress = body["in_progress"].as_u64().unwrap_or(0);
        if in_progress > 0 {
            self.note(&format!(
                "{in_progress} events were being stored by another instance at the same time; \
                 import the file again to have them confirmed"
            ));
        }
        let rejected = match &body["rejected"] {
            Value::Array(items) => items.as_slice(),
            Value::Null => &[],
            other => {
                return Err(answer
                    .bad(format!("`rejected` is not a list: {other}"))
                    .into());
            }
        };
        for item in rejected {
            let line = item["index"]
                .as_u64()
                .and_then(|i| batch.lines.get(usize::try_from(i).ok()?))
                .ok_or_else(|| {
                    answer.bad(format!(
                        "rejection {item} names no event of the {} sent",
                        batch.events.len()
                    ))
                })?;
            self.report.rejected.push((*line, rejection_reason(item)));
        }
        Ok(())
    }

    fn update_message(&self) {
        self.progress.set_message(format!(
            "{} accepted, {} duplicate{}, {} rejected",
            self.report.accepted,
            self.report.duplicates,
            plural(self.report.duplicates),
            self.report.rejected.len()
        ));
    }

    /// A note for the user: above the bar, or on stderr when there is no bar.
    fn note(&self, text: &str) {
        if self.progress.is_hidden() {
            eprintln!("inletd import: {text}");
        } else {
            self.progress.println(text);
        }
    }
}

/// `field: detail` of one `rejected[]` entry of a batch answer.
fn rejection_reason(item: &Value) -> String {
    let detail = item["detail"]
        .as_str()
        .or_else(|| item["error"].as_str())
        .unwrap_or("rejected");
    match item["field"].as_str() {
        Some(field) if !field.is_empty() => format!("{field}: {detail}"),
        _ => detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &[&str]) -> csv::ByteRecord {
        csv::ByteRecord::from(fields.to_vec())
    }

    #[test]
    fn the_format_follows_the_extension() {
        assert_eq!(Format::of_path(Path::new("a/b.CSV")), Format::Csv);
        assert_eq!(Format::of_path(Path::new("b.jsonl")), Format::Jsonl);
        assert_eq!(Format::of_path(Path::new("b")), Format::Jsonl);
    }

    #[test]
    fn a_csv_row_becomes_an_event_without_its_empty_fields() {
        let columns = csv_columns(&record(&CSV_COLUMNS)).expect("header");
        let event = csv_event(
            &columns,
            &record(&[
                "e1",
                "2024-01-15T10:30:00Z",
                "",
                "page_view",
                r#"{"page": "/home"}"#,
            ]),
        );
        assert_eq!(
            event,
            Ok(serde_json::json!({
                "event_id": "e1", "occurred_at": "2024-01-15T10:30:00Z",
                "event_type": "page_view", "properties": {"page": "/home"}
            }))
        );
        let bad = csv_event(&columns, &record(&["e2", "", "", "t", "{nope"]));
        assert!(bad.is_err_and(|e| e.starts_with("properties_json: is not JSON")));
    }

    #[test]
    fn a_header_with_a_typo_is_refused() {
        assert!(csv_columns(&record(&["event_id", "occured_at", "event_type"])).is_err());
        assert!(csv_columns(&record(&["event_id", "user_id"])).is_err());
        assert!(csv_columns(&record(&["event_id", "event_id", "event_type"])).is_err());
        assert_eq!(
            csv_columns(&record(&["\u{feff}event_type", " event_id "])),
            Ok(vec!["event_type", "event_id"])
        );
    }

    #[test]
    fn long_lines_are_skipped_not_held() {
        let mut input = io::Cursor::new(b"short\r\nlong line here\nlast".to_vec());
        let mut buf = Vec::new();
        assert_eq!(
            read_line_capped(&mut input, &mut buf, 8).ok(),
            Some((7, false))
        );
        assert_eq!(buf, b"short");
        buf.clear();
        assert_eq!(
            read_line_capped(&mut input, &mut buf, 8).ok(),
            Some((15, true))
        );
        assert!(buf.is_empty());
        assert_eq!(
            read_line_capped(&mut input, &mut buf, 8).ok(),
            Some((4, false))
        );
        assert_eq!(buf, b"last");
        buf.clear();
        assert_eq!(
            read_line_capped(&mut input, &mut buf, 8).ok(),
            Some((0, false))
        );
    }

    #[test]
    fn a_batch_body_is_the_events_envelope_and_halves_keep_their_lines() {
        let batch = Batch::from_parts(
            vec![2, 3, 5],
            vec![b"{\"a\":1}".to_vec(), b"{}".to_vec(), b"{}".to_vec()],
        );
        let body = batch.body();
        assert_eq!(body, br#"{"events":[{"a":1},{},{}]}"#);
        assert_eq!(body.len(), batch.body_bytes);
        let (first, second) = batch.halve();
        assert_eq!((first.lines, second.lines), (vec![2], vec![3, 5]));
    }

    #[test]
    fn rejections_read_as_field_and_detail() {
        let item = serde_json::json!({"index": 0, "error": "schema_violation",
            "field": "event_type", "detail": "is required"});
        assert_eq!(rejection_reason(&item), "event_type: is required");
        let item = serde_json::json!({"index": 0, "field": "", "detail": "an event must be a JSON object"});
        assert_eq!(rejection_reason(&item), "an event must be a JSON object");
    }

    #[test]
    fn source_names_follow_the_config_rule() {
        assert!(valid_source("stripe_2"));
        assert!(!valid_source("a/b"));
        assert!(!valid_source(""));
        assert!(!valid_source("Stripe"));
    }

    #[test]
    fn the_report_says_one_record_and_one_duplicate_in_the_singular() {
        let report = |records, duplicates| {
            let mut out = Vec::new();
            Report {
                records,
                accepted: records - duplicates,
                duplicates,
                ..Report::default()
            }
            .write(&mut out, "a.csv")
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            report(1, 1),
            "imported a.csv: 0 accepted, 1 duplicate, 0 rejected (1 record read)\n"
        );
        assert_eq!(
            report(3, 2),
            "imported a.csv: 1 accepted, 2 duplicates, 0 rejected (3 records read)\n"
        );
    }
}
