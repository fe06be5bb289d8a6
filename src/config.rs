//! Configuration: embedded defaults, overlaid by a TOML file, then by
//! `INLETD_<KEY>` environment variables, then by command-line flags. This is
//! the one place that reads files and the environment for settings.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::signature::{Scheme, Verifier};

/// Errors loading or validating the configuration; each names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config is not valid: {0}")]
    Parse(String),
    #[error("config is not valid:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// When a write counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// 202 only after the group's flush and sync to disk returned.
    Fsync,
    /// 202 after the write; flushed and synced every `flush_interval_ms`.
    Interval,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON under systemd (journald), text at a terminal.
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line (journald, log shippers).
    Json,
}

/// At most this many `sum_fields`, and this many `[[windows]]`.
pub const MAX_SUM_FIELDS: usize = 16;

/// Top-level fields a derived field may not write: the ones inletd reads
/// of each event, and enrichment's own.
const RESERVED_FIELDS: [&str; 7] = [
    "event_id",
    "event_type",
    "user_id",
    "session_id",
    "timestamp",
    "occurred_at",
    "enriched",
];

/// The longest user-defined window, in minutes: a day.
pub const MAX_WINDOW_MINUTES: u32 = 1440;
/// Most days `[redis] shared_days` may share: a year of months, widened to
/// whole months.
pub const MAX_SHARED_DAYS: u64 = 400;

/// Whether `path` is a dotted path (`properties.amount`): non-empty parts.
fn valid_path(path: &str) -> bool {
    !path.is_empty() && path.len() <= 256 && !path.split('.').any(str::is_empty)
}

/// Everything the daemon can be told. Every key has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on (port 0 picks a free port).
    pub bind: String,
    /// Directory of the sled store (WAL, keys, counters, DLQ).
    pub data_dir: PathBuf,
    /// When a 202 may be sent: after an fsync (default) or before it.
    pub durability: Durability,
    /// Background flush period for `durability = "interval"`: the loss window.
    pub flush_interval_ms: u64,
    /// Events per micro-batch handed to the sinks.
    pub batch_size: usize,
    /// Longest wait before a partial batch is processed.
    pub batch_timeout_ms: u64,
    /// Retries per sink and batch before events go to the DLQ.
    pub max_retries: u32,
    /// First retry delay; doubles each attempt, with jitter.
    pub retry_base_ms: u64,
    /// Longest single retry delay (also caps a sink's Retry-After).
    pub retry_max_ms: u64,
    /// Consecutive failed batches after which a sink is isolated.
    pub breaker_failures: u32,
    /// How long an isolated sink is skipped before it is tried again.
    pub breaker_cooldown_ms: u64,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl_hours: u64,
    /// Longest the drain may take on SIGTERM (keep under systemd's TimeoutStopSec).
    pub drain_timeout_secs: u64,
    /// Largest request body taken (413 above).
    pub max_body_bytes: usize,
    /// Most events in one batch request (413 above).
    pub max_batch_events: usize,
    /// Queue high-water mark: intake answers 503 above it.
    pub max_queue_events: u64,
    /// Queue high-water mark in bytes of stored records; 0: no byte limit.
    pub max_queue_bytes: u64,
    /// Bearer token for /admin; empty: admin answers loopback callers only.
    #[serde(serialize_with = "masked")]
    pub admin_token: String,
    /// Bearer token for /stats (the admin token also works); empty: /stats
    /// answers anyone who can reach `bind`.
    #[serde(serialize_with = "masked")]
    pub stats_token: String,
    /// Log format: text or json.
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `inletd=debug`.
    pub log_level: String,
    /// sled's page cache in MiB: pages read or written stay in memory up to
    /// this (inletd's own hot data, the key index and the analytics sets,
    /// is kept outside it).
    pub cache_capacity_mb: u64,
    /// Seconds a client has to send its request headers.
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request's body (408 after).
    pub request_timeout_secs: u64,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Actor restarts tolerated per minute before the daemon exits non-zero
    /// (and systemd restarts it).
    pub max_restarts_per_minute: usize,
    /// Seconds a storage write (a group commit, a batch's ack) may take
    /// before the daemon logs what hung and exits non-zero, for systemd to
    /// restart it: a store that stopped answering is never waited on forever.
    pub store_stall_secs: u64,
    /// Numeric fields (dotted paths such as `properties.amount`) summed per
    /// day and event type, for `/stats/trends?sum=` and top events by sum.
    pub sum_fields: Vec<String>,
    /// User-defined rolling windows, for `GET /stats/windows/{name}`.
    pub windows: Vec<WindowConfig>,
    /// Tables whose columns processed events gain (`enriched.<name>`).
    pub enrichment: Vec<EnrichmentConfig>,
    /// Fields computed on each processed event, after enrichment.
    pub derive: Vec<DeriveConfig>,
    /// Named sources with their own idempotency scope and rate limit.
    pub sources: Vec<SourceConfig>,
    /// Where processed batches are forwarded.
    pub sinks: Vec<SinkConfig>,
    /// Redis, shared by the instances of one deployment (off while its
    /// `url` is empty).
    pub redis: RedisConfig,
    /// Things worth a warning found while loading (e.g. a secret file
    /// readable by others); logged at start.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// Where this config came from, so that SIGHUP can read it again.
    #[serde(skip)]
    pub origin: Origin,
}

/// How a config was loaded: the file and the command-line overrides.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Origin {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// `(key, value)` pairs from flags.
    pub overrides: Vec<(String, String)>,
}

/// A named intake: `/webhook/{name}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Path segment and idempotency scope.
    pub name: String,
    /// Signature scheme: none, standard-webhooks, github or stripe.
    #[serde(default)]
    pub verify: Scheme,
    /// The signing secret (or use `secret_file`); never printed.
    #[serde(default, skip_serializing)]
    pub secret: Option<String>,
    /// A file holding the signing secret (read at start and on reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Token-bucket rate limit in requests per second; absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_sec: Option<f64>,
}

impl SourceConfig {
    /// The source's signature verifier (`None` when it verifies nothing).
    pub fn verifier(&self) -> Option<Verifier> {
        Verifier::new(self.verify, self.secret.as_deref().unwrap_or_default())
            .ok()
            .flatten()
    }
}

/// `[redis]`: the Redis that the instances of one deployment share, for
/// idempotency keys and deployment-wide figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` or `rediss://` (TLS); empty:
    /// Redis is off and the instance stands alone.
    #[serde(serialize_with = "masked_url")]
    pub url: String,
    /// Put before every key inletd writes, so deployments can share a Redis.
    pub key_prefix: String,
    /// This instance's name, unique in the deployment; empty: the host name.
    pub instance: String,
    /// Longest wait for one Redis call; past it intake goes on without Redis.
    pub timeout_ms: u64,
    /// How long a key claimed by a group commit that has not answered yet
    /// holds off other instances (a crash before the commit frees it then).
    pub claim_lease_ms: u64,
    /// How often this instance publishes its figures and retries a Redis
    /// that was unreachable.
    pub publish_interval_ms: u64,
    /// Keys accepted while Redis was unreachable, kept to be written to it
    /// once it is back; past this the oldest are dropped (and counted).
    pub backlog_max_keys: usize,
    /// A day's distinct users (and a minute's users or sessions, for
    /// `/stats/windows`) are counted exactly (a Redis set) up to this many;
    /// past it, by HyperLogLog (12 KiB each, about 0.8 % off), and the
    /// answer says `"exact": false`.
    pub dau_exact_max: u64,
    /// An instance silent this long (no publish round reached Redis) has
    /// the events it acknowledged and left queued delivered by another.
    pub takeover_after_ms: u64,
    /// How many days back (today included) instances share their counts,
    /// sums and users: DAU, top events, trends and retention over ranges
    /// inside them answer for the deployment. Redis keeps each of those
    /// days' users (per event type too), so its memory grows with it.
    pub shared_days: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            key_prefix: "inletd:".into(),
            instance: String::new(),
            timeout_ms: 250,
            claim_lease_ms: 30_000,
            publish_interval_ms: 1000,
            backlog_max_keys: 200_000,
            dau_exact_max: 100_000,
            takeover_after_ms: 10_000,
            shared_days: 31,
        }
    }
}

impl RedisConfig {
    /// Redis is on.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// The instance name: `instance`, else the host name.
    pub fn instance_name(&self) -> String {
        if !self.instance.is_empty() {
            return self.instance.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "inletd".to_owned())
    }
}

/// A Redis URL with its password shown as `***`.
pub fn redacted_redis_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() + 3 => {
            let userinfo = &rest[..at - scheme.len() - 3];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***{}", &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn masked_url<S: serde::Serializer>(value: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redacted_redis_url(value))
}

fn valid_redis_url(url: &str) -> bool {
    (url.starts_with("redis://") || url.starts_with("rediss://"))
        && url.split_once("://").is_some_and(|(_, rest)| {
            let host = rest.rsplit('@').next().unwrap_or_default();
            !host.is_empty() && !host.starts_with('/')
        })
}

/// Kinds of sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// POST `{"events":[…]}` to `url`.
    Http,
    /// Append one JSON event per line to `path`.
    File,
    /// XADD each event to the Redis stream `stream`.
    #[serde(rename = "redis-stream")]
    RedisStream,
}

/// A user-defined rolling window (`[[windows]]`): events of the last
/// `minutes`, grouped by a field, counted and optionally summed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Its name, in `GET /stats/windows/{name}`.
    pub name: String,
    /// How far back from now it reaches, in minutes (1 to 1440).
    pub minutes: u32,
    /// Only events of these types; empty: every type.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// The dotted path whose value names an event's group; events without
    /// one (or with an object or array there) are not counted.
    pub group_by: String,
    /// A dotted path summed per group; groups are then ranked by the sum.
    #[serde(default)]
    pub sum: Option<String>,
}

/// An enrichment table (`[[enrichment]]`): each processed event whose
/// `match` value is a key of the table gains `enriched.<name>.<column>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentConfig {
    /// Its name: the events gain `enriched.<name>`.
    pub name: String,
    /// A CSV file with a header row, one row per key; read at start and on
    /// SIGHUP.
    pub file: PathBuf,
    /// The column that holds the keys.
    pub key_column: String,
    /// The dotted path of the event's value looked up in the table.
    #[serde(rename = "match")]
    pub r#match: String,
    /// The table's rows, read from `file` when the config is loaded.
    #[serde(skip)]
    pub rows: Arc<crate::transform::Table>,
}

/// A derived field (`[[derive]]`): one step over two operands, each a
/// dotted path or a number; null when an operand is missing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeriveConfig {
    /// Where the result goes (a dotted path; objects on the way are made).
    pub field: String,
    /// `[a, b]`: a / b.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divide: Option<[Operand; 2]>,
    /// `[a, b]`: a × b.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiply: Option<[Operand; 2]>,
    /// `[a, b]`: a + b.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add: Option<[Operand; 2]>,
    /// `[a, b]`: a − b.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtract: Option<[Operand; 2]>,
}

impl DeriveConfig {
    /// The one step given: its name and operands (`None` when not exactly
    /// one is given, which validation refuses).
    pub fn operation(&self) -> Option<(&'static str, &[Operand; 2])> {
        let given: Vec<(&'static str, &[Operand; 2])> = [
            ("divide", &self.divide),
            ("multiply", &self.multiply),
            ("add", &self.add),
            ("subtract", &self.subtract),
        ]
        .into_iter()
        .filter_map(|(name, op)| op.as_ref().map(|o| (name, o)))
        .collect();
        match given.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}

/// An operand of a derived field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Operand {
    /// A literal number.
    Number(f64),
    /// The number at a dotted path of the event.
    Field(String),
}

/// A forwarding sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Name in logs, metrics and DLQ entries.
    pub name: String,
    /// `http` or `file`.
    #[serde(rename = "type")]
    pub kind: SinkKind,
    /// Target URL (`http` only; plain http).
    #[serde(default)]
    pub url: Option<String>,
    /// Per-request timeout (`http` only).
    #[serde(default = "default_sink_timeout")]
    pub timeout_ms: u64,
    /// Output file (`file` only).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The stream events are added to (`redis-stream` only; its Redis is
    /// `url`, else `[redis] url`).
    #[serde(default)]
    pub stream: Option<String>,
    /// Trim the stream to about this many entries (`redis-stream` only);
    /// absent: never trimmed.
    #[serde(default)]
    pub maxlen: Option<u64>,
}

fn default_sink_timeout() -> u64 {
    5000
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "127.0.0.1:5015".into(),
            data_dir: PathBuf::from("./inletd-data"),
            durability: Durability::Fsync,
            flush_interval_ms: 5,
            batch_size: 100,
            batch_timeout_ms: 250,
            max_retries: 3,
            retry_base_ms: 200,
            retry_max_ms: 10_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 30_000,
            idempotency_ttl_hours: 24,
            drain_timeout_secs: 25,
            max_body_bytes: 1_048_576,
            max_batch_events: 1000,
            max_queue_events: 10_000_000,
            max_queue_bytes: 0,
            admin_token: String::new(),
            stats_token: String::new(),
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            cache_capacity_mb: 32,
            header_read_timeout_secs: 10,
            max_restarts_per_minute: 10,
            store_stall_secs: 30,
            request_timeout_secs: 30,
            max_connections: 1024,
            sum_fields: Vec::new(),
            windows: Vec::new(),
            enrichment: Vec::new(),
            derive: Vec::new(),
            sources: Vec::new(),
            sinks: Vec::new(),
            redis: RedisConfig::default(),
            warnings: Vec::new(),
            origin: Origin::default(),
        }
    }
}

impl Config {
    /// Loads the configuration: defaults, then `file`, then the environment
    /// (`INLETD_<KEY>` for every top-level scalar key), then `overrides`
    /// (`key`, value as text) from the command line. Validates the result.
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("INLETD_"))
            .collect();
        let text = match file {
            Some(path) => std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
            None => String::new(),
        };
        let mut config = Self::from_parts(&text, &env, overrides)?;
        config.read_secret_files()?;
        config.validate()?;
        crate::transform::load_tables(&mut config.enrichment).map_err(ConfigError::Invalid)?;
        config.origin = Origin {
            file: file.map(Path::to_owned),
            overrides: overrides
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        };
        Ok(config)
    }

    /// Reads the configuration again from where it came from (SIGHUP).
    /// Keys that only take effect at start (listed below) keep their current values; the names of
    /// those that differ are returned so the caller can say so.
    pub fn reload(&self) -> Result<(Config, Vec<&'static str>), ConfigError> {
        let overrides: Vec<(&str, String)> = self
            .origin
            .overrides
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let mut new = Config::load(self.origin.file.as_deref(), &overrides)?;
        let mut ignored = Vec::new();
        macro_rules! keep {
            ($($field:ident),*) => {$(
                if new.$field != self.$field {
                    ignored.push(stringify!($field));
                    new.$field = self.$field.clone();
                }
            )*};
        }
        keep!(
            bind,
            data_dir,
            durability,
            flush_interval_ms,
            cache_capacity_mb,
            header_read_timeout_secs,
            max_connections,
            log_format
        );
        Ok((new, ignored))
    }

    /// Reads each source's `secret_file` into its `secret`, warning when
    /// the file can be read by other users.
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        for (i, source) in self.sources.iter_mut().enumerate() {
            let Some(path) = &source.secret_file else {
                continue;
            };
            if source.secret.is_some() {
                return Err(ConfigError::Invalid(vec![format!(
                    "sources[{i}]: give secret or secret_file, not both"
                )]));
            }
            let unreadable = |e: std::io::Error| {
                ConfigError::Invalid(vec![format!(
                    "sources[{i}].secret_file: cannot read {}: {e}",
                    path.display()
                )])
            };
            let text = std::fs::read_to_string(path).map_err(unreadable)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)
                    .map_err(unreadable)?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    self.warnings.push(format!(
                        "sources[{i}].secret_file {} is readable by other users (mode {:o}); chmod 600 it",
                        path.display(),
                        mode & 0o777
                    ));
                }
            }
            source.secret = Some(text.trim().to_owned());
        }
        Ok(())
    }

    /// [`Config::load`] without touching the process: file text, environment
    /// pairs and overrides given.
    pub fn from_parts(
        file_text: &str,
        env: &[(String, String)],
        overrides: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        // Every syntax error at once, each with its line and column.
        let (document, syntax) = toml::de::DeTable::parse_recoverable(file_text);
        if !syntax.is_empty() {
            return Err(ConfigError::Invalid(
                syntax
                    .iter()
                    .map(|e| match e.span() {
                        Some(span) => {
                            format!("{}: {}", position(file_text, span.start), e.message())
                        }
                        None => e.message().to_owned(),
                    })
                    .collect(),
            ));
        }
        // Where each setting came from, to name it in a problem: the
        // top-level ones, and those inside a table (`redis.timeout_ms`) or
        // an array of tables (`sinks[0].url`), as validate() names them.
        let mut origin: BTreeMap<String, String> = BTreeMap::new();
        for (key, value) in document.get_ref() {
            let name = key.get_ref().to_string();
            origin.insert(name.clone(), position(file_text, key.span().start));
            let mut inner = |prefix: String, table: &toml::de::DeTable| {
                for (k, _) in table {
                    let at = position(file_text, k.span().start);
                    origin.insert(format!("{prefix}.{}", k.get_ref()), at);
                }
            };
            match value.get_ref() {
                toml::de::DeValue::Table(table) => inner(name, table),
                toml::de::DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let toml::de::DeValue::Table(table) = item.get_ref() {
                            inner(format!("{name}[{i}]"), table);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut table: toml::Table =
            toml::from_str(file_text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let scalar_keys = scalar_keys();
        let mut problems = Vec::new();
        for (name, value) in env {
            let Some(key) = name.strip_prefix("INLETD_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            if key == "config" {
                continue;
            }
            if !scalar_keys.contains(key.as_str()) {
                problems.push(format!(
                    "environment variable {name}: no such setting `{key}`{}",
                    did_you_mean(&key, &scalar_keys)
                ));
                continue;
            }
            table.insert(key.clone(), scalar_value(value));
            origin.insert(key, format!("environment variable {name}"));
        }
        for (key, value) in overrides {
            table.insert((*key).to_owned(), scalar_value(value));
            origin.insert((*key).to_owned(), format!("--{}", key.replace('_', "-")));
        }
        // Each setting on its own (every other one has a default), so that
        // every unknown or mistyped one is named, not only the first; the
        // rest are then checked together, with those left at their defaults.
        let known = top_level_keys();
        let place = |key: &str| origin.get(key).map_or(String::new(), |p| format!("{p}: "));
        let mut wrong = Vec::new();
        for (key, value) in &table {
            if !known.contains(key.as_str()) {
                problems.push(format!(
                    "{}unknown setting `{key}`{}",
                    place(key),
                    did_you_mean(key, &known)
                ));
                wrong.push(key.clone());
                continue;
            }
            let mut alone = toml::Table::new();
            alone.insert(key.clone(), value.clone());
            if let Err(e) = alone.try_into::<Config>() {
                problems.push(format!("{}{key}: {}", place(key), e.message().trim()));
                wrong.push(key.clone());
            }
        }
        for key in &wrong {
            table.remove(key);
        }
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        if let Err(ConfigError::Invalid(bad)) = config.validate() {
            // "sinks[0].url: …": say where that setting is, else where the
            // nearest enclosing one is (`sinks[0]`, then `sinks`).
            problems.extend(bad.into_iter().map(|b| {
                let mut key = b.split(':').next().unwrap_or("");
                while !origin.contains_key(key) {
                    match key.rfind(['.', '[']) {
                        Some(end) => key = &key[..end],
                        None => break,
                    }
                }
                format!("{}{b}", place(key))
            }));
        }
        if !problems.is_empty() {
            // In the file's order; the environment's and the flags' after.
            problems.sort_by_key(|p| line_of(p));
            return Err(ConfigError::Invalid(problems));
        }
        Ok(config)
    }

    /// Checks every value; names each bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut bad = Vec::new();
        if self.bind.parse::<SocketAddr>().is_err() {
            bad.push(format!(
                "bind: `{}` is not an address like 127.0.0.1:5015",
                self.bind
            ));
        }
        let redis = &self.redis;
        let ranges: [(&str, u64, u64, u64); 25] = [
            ("flush_interval_ms", self.flush_interval_ms, 1, 60_000),
            ("batch_size", self.batch_size as u64, 1, 100_000),
            ("batch_timeout_ms", self.batch_timeout_ms, 1, 3_600_000),
            ("max_retries", u64::from(self.max_retries), 0, 100),
            ("retry_base_ms", self.retry_base_ms, 1, 3_600_000),
            ("retry_max_ms", self.retry_max_ms, 1, 3_600_000),
            (
                "breaker_failures",
                u64::from(self.breaker_failures),
                1,
                1_000_000,
            ),
            (
                "idempotency_ttl_hours",
                self.idempotency_ttl_hours,
                1,
                24 * 365,
            ),
            ("drain_timeout_secs", self.drain_timeout_secs, 1, 3600),
            ("max_body_bytes", self.max_body_bytes as u64, 256, 32 << 20),
            (
                "max_batch_events",
                self.max_batch_events as u64,
                1,
                1_000_000,
            ),
            ("max_queue_events", self.max_queue_events, 1, u64::MAX),
            ("cache_capacity_mb", self.cache_capacity_mb, 1, 1 << 20),
            (
                "header_read_timeout_secs",
                self.header_read_timeout_secs,
                1,
                3600,
            ),
            ("request_timeout_secs", self.request_timeout_secs, 1, 3600),
            ("max_connections", self.max_connections as u64, 1, 1_000_000),
            (
                "max_restarts_per_minute",
                self.max_restarts_per_minute as u64,
                1,
                10_000,
            ),
            ("store_stall_secs", self.store_stall_secs, 1, 3600),
            ("redis.timeout_ms", redis.timeout_ms, 1, 60_000),
            ("redis.claim_lease_ms", redis.claim_lease_ms, 100, 3_600_000),
            (
                "redis.publish_interval_ms",
                redis.publish_interval_ms,
                10,
                3_600_000,
            ),
            (
                "redis.backlog_max_keys",
                redis.backlog_max_keys as u64,
                0,
                100_000_000,
            ),
            ("redis.dau_exact_max", redis.dau_exact_max, 0, 100_000_000),
            (
                "redis.takeover_after_ms",
                redis.takeover_after_ms,
                1000,
                86_400_000,
            ),
            ("redis.shared_days", redis.shared_days, 1, MAX_SHARED_DAYS),
        ];
        for (key, value, min, max) in ranges {
            if value < min || value > max {
                bad.push(format!("{key}: {value} is out of range ({min}..={max})"));
            }
        }
        if redis.takeover_after_ms < redis.publish_interval_ms.saturating_mul(3) {
            bad.push(format!(
                "redis.takeover_after_ms: {} must be at least three publish rounds \
                 (3 × redis.publish_interval_ms = {}), or a live instance would be taken over",
                redis.takeover_after_ms,
                redis.publish_interval_ms.saturating_mul(3)
            ));
        }
        if self.retry_max_ms < self.retry_base_ms {
            bad.push("retry_max_ms: must not be below retry_base_ms".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            bad.push(format!(
                "log_level: `{}` is not a log filter: {e}",
                self.log_level
            ));
        }
        let mut fields = BTreeSet::new();
        if self.sum_fields.len() > MAX_SUM_FIELDS {
            bad.push(format!(
                "sum_fields: at most {MAX_SUM_FIELDS} fields (each costs a key per day and type)"
            ));
        }
        for (i, field) in self.sum_fields.iter().enumerate() {
            if !valid_path(field) {
                bad.push(format!(
                    "sum_fields[{i}]: `{field}` must be a dotted path like properties.amount"
                ));
            }
            if !fields.insert(field.as_str()) {
                bad.push(format!("sum_fields[{i}]: `{field}` is given twice"));
            }
        }
        if self.windows.len() > MAX_SUM_FIELDS {
            bad.push(format!("windows: at most {MAX_SUM_FIELDS} windows"));
        }
        let mut names = BTreeSet::new();
        for (i, w) in self.windows.iter().enumerate() {
            if !valid_name(&w.name) {
                bad.push(format!(
                    "windows[{i}].name: `{}` must be 1-64 of a-z, 0-9, - and _",
                    w.name
                ));
            }
            if !names.insert(w.name.as_str()) {
                bad.push(format!("windows[{i}].name: `{}` is given twice", w.name));
            }
            if !(1..=MAX_WINDOW_MINUTES).contains(&w.minutes) {
                bad.push(format!(
                    "windows[{i}].minutes: {} is out of range (1..={MAX_WINDOW_MINUTES})",
                    w.minutes
                ));
            }
            if !valid_path(&w.group_by) {
                bad.push(format!(
                    "windows[{i}].group_by: `{}` must be a dotted path like properties.content_id",
                    w.group_by
                ));
            }
            if let Some(sum) = &w.sum
                && !valid_path(sum)
            {
                bad.push(format!(
                    "windows[{i}].sum: `{sum}` must be a dotted path like properties.duration_ms"
                ));
            }
            if w.event_types
                .iter()
                .any(|t| t.is_empty() || t.chars().count() > 128)
            {
                bad.push(format!(
                    "windows[{i}].event_types: each must be 1 to 128 characters"
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, e) in self.enrichment.iter().enumerate() {
            if !valid_name(&e.name) {
                bad.push(format!(
                    "enrichment[{i}].name: `{}` must be 1-64 of a-z, 0-9, - and _",
                    e.name
                ));
            }
            if !names.insert(e.name.as_str()) {
                bad.push(format!("enrichment[{i}].name: `{}` is given twice", e.name));
            }
            if e.key_column.is_empty() {
                bad.push(format!("enrichment[{i}].key_column: must not be empty"));
            }
            if !valid_path(&e.r#match) {
                bad.push(format!(
                    "enrichment[{i}].match: `{}` must be a dotted path like properties.content_id",
                    e.r#match
                ));
            }
        }
        for (i, d) in self.derive.iter().enumerate() {
            let top = d.field.split('.').next().unwrap_or_default();
            if RESERVED_FIELDS.contains(&top) {
                bad.push(format!(
                    "derive[{i}].field: `{}` would change the event's `{top}`, which inletd reads; \
                     put derived fields under another name, such as derived.",
                    d.field
                ));
            }
            if !valid_path(&d.field) {
                bad.push(format!(
                    "derive[{i}].field: `{}` must be a dotted path like derived.engagement_seconds",
                    d.field
                ));
            }
            match d.operation() {
                None => bad.push(format!(
                    "derive[{i}]: give exactly one of divide, multiply, add, subtract"
                )),
                Some((name, operands)) => {
                    for operand in operands {
                        match operand {
                            Operand::Field(path) if !valid_path(path) => bad.push(format!(
                                "derive[{i}].{name}: `{path}` must be a dotted path or a number"
                            )),
                            Operand::Number(x) if !x.is_finite() => bad.push(format!(
                                "derive[{i}].{name}: operands must be finite numbers"
                            )),
                            _ => {}
                        }
                    }
                }
            }
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            if !valid_name(&s.name) {
                bad.push(format!(
                    "sources[{i}].name: `{}` must be 1-64 of a-z, 0-9, - and _",
                    s.name
                ));
            }
            if !names.insert(s.name.as_str()) {
                bad.push(format!("sources[{i}].name: `{}` is given twice", s.name));
            }
            match (&s.secret, &s.secret_file) {
                (None, None) if s.verify != Scheme::None => bad.push(format!(
                    "sources[{i}].secret: required for verify = {:?}",
                    s.verify
                )),
                // A secret from `secret_file` is checked once read.
                (Some(secret), _) => {
                    if let Err(e) = Verifier::new(s.verify, secret) {
                        bad.push(format!("sources[{i}].secret: {e}"));
                    }
                }
                _ => {}
            }
            if let Some(r) = s.rate_limit_per_sec
                && !(r.is_finite() && r > 0.0)
            {
                bad.push(format!(
                    "sources[{i}].rate_limit_per_sec: must be a positive number"
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.sinks.iter().enumerate() {
            if !valid_name(&s.name) {
                bad.push(format!(
                    "sinks[{i}].name: `{}` must be 1-64 of a-z, 0-9, - and _",
                    s.name
                ));
            }
            if !names.insert(s.name.as_str()) {
                bad.push(format!("sinks[{i}].name: `{}` is given twice", s.name));
            }
            match s.kind {
                SinkKind::RedisStream => {
                    match &s.url {
                        Some(u) if valid_redis_url(u) => {}
                        Some(u) => bad.push(format!(
                            "sinks[{i}].url: `{}` must be a redis:// or rediss:// URL",
                            redacted_redis_url(u)
                        )),
                        None if self.redis.enabled() => {}
                        None => bad.push(format!(
                            "sinks[{i}].url: required for type = \"redis-stream\" unless [redis] url is set"
                        )),
                    }
                    if s.stream.as_deref().is_none_or(str::is_empty) {
                        bad.push(format!(
                            "sinks[{i}].stream: required for type = \"redis-stream\""
                        ));
                    }
                    if s.maxlen == Some(0) {
                        bad.push(format!("sinks[{i}].maxlen: must be at least 1"));
                    }
                }
                SinkKind::Http => match &s.url {
                    Some(u) if u.starts_with("http://") && u.parse::<hyper::Uri>().is_ok() => {}
                    Some(u) => bad.push(format!(
                        "sinks[{i}].url: `{u}` must be a plain http:// URL (put TLS in front with a local proxy)"
                    )),
                    None => bad.push(format!("sinks[{i}].url: required for type = \"http\"")),
                },
                SinkKind::File => {
                    if s.path.is_none() {
                        bad.push(format!("sinks[{i}].path: required for type = \"file\""));
                    }
                }
            }
            if s.timeout_ms == 0 {
                bad.push(format!("sinks[{i}].timeout_ms: must be at least 1"));
            }
        }
        if redis.enabled() && !valid_redis_url(&redis.url) {
            bad.push(format!(
                "redis.url: `{}` must be a redis:// or rediss:// URL with a host",
                redacted_redis_url(&redis.url)
            ));
        }
        if redis.key_prefix.len() > 64 {
            bad.push("redis.key_prefix: at most 64 bytes".to_owned());
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(bad))
        }
    }

    /// The listen address (validated).
    pub fn bind_addr(&self) -> SocketAddr {
        self.bind
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 5015)))
    }

    /// Idempotency window in ms.
    pub fn idempotency_ttl_ms(&self) -> i64 {
        i64::try_from(self.idempotency_ttl_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX)
    }

    /// `batch_timeout_ms` as a Duration.
    pub fn batch_timeout(&self) -> Duration {
        Duration::from_millis(self.batch_timeout_ms)
    }

    /// `drain_timeout_secs` as a Duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// `store_stall_secs` as a duration.
    pub fn store_stall(&self) -> Duration {
        Duration::from_secs(self.store_stall_secs)
    }
}

/// Prints a secret as `***` (empty stays empty) so `check-config` leaks nothing.
fn masked<S: serde::Serializer>(value: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if value.is_empty() { "" } else { "***" })
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The top-level keys that hold a single value (settable from env and flags).
fn scalar_keys() -> BTreeSet<String> {
    match toml::Table::try_from(Config::default()) {
        Ok(t) => t
            .into_iter()
            .filter(|(_, v)| !matches!(v, toml::Value::Array(_) | toml::Value::Table(_)))
            .map(|(k, _)| k)
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Every top-level setting, scalars and tables alike.
fn top_level_keys() -> BTreeSet<String> {
    toml::Table::try_from(Config::default())
        .map(|t| t.into_iter().map(|(k, _)| k).collect())
        .unwrap_or_default()
}

/// The line a problem names (`line L, …`), for sorting; others last.
fn line_of(problem: &str) -> (usize, usize) {
    let mut numbers = problem
        .strip_prefix("line ")
        .map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .filter(|n| !n.is_empty())
                .take(2)
                .filter_map(|n| n.parse().ok())
                .collect::<Vec<usize>>()
        })
        .unwrap_or_default()
        .into_iter();
    (
        numbers.next().unwrap_or(usize::MAX),
        numbers.next().unwrap_or(0),
    )
}

/// `line L, column C` of byte `at` in `text` (both from 1).
fn position(text: &str, at: usize) -> String {
    // A span always starts on a character; should one not, take the one it is in.
    let at = (0..=at.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// `; did you mean `x`?` for the known name nearest to `name` (at most two
/// edits away), else nothing.
fn did_you_mean(name: &str, known: &BTreeSet<String>) -> String {
    known
        .iter()
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map_or(String::new(), |(_, k)| format!("; did you mean `{k}`?"))
}

/// Levenshtein distance between two short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Text from the environment or a flag as a TOML value: numbers and
/// booleans as such, anything else as a string.
fn scalar_value(text: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)),
            ) => v,
            _ => toml::Value::String(text.to_owned()),
        },
        Err(_) => toml::Value::String(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_field_may_not_write_what_inletd_reads() {
        for field in ["user_id", "event_type.x", "enriched.content.type"] {
            let text = format!("[[derive]]\nfield = \"{field}\"\nadd = [1, 2]\n");
            let Err(ConfigError::Invalid(problems)) = Config::from_parts(&text, &[], &[]) else {
                panic!("{field} was taken");
            };
            assert!(problems[0].contains("derive[0].field"), "{problems:?}");
        }
        let text = "[[derive]]\nfield = \"derived.x\"\nadd = [\"properties.a\", 2]\n";
        assert!(Config::from_parts(text, &[], &[]).is_ok());
    }

    #[test]
    fn positions_and_suggestions() {
        let text = "a = 1\n\u{e9}t\u{e9} = 2\n";
        assert_eq!(position(text, 0), "line 1, column 1");
        assert_eq!(position(text, 6), "line 2, column 1");
        // Inside the two-byte é: the character it is in.
        assert_eq!(position(text, 7), "line 2, column 1");
        assert_eq!(position(text, 999), "line 3, column 1");
        assert_eq!(edit_distance("bathc_size", "batch_size"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        let known: BTreeSet<String> = ["batch_size", "bind"].map(String::from).into();
        assert_eq!(
            did_you_mean("batch_siz", &known),
            "; did you mean `batch_size`?"
        );
        assert_eq!(did_you_mean("zzzzzz", &known), "");
        assert_eq!(line_of("line 12, column 3: x"), (12, 3));
        assert_eq!(line_of("environment variable X: y"), (usize::MAX, 0));
    }

    #[test]
    fn no_file_gives_the_defaults() {
        assert_eq!(Config::from_parts("", &[], &[]).unwrap(), Config::default());
    }

    #[test]
    fn redis_settings_are_checked_and_the_password_never_shown() {
        let bad = Config::from_parts(
            "[redis]\nurl = \"http://x\"\ntimeout_ms = 0\npublish_interval_ms = 5000\nshared_days = 401\n\n[[sinks]]\nname = \"out\"\ntype = \"redis-stream\"\n",
            &[],
            &[],
        );
        let Err(ConfigError::Invalid(problems)) = bad else {
            panic!("accepted: {bad:?}");
        };
        let text = problems.join("\n");
        for expected in [
            "redis.url: `http://x` must be a redis:// or rediss:// URL",
            "redis.timeout_ms: 0 is out of range",
            "redis.shared_days: 401 is out of range (1..=400)",
            // A heartbeat that lasts less than three rounds would let a
            // live instance be taken over.
            "redis.takeover_after_ms: 10000 must be at least three publish rounds",
            "sinks[0].stream: required",
        ] {
            assert!(text.contains(expected), "{expected} not in:\n{text}");
        }
        let alone = Config::from_parts(
            "[[sinks]]\nname = \"out\"\ntype = \"redis-stream\"\nstream = \"s\"\n",
            &[],
            &[],
        );
        assert!(
            format!("{alone:?}").contains("unless [redis] url is set"),
            "{alone:?}"
        );
        let good = Config::from_parts(
            "[redis]\nurl = \"redis://app:hunter2@10.0.0.5:6379/0\"\n\n[[sinks]]\nname = \"out\"\ntype = \"redis-stream\"\nstream = \"s\"\n",
            &[],
            &[],
        )
        .expect("valid");
        assert!(good.redis.enabled());
        let shown = toml::to_string(&good).expect("serializes");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://app:***@10.0.0.5:6379/0"), "{shown}");
        assert_eq!(
            redacted_redis_url("rediss://:pw@h:6380"),
            "rediss://:***@h:6380"
        );
        assert_eq!(redacted_redis_url("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file = "batch_size = 10\nbind = \"127.0.0.1:1\"\ndata_dir = \"/f\"";
        let env = vec![
            ("INLETD_BATCH_SIZE".to_owned(), "20".to_owned()),
            ("INLETD_BIND".to_owned(), "127.0.0.1:2".to_owned()),
        ];
        let c = Config::from_parts(file, &env, &[("bind", "127.0.0.1:3".into())]).unwrap();
        assert_eq!(c.batch_size, 20);
        assert_eq!(c.bind, "127.0.0.1:3");
        assert_eq!(c.data_dir, PathBuf::from("/f"));
    }

    #[test]
    fn every_bad_key_is_named() {
        let file = "batch_size = 0\nbind = \"nowhere\"\n[[sinks]]\nname = \"d\"\ntype = \"http\"\nurl = \"https://x\"";
        let err = Config::from_parts(file, &[], &[]).unwrap_err().to_string();
        for key in ["batch_size", "bind", "sinks[0].url"] {
            assert!(err.contains(key), "{err}");
        }
        let err = Config::from_parts("batch_sise = 3", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_sise"), "{err}");
        let err = Config::from_parts("batch_size = \"x\"", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_size"), "{err}");
        let env = vec![("INLETD_NOPE".to_owned(), "1".to_owned())];
        assert!(
            Config::from_parts("", &env, &[])
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }
}
