//! Supervisor: starts every actor linked to itself, restarts one that fails
//! (with exponential backoff), and gives up — stopping itself, so that the
//! daemon exits non-zero and systemd restarts it — once
//! `max_restarts_per_minute` restarts happened within `RESTART_WINDOW`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};

use super::batcher::Batcher;
use super::deduper::Deduper;
use super::dlq::Dlq;
use super::messages::{BatcherMsg, Observation};
use super::metrics::Metrics;
use super::processor::Processor;
use super::receiver::Receiver;
use super::{BATCHER, Context, DEDUPER, DLQ, METRICS, PROCESSOR, RECEIVER, Role};

/// The window the budget applies to.
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Children in start order: consumers before producers.
const ROLES: [&str; 6] = [
    METRICS.name,
    DLQ.name,
    PROCESSOR.name,
    BATCHER.name,
    DEDUPER.name,
    RECEIVER.name,
];

/// The Supervisor actor.
pub struct Supervisor;

/// The supervisor takes no messages of its own; it acts on supervision events.
pub enum SupervisorMsg {}

/// Supervisor state.
pub struct State {
    /// What the children are started with.
    context: Arc<Context>,
    /// When recent restarts happened (within `RESTART_WINDOW`).
    restarts: VecDeque<Instant>,
}

/// The Supervisor starts from the pipeline context.
pub type Arguments = Arc<Context>;

/// Starts the actor playing `role`, linked to the supervisor.
async fn spawn_child(
    role: &str,
    context: &Arc<Context>,
    supervisor: ActorCell,
) -> Result<(), SpawnErr> {
    match role {
        r if r == METRICS.name => spawn(Metrics, METRICS, context, supervisor).await,
        r if r == DLQ.name => spawn(Dlq, DLQ, context, supervisor).await,
        r if r == PROCESSOR.name => spawn(Processor, PROCESSOR, context, supervisor).await,
        r if r == BATCHER.name => spawn(Batcher, BATCHER, context, supervisor).await,
        r if r == DEDUPER.name => spawn(Deduper, DEDUPER, context, supervisor).await,
        r if r == RECEIVER.name => spawn(Receiver, RECEIVER, context, supervisor).await,
        other => Err(SpawnErr::StartupFailed(
            format!("no actor has the role `{other}`").into(),
        )),
    }
}

/// Starts `actor` under its role's name: every actor starts from the
/// pipeline context.
async fn spawn<A: Actor<Arguments = Arc<Context>>>(
    actor: A,
    role: Role<A::Msg>,
    context: &Arc<Context>,
    supervisor: ActorCell,
) -> Result<(), SpawnErr> {
    let name = Some(context.names.of(role.name));
    Actor::spawn_linked(name, actor, context.clone(), supervisor)
        .await
        .map(drop)
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = State;
    type Arguments = Arguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        context: Arguments,
    ) -> Result<State, ActorProcessingErr> {
        for role in ROLES {
            spawn_child(role, &context, myself.get_cell()).await?;
        }
        Ok(State {
            context,
            restarts: VecDeque::new(),
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped: {}", reason.unwrap_or_default()))
            }
            _ => return Ok(()),
        };
        let name = cell.get_name().unwrap_or_default();
        let Some(role) = ROLES.iter().find(|r| state.context.names.of(r) == name) else {
            return Ok(());
        };
        tracing::error!(actor = role, error = %why, "actor failed; restarting it");
        loop {
            let now = Instant::now();
            while state
                .restarts
                .front()
                .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
            {
                state.restarts.pop_front();
            }
            let budget = state.context.live().config.max_restarts_per_minute;
            if state.restarts.len() >= budget {
                tracing::error!(
                    budget,
                    window_secs = RESTART_WINDOW.as_secs(),
                    "restart budget exhausted; stopping so the service manager restarts inletd"
                );
                myself.stop(Some("restart budget exhausted".into()));
                return Ok(());
            }
            let delay = Duration::from_millis(50 << state.restarts.len().min(6));
            state.restarts.push_back(now);
            tokio::time::sleep(delay).await;
            match spawn_child(role, &state.context, myself.get_cell()).await {
                Ok(()) => break,
                Err(e) => tracing::error!(actor = role, error = %e, "restart failed"),
            }
        }
        state
            .context
            .names
            .observe(Observation::Restart { actor: role });
        // The batch a failed Processor held is re-read from the ack cursor.
        // No other restart loses one: a Reset then would hand the running
        // Processor's batch out again, and the sinks would get it twice.
        if *role == PROCESSOR.name {
            state.context.names.cast(BATCHER, BatcherMsg::Reset);
        }
        Ok(())
    }
}
