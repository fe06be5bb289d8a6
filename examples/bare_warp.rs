//! The HTTP ceiling: a warp server that reads each POST body and answers
//! `202 {"status":"accepted"}` without any other work, served by the same
//! accept loop and hyper settings as inletd (`inletd::http::server::serve`)
//! on the same kind of runtime (tokio multi-thread, one worker per core)
//! and the same allocator (`inletd::allocator`).
//!
//! With `--group-fsync DIR` it is the durable ceiling instead: each body
//! is appended to one file in DIR and answered only once that file is
//! synced, with a group commit like inletd's (a writer thread takes every
//! request waiting as one group, writes it, `fdatasync`s once, answers it,
//! and takes the next; inletd also caps a group at 1000 events). No parsing, idempotency, store, actors or analytics:
//! what HTTP plus one sync per group costs on the machine, the floor
//! under inletd's `durability = "fsync"`.
//!
//! ```sh
//! cargo build --release --examples
//! target/release/examples/bare_warp --bind 127.0.0.1:5099 [--group-fsync DIR]
//! ```
//!
//! Prints `{"addr":"…"}` on stdout once listening (`--bind 127.0.0.1:0`
//! picks a free port), then serves until killed.

use std::ffi::c_char;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use warp::http::StatusCode;
use warp::{Filter, Reply};

/// inletd's allocator, so that the ceiling differs from it only in the work.
#[global_allocator]
static ALLOCATOR: inletd::allocator::Jemalloc = inletd::allocator::Jemalloc;

/// inletd's jemalloc settings.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&c_char> = inletd::allocator::MALLOC_CONF;

/// What the command line asked for.
struct Args {
    /// Where to listen.
    bind: String,
    /// With `--group-fsync`: the directory of the file bodies are synced to.
    group_fsync: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        bind: "127.0.0.1:5099".to_owned(),
        group_fsync: None,
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bind" => parsed.bind = args.next().context("--bind needs ADDR")?,
            "--port" => {
                parsed.bind = format!("127.0.0.1:{}", args.next().context("--port needs PORT")?)
            }
            "--group-fsync" => {
                parsed.group_fsync = Some(args.next().context("--group-fsync needs DIR")?.into())
            }
            "-h" | "--help" => {
                println!(
                    "bare_warp [--bind ADDR | --port PORT] [--group-fsync DIR]   (default 127.0.0.1:5099)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(parsed)
}

/// Bodies waiting to be synced, each with the sender its answer waits on.
type Waiting = Vec<(bytes::Bytes, tokio::sync::oneshot::Sender<()>)>;

/// inletd's group commit (`pipeline::deduper::Lane`) over a plain file.
struct Lane {
    /// The bodies waiting, and whether a writer thread is running.
    queue: Mutex<(Waiting, bool)>,
    /// The file every group is appended to (by one writer at a time).
    file: File,
}

impl Lane {
    /// Queues a body for the next group, and starts a writer thread unless
    /// one runs.
    fn push(self: &Arc<Self>, body: bytes::Bytes, done: tokio::sync::oneshot::Sender<()>) {
        let start = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.0.push((body, done));
            !std::mem::replace(&mut queue.1, true)
        };
        if start {
            let lane = self.clone();
            tokio::task::spawn_blocking(move || lane.write_groups());
        }
    }

    /// Writes, syncs and answers group after group until none waits.
    fn write_groups(&self) {
        loop {
            let group = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if queue.0.is_empty() {
                    queue.1 = false;
                    return;
                }
                std::mem::take(&mut queue.0)
            };
            // A group that panicked still ends (its requests are answered
            // 503 as their senders drop), and the writer goes on.
            let _ =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.write_group(group)));
        }
    }

    /// Appends one group, syncs it and answers it; a failed write or sync
    /// drops the group's senders, and its requests are answered 503.
    fn write_group(&self, group: Waiting) {
        let mut bytes = Vec::with_capacity(group.iter().map(|(body, _)| body.len()).sum());
        for (body, _) in &group {
            bytes.extend_from_slice(body);
        }
        let mut file = &self.file;
        match file.write_all(&bytes).and_then(|()| file.sync_data()) {
            Ok(()) => {
                for (_, done) in group {
                    let _ = done.send(());
                }
            }
            Err(e) => eprintln!("bare_warp: a group of {} failed: {e}", group.len()),
        }
    }
}

/// The answer to a body taken (and, with `--group-fsync`, synced).
fn accepted() -> warp::reply::Response {
    warp::reply::with_status(
        warp::reply::json(&serde_json::json!({ "status": "accepted" })),
        StatusCode::ACCEPTED,
    )
    .into_response()
}

fn main() -> anyhow::Result<()> {
    let Args { bind, group_fsync } = args()?;
    let lane = match group_fsync {
        Some(dir) => {
            let path = dir.join("bare_warp.log");
            let file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            Some(Arc::new(Lane {
                queue: Mutex::new((Vec::new(), false)),
                file,
            }))
        }
        None => None,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .with_context(|| format!("binding {bind}"))?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::json!({ "addr": addr.to_string() }))?;
            out.flush()?;
        }
        let post = || warp::post().and(warp::body::bytes());
        let routes = match lane {
            None => post().map(|_body: bytes::Bytes| accepted()).boxed(),
            Some(lane) => post()
                .then(move |body: bytes::Bytes| {
                    let (done, synced) = tokio::sync::oneshot::channel();
                    lane.push(body, done);
                    async move {
                        match synced.await {
                            Ok(()) => accepted(),
                            Err(_) => warp::reply::with_status(
                                warp::reply::json(&serde_json::json!({ "status": "unavailable" })),
                                StatusCode::SERVICE_UNAVAILABLE,
                            )
                            .into_response(),
                        }
                    }
                })
                .boxed(),
        };
        inletd::http::server::serve(
            listener,
            routes,
            inletd::http::server::Limits {
                header_read_timeout: Duration::from_secs(10),
                max_connections: 1024,
            },
            std::future::pending::<()>(),
        )
        .await;
        Ok(())
    })
}
