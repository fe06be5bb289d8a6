//! [`Pipeline`]: the one handle the HTTP layer holds. Admission (draining,
//! the source, its rate limit, a full queue), readiness, queue figures, the
//! analytics queries and every call to an actor are its methods; the
//! context behind it (store, status, registry names, Redis) stays private,
//! so that no handler reads the store or the actors' shared state on its
//! own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt as _;
use ractor::Message;

use super::messages::{
    BatcherMsg, DlqItem, DlqMsg, IngestError, IngestRequest, IngestResult, LatencySummary,
    MetricsMsg, RateSeries, ReceiverMsg, ReplayReport, SinkHealth,
};
use super::{BATCHER, Context, DLQ, InFlight, Live, METRICS, Names, RECEIVER, Role, blocking};
use crate::analytics::{
    self, Cohort, DauDay, DayFigures, Interval, RankBy, Trend, TypeCount, WindowGroup, Windows,
    query::StatsQuery,
};
use crate::config::{Config, WindowConfig};
use crate::event::now_ms;
use crate::mirror::{Deployment, DeploymentDay, Mirror, MirrorError, MirrorHealth};
use crate::signature::Scheme;
use crate::storage::{QueueInfo, StorageError};

/// The handle the HTTP layer and `app` use.
#[derive(Clone)]
pub struct Pipeline {
    /// Shared context (names, status, storage, Redis): private, so that
    /// every use of it is one of the methods below.
    context: Arc<Context>,
}

/// Why intake refused a request before reading its body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("inletd is shutting down; retry against the restarted daemon")]
    Draining,
    #[error("no source named `{0}` is configured")]
    UnknownSource(String),
    #[error("source `{name}` is over its rate limit")]
    RateLimited {
        /// The source's name.
        name: String,
        /// When its bucket has a token again.
        wait: Duration,
    },
    #[error("{depth} events are queued (max_queue_events = {max}); retry later")]
    QueueFull { depth: u64, max: u64 },
    #[error("{bytes} bytes are queued (max_queue_bytes = {max}); retry later")]
    QueueBytesFull { bytes: u64, max: u64 },
    #[error("{0}")]
    Storage(String),
}

/// A request let in: counted in flight (the drain waits for it) until
/// dropped, with the configuration it was let in under.
pub struct Admission<'a> {
    /// Held until the answer.
    _in_flight: InFlight<'a>,
    /// The config, sources and sinks in force when the request came in.
    live: Arc<Live>,
    /// The signature scheme of the source it came in on, if it has one.
    scheme: Option<Scheme>,
}

impl Admission<'_> {
    /// The configuration in force for this request.
    pub fn config(&self) -> &Config {
        &self.live.config
    }

    /// The config, sources and sinks this request was let in under: the
    /// Receiver checks it against these, not against a reload since.
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// The signature scheme of the request's source, if it has one: it
    /// decides where a single event's key may come from.
    pub fn scheme(&self) -> Option<Scheme> {
        self.scheme
    }
}

/// Whether the daemon takes events (`/ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Taking events.
    Ready,
    /// Shutting down: intake answers 503.
    Draining,
    /// The last commit to the store failed.
    StorageFailed,
}

/// The queue as `/admin/queue` shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueStatus {
    /// Depth, bytes, cursor, last seq and the oldest record's receipt.
    pub info: QueueInfo,
    /// Entries parked in the DLQ.
    pub dlq_size: u64,
}

/// What `/stats/summary` shows.
#[derive(Debug)]
pub struct Summary {
    /// This instance's processed events per type.
    pub counts: Vec<(String, u64)>,
    /// Events waiting in the WAL.
    pub queue_depth: u64,
    /// Entries parked in the DLQ.
    pub dlq_size: u64,
    /// Latency percentiles (receipt→processed from the on-disk histogram,
    /// so that it survives restarts).
    pub latency: LatencySummary,
    /// Every configured sink, in config order.
    pub sinks: Vec<SinkHealth>,
    /// With Redis: every instance's counts, or why they could not be read.
    pub deployment: Option<Result<Deployment, MirrorError>>,
}

/// The answer to a [`StatsQuery`].
#[derive(Debug)]
pub enum StatsAnswer {
    /// Distinct users per day of `from..=to`.
    Dau {
        from: i32,
        to: i32,
        days: Vec<DauDay>,
        /// With Redis, over recent days: the days are the deployment's, and
        /// this says of each whether it is exact (not a HyperLogLog estimate).
        exact: Option<Vec<bool>>,
        /// Why the deployment's could not be read (these are then this instance's).
        deployment_error: Option<String>,
    },
    /// Event types of `from..=to` ranked.
    TopEvents {
        from: i32,
        to: i32,
        events: Vec<TypeCount>,
        /// True when they are the deployment's (Redis on, by count, recent days).
        deployment: bool,
        /// Why the deployment's could not be read (these are then this instance's).
        deployment_error: Option<String>,
    },
    /// Periods of a trend, with the fields `sum=` may name.
    Trends {
        trend: Trend,
        summable: Vec<String>,
        /// With Redis, over recent days: the periods are the deployment's,
        /// and this says of each whether its users are exact.
        exact: Option<Vec<bool>>,
        /// Why the deployment's could not be read (these are then this instance's).
        deployment_error: Option<String>,
    },
    /// Cohorts, with the window type asked for.
    Retention {
        window_type: String,
        cohorts: Vec<Cohort>,
        /// True when they are the deployment's (Redis on, recent days).
        deployment: bool,
        /// Why the deployment's could not be read (these are then this instance's).
        deployment_error: Option<String>,
    },
    /// The built-in windows, with the names of the configured ones.
    Windows {
        windows: Windows,
        custom: Vec<String>,
        /// With Redis: they are the deployment's, and this says whether the
        /// active users and sessions are exact (not HyperLogLog estimates).
        exact: Option<bool>,
        /// Why the deployment's could not be read (these are then this instance's).
        deployment_error: Option<String>,
    },
    /// A configured window's groups.
    Window {
        window: WindowConfig,
        groups: Vec<WindowGroup>,
        /// True when they are the deployment's (Redis on).
        deployment: bool,
        /// Why the deployment's could not be read (these are then this instance's).
        deployment_error: Option<String>,
    },
}

/// Why a stats query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("no window named `{0}` is configured ([[windows]])")]
    UnknownWindow(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// How long a request waits for an actor before answering 503.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends the message `build` makes to the actor in `role` at once, and
/// returns a future of its reply: `None` if the actor is gone, drops the
/// port, or takes longer than [`CALL_TIMEOUT`].
///
/// Not ractor's `call`: its future keeps the message builder and the
/// message (an intake request's body, headers and source) in every layer
/// of its state, which made an intake request's future 1.9 KiB, a size
/// that glibc (inletd's allocator then) served from its slow path and not
/// its per-thread cache. This one
/// sends before it returns, so its future holds only the reply channel and
/// the timer.
fn ask<M: Message, R: Send + 'static, B: FnOnce(ractor::RpcReplyPort<R>) -> M>(
    names: &Names,
    role: Role<M>,
    build: B,
) -> impl Future<Output = Option<R>> + Send + use<M, R, B> {
    let reply = names.find::<M>(role).and_then(|actor| {
        let (port, reply) = ractor::concurrency::oneshot();
        actor
            .send_message(build((port, CALL_TIMEOUT).into()))
            .ok()
            .map(|()| reply)
    });
    async move { tokio::time::timeout(CALL_TIMEOUT, reply?).await.ok()?.ok() }
}

impl Pipeline {
    /// The handle of the pipeline running on `context`.
    pub fn new(context: Arc<Context>) -> Self {
        Pipeline { context }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.context.live().config.clone()
    }

    /// Lets an intake request on `source` in, or says why not: draining,
    /// an unknown source, its rate limit, a full queue. Reads no body and
    /// blocks on nothing.
    pub fn admit(&self, source: &str) -> Result<Admission<'_>, Refusal> {
        let status = &self.context.status;
        let in_flight = status.begin_intake().ok_or(Refusal::Draining)?;
        let live = self.context.live();
        let Some(parts) = live.sources.get(source) else {
            return Err(Refusal::UnknownSource(source.to_owned()));
        };
        if let Some(bucket) = &parts.limiter
            && let Err(wait) = bucket.take()
        {
            return Err(Refusal::RateLimited {
                name: source.to_owned(),
                wait,
            });
        }
        let config = &live.config;
        let depth = status.queue_depth();
        if depth >= config.max_queue_events {
            return Err(Refusal::QueueFull {
                depth,
                max: config.max_queue_events,
            });
        }
        if config.max_queue_bytes > 0 {
            // Unknown is not empty: the byte limit cannot be checked, so
            // nothing is taken. An atomic read, fit for the request path.
            let bytes = self
                .context
                .storage
                .queue_bytes()
                .map_err(|e| Refusal::Storage(e.to_string()))?;
            if bytes >= config.max_queue_bytes {
                return Err(Refusal::QueueBytesFull {
                    bytes,
                    max: config.max_queue_bytes,
                });
            }
        }
        Ok(Admission {
            _in_flight: in_flight,
            scheme: parts.verifier.as_ref().map(|v| v.scheme()),
            live,
        })
    }

    /// Hands a request to the Receiver and waits for its verdicts.
    /// The request is handed over at once, so the future keeps no copy of it.
    pub fn ingest(&self, request: IngestRequest) -> impl Future<Output = IngestResult> + use<> {
        ask(&self.context.names, RECEIVER, |reply| {
            ReceiverMsg::Ingest(request, reply)
        })
        .map(|verdicts| verdicts.unwrap_or(Err(IngestError::Unavailable)))
    }

    /// Whether the daemon takes events.
    pub fn readiness(&self) -> Readiness {
        let status = &self.context.status;
        if status.draining.load(Ordering::Relaxed) {
            Readiness::Draining
        } else if status.storage_failed.load(Ordering::Relaxed) {
            Readiness::StorageFailed
        } else {
            Readiness::Ready
        }
    }

    /// The queue and the DLQ, from the store.
    pub async fn queue(&self) -> Result<QueueStatus, StorageError> {
        blocking(&self.context.storage, |s| {
            Ok(QueueStatus {
                info: s.queue_info()?,
                dlq_size: s.dlq_len()?,
            })
        })
        .await
    }

    /// Renders the Prometheus exposition.
    pub async fn render_metrics(&self) -> Option<String> {
        ask(&self.context.names, METRICS, MetricsMsg::Render).await
    }

    /// Events accepted and processed per second, recent seconds; `None`
    /// while the Metrics actor restarts.
    pub async fn rate(&self) -> Option<RateSeries> {
        ask(&self.context.names, METRICS, MetricsMsg::Live)
            .await
            .map(|live| live.rate)
    }

    /// The deployment's Redis as `/health` shows it; `None` when Redis is off.
    pub fn redis_health(&self) -> Option<MirrorHealth> {
        self.context.mirror.as_ref().map(|m| m.health())
    }

    /// Totals, queue, DLQ, latency and sinks; with Redis, the deployment's
    /// counts beside this instance's.
    pub async fn summary(&self) -> Result<Summary, StorageError> {
        let (counts, dlq_size, processed) = blocking(&self.context.storage, |s| {
            Ok((
                s.counts()?,
                s.dlq_len()?,
                analytics::latency_percentiles(s, &[0.5, 0.99])?,
            ))
        })
        .await?;
        let live_figures = ask(&self.context.names, METRICS, MetricsMsg::Live)
            .await
            .unwrap_or_default();
        let mut latency = live_figures.latency;
        latency.p50 = processed[0];
        latency.p99 = processed[1];
        // Every configured sink, in config order; one that has not reported
        // yet (or whose name is new since a reload) has nothing against it.
        let sinks = self
            .context
            .live()
            .sinks
            .iter()
            .map(|sink| {
                live_figures
                    .sinks
                    .iter()
                    .find(|h| h.name == sink.name())
                    .cloned()
                    .unwrap_or_else(|| SinkHealth::ok(sink.name()))
            })
            .collect();
        let deployment = match &self.context.mirror {
            Some(mirror) => Some(mirror.deployment(&counts).await),
            None => None,
        };
        Ok(Summary {
            counts,
            queue_depth: self.context.status.queue_depth(),
            dlq_size,
            latency,
            sinks,
            deployment,
        })
    }

    /// Answers an analytics query from the store; with Redis, DAU and top
    /// events by count over recent days, and the rolling windows, are the
    /// deployment's.
    pub async fn stats(&self, query: StatsQuery) -> Result<StatsAnswer, StatsError> {
        let config = self.config();
        let storage = &self.context.storage;
        Ok(match query {
            StatsQuery::Dau { from, to } => match self.deployment_dau(from, to).await {
                Some(Ok(deployment)) => StatsAnswer::Dau {
                    from,
                    to,
                    exact: Some(deployment.iter().map(|d| d.exact).collect()),
                    days: deployment
                        .into_iter()
                        .map(|d| DauDay {
                            date: analytics::format_day(d.day),
                            users: d.users,
                        })
                        .collect(),
                    deployment_error: None,
                },
                deployment => StatsAnswer::Dau {
                    from,
                    to,
                    days: blocking(storage, move |s| analytics::dau(s, from, to)).await?,
                    exact: None,
                    deployment_error: deployment.and_then(|d| d.err().map(|e| e.to_string())),
                },
            },
            StatsQuery::TopEvents {
                from,
                to,
                limit,
                sum,
                by,
            } => {
                let deployment = self
                    .deployment_top_events(from, to, limit, sum.as_deref(), by)
                    .await;
                match deployment {
                    Some(Ok(events)) => StatsAnswer::TopEvents {
                        from,
                        to,
                        events,
                        deployment: true,
                        deployment_error: None,
                    },
                    deployment => StatsAnswer::TopEvents {
                        from,
                        to,
                        events: blocking(storage, move |s| {
                            analytics::top_events(s, from, to, limit, sum.as_deref(), by)
                        })
                        .await?,
                        deployment: false,
                        deployment_error: deployment.and_then(Result::err),
                    },
                }
            }
            StatsQuery::Trends {
                from,
                to,
                interval,
                event_type,
                sum,
            } => {
                let summable = config.sum_fields.clone();
                let deployment = self
                    .deployment_trend(from, to, interval, event_type.clone(), sum.clone())
                    .await;
                match deployment {
                    Some(Ok((trend, exact))) => StatsAnswer::Trends {
                        trend,
                        summable,
                        exact: Some(exact),
                        deployment_error: None,
                    },
                    deployment => StatsAnswer::Trends {
                        trend: blocking(storage, move |s| {
                            analytics::trends(
                                s,
                                from,
                                to,
                                interval,
                                event_type.as_deref(),
                                sum.as_deref(),
                            )
                        })
                        .await?,
                        summable,
                        exact: None,
                        deployment_error: deployment.and_then(Result::err),
                    },
                }
            }
            StatsQuery::Retention {
                start,
                windows,
                days,
                window_type,
            } => match self.deployment_retention(start, windows, days).await {
                Some(Ok(Some(cohorts))) => StatsAnswer::Retention {
                    window_type,
                    cohorts,
                    deployment: true,
                    deployment_error: None,
                },
                deployment => StatsAnswer::Retention {
                    window_type,
                    cohorts: blocking(storage, move |s| {
                        analytics::retention(s, start, windows, days)
                    })
                    .await?,
                    deployment: false,
                    deployment_error: match deployment {
                        Some(Ok(None)) => Some(
                            "the days asked have too many users to intersect in redis \
                             (a day past redis.dau_exact_max, or over 2,000,000 in all): \
                             these are this instance's cohorts"
                                .into(),
                        ),
                        Some(Err(e)) => Some(e.to_string()),
                        _ => None,
                    },
                },
            },
            StatsQuery::Windows => {
                let custom = config.windows.iter().map(|w| w.name.clone()).collect();
                let now = now_ms();
                let deployment = match self.context.mirror.as_deref() {
                    Some(mirror) => Some(mirror.deployment_windows(now).await),
                    None => None,
                };
                match deployment {
                    Some(Ok(deployment)) => StatsAnswer::Windows {
                        windows: deployment.windows,
                        custom,
                        exact: Some(deployment.exact),
                        deployment_error: None,
                    },
                    deployment => StatsAnswer::Windows {
                        windows: blocking(storage, move |s| analytics::windows(s, now)).await?,
                        custom,
                        exact: None,
                        deployment_error: deployment.and_then(|d| d.err().map(|e| e.to_string())),
                    },
                }
            }
            StatsQuery::Window { name, limit } => {
                let Some(window) = config.windows.iter().find(|w| w.name == name).cloned() else {
                    return Err(StatsError::UnknownWindow(name));
                };
                let now = now_ms();
                let deployment = match self.context.mirror.as_deref() {
                    Some(mirror) => Some(mirror.deployment_window(&window, now, limit).await),
                    None => None,
                };
                match deployment {
                    Some(Ok(groups)) => StatsAnswer::Window {
                        window,
                        groups,
                        deployment: true,
                        deployment_error: None,
                    },
                    deployment => {
                        let query_window = window.clone();
                        let groups = blocking(storage, move |s| {
                            analytics::custom_window(s, &query_window, now, limit)
                        })
                        .await?;
                        StatsAnswer::Window {
                            window,
                            groups,
                            deployment: false,
                            deployment_error: deployment
                                .and_then(|d| d.err().map(|e| e.to_string())),
                        }
                    }
                }
            }
        })
    }

    /// The deployment's Redis, when it is on and holds the days from
    /// `from` on (the last `shared_days`, which instances share).
    fn shared_from(&self, from: i32) -> Option<&Mirror> {
        let mirror = self.context.mirror.as_deref()?;
        (from >= mirror.first_shared_day()).then_some(mirror)
    }

    /// The deployment's DAU over `from..=to`: `None` when Redis is off or
    /// the range reaches past the days instances share.
    async fn deployment_dau(
        &self,
        from: i32,
        to: i32,
    ) -> Option<Result<Vec<DeploymentDay>, MirrorError>> {
        let mirror = self.shared_from(from)?;
        Some(mirror.deployment_dau(from, to).await)
    }

    /// The deployment's cohorts: `None` when Redis is off or the windows
    /// reach outside the days instances share; `Ok(None)` when a day has
    /// too many users for them to be exact.
    async fn deployment_retention(
        &self,
        start: i32,
        windows: u32,
        days: i32,
    ) -> Option<Result<Option<Vec<Cohort>>, MirrorError>> {
        let mirror = self.shared_from(start)?;
        let end = start + windows as i32 * days - 1;
        if end > analytics::day_of(now_ms()) + 1 {
            return None;
        }
        Some(mirror.deployment_retention(start, windows, days).await)
    }

    /// The deployment's trend over `from..=to` widened to whole periods,
    /// with whether each period's users are exact: `None` when Redis is
    /// off or the periods reach past the days instances share; an error
    /// when Redis or the store could not be read.
    async fn deployment_trend(
        &self,
        from: i32,
        to: i32,
        interval: Interval,
        event_type: Option<String>,
        sum: Option<String>,
    ) -> Option<Result<(Trend, Vec<bool>), String>> {
        let periods = analytics::periods(from, to, interval);
        let (first, last) = match (periods.first(), periods.last()) {
            (Some(f), Some(l)) => (f.0, l.1),
            _ => (from, to),
        };
        let mirror = self.shared_from(first)?;
        let figures = self
            .deployment_days(mirror, first, last, sum.is_some())
            .await;
        let users = match &figures {
            Ok(_) => mirror
                .deployment_period_users(&periods, event_type.as_deref())
                .await
                .map_err(|e| e.to_string()),
            Err(_) => Ok(Vec::new()),
        };
        let (figures, users) = match (figures, users) {
            (Ok(figures), Ok(users)) => (figures, users),
            (Err(e), _) | (_, Err(e)) => return Some(Err(e)),
        };
        let counts: Vec<u64> = users.iter().map(|(n, _)| *n).collect();
        let trend = analytics::trend_of(
            interval,
            (from, to),
            &periods,
            &figures.trend_days(event_type.as_deref(), sum.as_deref()),
            &counts,
            event_type.as_deref(),
            sum.as_deref(),
        );
        Some(Ok((
            trend,
            users.into_iter().map(|(_, exact)| exact).collect(),
        )))
    }

    /// The deployment's top events over `from..=to`: `None` when Redis is
    /// off or the range reaches past what instances publish
    /// (`shared_days`); an error when Redis could not be read.
    async fn deployment_top_events(
        &self,
        from: i32,
        to: i32,
        limit: usize,
        sum: Option<&str>,
        by: RankBy,
    ) -> Option<Result<Vec<TypeCount>, String>> {
        let mirror = self.shared_from(from)?;
        Some(
            self.deployment_days(mirror, from, to, sum.is_some())
                .await
                .map(|figures| figures.top(sum, by, limit)),
        )
    }

    /// Every instance's counts (and sums, when `sums`) of the days
    /// `from..=to`: this instance's read from its store now.
    async fn deployment_days(
        &self,
        mirror: &Mirror,
        from: i32,
        to: i32,
        sums: bool,
    ) -> Result<DayFigures, String> {
        let own = blocking(&self.context.storage, move |s| {
            analytics::day_figures(s, from, to, sums)
        })
        .await
        .map_err(|e| e.to_string())?;
        mirror
            .deployment_days(own, from, to, sums)
            .await
            .map_err(|e| e.to_string())
    }

    /// Lists DLQ entries after `after`.
    pub async fn dlq_list(&self, after: u64, limit: usize) -> Result<Vec<DlqItem>, String> {
        ask(&self.context.names, DLQ, |reply| DlqMsg::List {
            after,
            limit,
            reply,
        })
        .await
        .unwrap_or_else(|| Err(unavailable()))
    }

    /// One DLQ entry.
    pub async fn dlq_get(&self, id: u64) -> Result<Option<DlqItem>, String> {
        ask(&self.context.names, DLQ, |reply| DlqMsg::Get { id, reply })
            .await
            .unwrap_or_else(|| Err(unavailable()))
    }

    /// Replays DLQ entries into the queue.
    pub async fn dlq_replay(
        &self,
        ids: Option<Vec<u64>>,
        limit: usize,
    ) -> Result<ReplayReport, String> {
        ask(&self.context.names, DLQ, |reply| DlqMsg::Replay {
            ids,
            limit,
            reply,
        })
        .await
        .unwrap_or_else(|| Err(unavailable()))
    }

    /// Deletes DLQ entries.
    pub async fn dlq_remove(&self, ids: Option<Vec<u64>>) -> Result<usize, String> {
        ask(&self.context.names, DLQ, |reply| DlqMsg::Remove {
            ids,
            reply,
        })
        .await
        .unwrap_or_else(|| Err(unavailable()))
    }

    /// Processes what the WAL holds, waiting at most `deadline`. True when
    /// the queue was caught up in time.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let Some(batcher) = self.context.names.find(BATCHER) else {
            return false;
        };
        matches!(
            batcher.call(BatcherMsg::Drain, Some(deadline)).await,
            Ok(ractor::rpc::CallResult::Success(()))
        )
    }
}

fn unavailable() -> String {
    "the DLQ actor is restarting; retry shortly".into()
}
