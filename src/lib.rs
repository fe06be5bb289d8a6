//! inletd: a durable webhook-intake daemon for one VM.
//!
//! ```text
//! HTTP (warp) ─► Receiver ─► Deduper ─► WAL (sled) ─► Batcher ─► Processor ─► sinks
//!                                │                                  │
//!                                └── 202 after durable commit       └─► DLQ
//! Metrics ◄── every actor reports counters and latencies
//! Supervisor: owns all of them, restarts a failed child, orders the drain
//! ```
//!
//! | module       | holds |
//! |--------------|-------|
//! | [`allocator`]| the daemon's allocator, jemalloc, and its settings: large buffers in an arena that gives memory back |
//! | [`analytics`]| the aggregates (DAU, top events, cohorts, rolling windows), the `/stats` queries parsed and checked (`query`) and answered, over the key-value traits it owns (`KvRead`, `KvWrite`) |
//! | [`cli`]      | the command line (args), its man pages and completions (assets, rendered from args), and the client subcommands: import, stats, demo, dlq (they talk to a running daemon over HTTP) |
//! | [`config`]   | settings: defaults, TOML file, `INLETD_*` environment, flags; validation |
//! | [`event`]    | events, their validation, the WAL record |
//! | [`storage`]  | the `Storage` trait, its design (layout, invariants, flushing), sled and memory stores; they implement analytics' traits and apply its aggregates in their transactions (storage → analytics, never back) |
//! | [`pipeline`] | the supervised actors and their messages, [`pipeline::Pipeline`], the one handle HTTP and `app` use: admission, queries, calls to actors; and the takeover task (delivers what a stopped instance of the deployment left) |
//! | [`process`]  | the standard `process_*` metrics (from `/proc`) and `inletd_build_info` |
//! | [`sinks`]    | forwarding sinks (HTTP, file, Redis stream) |
//! | [`mirror`]   | the Redis a deployment of several instances shares: idempotency keys, figures, DAU, each instance's queue mirrored for a takeover (`handoff`) |
//! | [`http`]     | warp routes, thin handlers (ingest, admin, stats), the JSON answer shapes, the error type, the accept loop; it sees only the `Pipeline` |
//! | [`app`]      | start-up wiring and the shutdown sequence |
//! | [`ratelimit`]| the per-source token bucket |
//! | [`shutdown`] | signal handling |
//! | [`signature`]| webhook signature schemes (Standard Webhooks, GitHub, Stripe) |

pub mod allocator;
pub mod analytics;
pub mod app;
pub mod cli;
pub mod config;
pub mod event;
pub mod http;
pub mod mirror;
pub mod pipeline;
pub mod process;
pub mod ratelimit;
pub mod shutdown;
pub mod signature;
pub mod sinks;
pub mod storage;
pub mod transform;
