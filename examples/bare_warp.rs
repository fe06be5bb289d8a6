//! The HTTP ceiling: a warp server that reads each POST body and answers
//! `202 {"status":"accepted"}` without any other work, served by the same
//! accept loop and hyper settings as inletd (`inletd::http::server::serve`)
//! on the same kind of runtime (tokio multi-thread, one worker per core)
//! and the same allocator (`inletd::allocator`).
//!
//! ```sh
//! cargo build --release --examples
//! target/release/examples/bare_warp --bind 127.0.0.1:5099
//! ```
//!
//! Prints `{"addr":"…"}` on stdout once listening (`--bind 127.0.0.1:0`
//! picks a free port), then serves until killed.

use std::ffi::c_char;
use std::io::Write;
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

fn bind_arg() -> anyhow::Result<String> {
    let mut args = std::env::args().skip(1);
    let mut bind = "127.0.0.1:5099".to_owned();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bind" => bind = args.next().context("--bind needs ADDR")?,
            "--port" => bind = format!("127.0.0.1:{}", args.next().context("--port needs PORT")?),
            "-h" | "--help" => {
                println!("bare_warp [--bind ADDR | --port PORT]   (default 127.0.0.1:5099)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(bind)
}

fn main() -> anyhow::Result<()> {
    let bind = bind_arg()?;
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
        let routes = warp::post()
            .and(warp::body::bytes())
            .map(|_body: bytes::Bytes| {
                warp::reply::with_status(
                    warp::reply::json(&serde_json::json!({ "status": "accepted" })),
                    StatusCode::ACCEPTED,
                )
                .into_response()
            })
            .boxed();
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
