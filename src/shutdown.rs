//! Signals: the first SIGTERM or SIGINT starts the drain; a second one
//! exits at once (everything answered 202 is already in the WAL).

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::oneshot;

/// Exit code after a second signal cut the drain short.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Installs the handlers; the returned receiver completes on the first
/// signal. Must be called inside the runtime.
pub fn on_signal() -> std::io::Result<oneshot::Receiver<()>> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let Some(first) = signals.next().await else {
            return;
        };
        tracing::info!(
            signal = first,
            "signal received: draining (send it again to exit at once)"
        );
        let _ = tx.send(());
        if let Some(second) = signals.next().await {
            tracing::warn!(
                signal = second,
                "second signal: exiting now; the queue keeps what was accepted"
            );
            std::process::exit(FORCED_EXIT_CODE);
        }
    });
    Ok(rx)
}
