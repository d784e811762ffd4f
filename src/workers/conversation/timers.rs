//! The conversation role's timer loop: offers and consultant invitations that lapsed become
//! `AgentRejected` (TIMEOUT), queued conversations are offered again, idle async chats get a
//! notice and then close, live chats whose customer vanished close, each as an event keyed by
//! its conversation so
//! the conversation's handler applies it in order. Every worker instance runs the loop; a due
//! timer is leased to exactly one of them (the store's `claim_due`) and completed after its
//! action, so a worker dying in between delays the timer by the lease, never loses it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument};

use super::flow::{
    idle_close_at, secs_ms, ABANDON_TIMER, BOT_TIMER, CONSULT_TIMER, IDLE_CLOSE_TIMER, IDLE_TIMER,
    OFFER_TIMER, QUEUED_TIMER,
};
use super::{ConversationWorker, AGENT_TOPIC, INBOUND_TOPIC};
use crate::bus::consumer::HandleError;
use crate::events::chat::{self as ev, derived_id};
use crate::events::Event;
use crate::stores::session::{customer_mark, timer_lease_until, ConversationState, Timer};
use crate::telemetry::metrics as m;

const CLAIM_BATCH: usize = 100;
/// A published bot turn's timer comes back this late (the handler moves it sooner).
const BOT_TURN_AGAIN_MS: i64 = 60_000;

/// Runs until `stop`.
pub async fn run(worker: Arc<ConversationWorker>, stop: CancellationToken) {
    let every = Duration::from_millis(worker.config.timer_interval_ms.max(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        fire_due(&worker, chrono::Utc::now().timestamp_millis(), &stop).await;
    }
}

/// [`fire_due`] with no stop (tests).
#[cfg(test)]
pub(super) async fn run_once(worker: &ConversationWorker, now: i64) {
    fire_due(worker, now, &CancellationToken::new()).await;
}

/// Claims and fires every timer due at `now`, kind by kind, until `stop`: a pass over many
/// timers (each may publish) must not hold a stopping process past its grace. Timers claimed
/// and not fired by then go back due at once, for another pod, rather than after their lease.
pub(super) async fn fire_due(worker: &ConversationWorker, now: i64, stop: &CancellationToken) {
    for kind in [
        OFFER_TIMER,
        QUEUED_TIMER,
        IDLE_TIMER,
        IDLE_CLOSE_TIMER,
        CONSULT_TIMER,
        ABANDON_TIMER,
        BOT_TIMER,
    ] {
        let span = info_span!("timers", kind);
        async {
                match worker.store.claim_due(kind, now, CLAIM_BATCH).await {
                    Ok(due) => {
                        for (i, timer) in due.iter().enumerate() {
                            if stop.is_cancelled() {
                                for rest in &due[i..] {
                                    let _ = worker.store.schedule(rest, now).await;
                                }
                                break;
                            }
                            metrics::counter!(m::TIMERS_FIRED_TOTAL, "kind" => kind).increment(1);
                            match fire(worker, timer, now).await {
                                // Done: end the lease (a timer the action moved stays moved).
                                Ok(()) => {
                                    if let Err(e) = worker.store.complete_timer(timer, now).await {
                                        // It fires again after the lease; actions are idempotent.
                                        warn!(error = %e, conversation_id = %timer.id, "cannot complete a fired timer");
                                    }
                                }
                                Err(e) => {
                                    // Not acted on: due again soon rather than after the lease.
                                    warn!(error = %e, conversation_id = %timer.id, "timer failed; retried");
                                    metrics::counter!(m::TIMER_ERRORS_TOTAL, "kind" => kind).increment(1);
                                    let _ = worker.store.schedule(timer, now.saturating_add(1_000)).await;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        metrics::counter!(m::TIMER_ERRORS_TOTAL, "kind" => kind).increment(1);
                        warn!(error = %e, "cannot claim due timers");
                    }
                }
            }
            .instrument(span)
            .await;
        if stop.is_cancelled() {
            return;
        }
    }
}

/// Where a firing timer moves itself to (`due`), never onto the lease its claim at `now` set:
/// completing the firing removes a timer still at that value, which would lose the move.
pub(super) fn moved(now: i64, due: i64) -> i64 {
    if due == timer_lease_until(now) {
        // At the end of time (a lease saturated), the other side of it.
        due.checked_add(1).unwrap_or(due - 1)
    } else {
        due
    }
}

async fn fire(worker: &ConversationWorker, timer: &Timer, now: i64) -> Result<(), HandleError> {
    let Some(c) = worker
        .store
        .conversation(&timer.tenant_id, &timer.id)
        .await
        .map_err(super::store_failed)?
    else {
        return Ok(());
    };
    match timer.kind.as_str() {
        kind @ (OFFER_TIMER | CONSULT_TIMER) => {
            let (agent, offer) = if kind == OFFER_TIMER {
                (&c.offered_to, &c.routing.offer_id)
            } else {
                (&c.routing.consult_invited, &c.routing.consult_offer_id)
            };
            let (Some(agent), Some(offer)) = (agent, offer) else {
                return Ok(());
            };
            if kind == OFFER_TIMER && c.state != ConversationState::Offered {
                return Ok(());
            }
            let expires_at = if kind == OFFER_TIMER {
                c.routing.offer_expires_at_ms
            } else {
                c.routing.consult_expires_at_ms
            };
            if let Some(at) = expires_at.filter(|at| now < *at) {
                // Armed for an earlier offer or invitation (a reject and a new one came in
                // between): the current one has its own time.
                return worker
                    .store
                    .schedule(timer, moved(now, at))
                    .await
                    .map_err(super::store_failed);
            }
            let body = ev::AgentRejected {
                offer_id: offer.clone(),
                agent_id: agent.clone(),
                reason: ev::RejectReason::Timeout,
            };
            // The id derives from the offer: a timer fired twice rejects once.
            let source = derived_id(&uuid::Uuid::NAMESPACE_OID, offer);
            let event = Event::typed(&body, &c.tenant_id, &c.conversation_id, super::PRODUCER)
                .map_err(|e| HandleError::Retry(e.to_string()))?
                .with_derived_id(&source, "timeout");
            crate::events::publish::publish(worker.bus.as_ref(), AGENT_TOPIC, &event)
                .await
                .map_err(|e| HandleError::Retry(e.to_string()))?;
        }
        QUEUED_TIMER if c.state == ConversationState::Queued => {
            // A synthetic source whose id names this wait (the conversation and its offers so
            // far): a firing again, or a replay, publishes the same offers under the same ids.
            let wait = format!("queued/{}/{}", c.conversation_id, c.routing.offers);
            let source = Event::new(
                "Timer",
                c.tenant_id.clone(),
                c.conversation_id.clone(),
                super::PRODUCER,
                Default::default(),
            )
            .with_derived_id(&uuid::Uuid::NAMESPACE_OID, &wait);
            worker.dispatch(&c, &source, now).await?;
            // Again later while it still waits (an offer published now may yet fail to apply).
            let due = now
                .saturating_add(i64::try_from(worker.config.requeue_interval_ms).unwrap_or(1_000));
            worker
                .store
                .schedule(timer, moved(now, due))
                .await
                .map_err(super::store_failed)?;
        }
        QUEUED_TIMER if c.state == ConversationState::Offered => {
            // A re-queue (a reject, a lapse) schedules this timer before it saves the record
            // Queued: fired in between, it must come again rather than end, or the waiter
            // would be offered only when another dispatch happens to walk to it.
            let due = now
                .saturating_add(i64::try_from(worker.config.requeue_interval_ms).unwrap_or(1_000));
            worker
                .store
                .schedule(timer, moved(now, due))
                .await
                .map_err(super::store_failed)?;
        }
        BOT_TIMER if c.state == ConversationState::Bot => {
            let (Some(bot), Some(pending)) = (&c.bot_id, &c.routing.bot_pending) else {
                return Ok(());
            };
            let body = ev::BotTurnDue {
                bot_id: bot.clone(),
                position: i64::try_from(pending.position).unwrap_or(i64::MAX),
                attempt: i32::try_from(pending.attempt).unwrap_or(i32::MAX),
            };
            // Again later unless the turn's handler moves it first (a try that failed, the
            // next message): a turn that was never applied (dead-lettered by a pod older
            // than the event) is published again. Moved before publishing, so the handler's
            // own schedule comes after this one.
            worker
                .store
                .schedule(timer, moved(now, now.saturating_add(BOT_TURN_AGAIN_MS)))
                .await
                .map_err(super::store_failed)?;
            // The id names the message and the try: a timer fired twice publishes one turn.
            let what = format!(
                "{}/bot-turn/{}/{}",
                c.conversation_id, pending.position, pending.attempt
            );
            let event = Event::typed(&body, &c.tenant_id, &c.conversation_id, super::PRODUCER)
                .map_err(|e| HandleError::Retry(e.to_string()))?
                .with_derived_id(&uuid::Uuid::NAMESPACE_OID, &what);
            crate::events::publish::publish(worker.bus.as_ref(), AGENT_TOPIC, &event)
                .await
                .map_err(|e| HandleError::Retry(e.to_string()))?;
        }
        IDLE_TIMER if c.state != ConversationState::Closed => {
            // Saturating: the record's last activity came from event times (or from a record
            // saved before they were checked); a wrapped sum would be long past, and the chat
            // noticed and closed as idle while its customer is there.
            let idle_at = c
                .last_activity_ms
                .saturating_add(secs_ms(worker.config.idle_timeout_s));
            if now < idle_at {
                // The customer came back since: wait for the new idle time.
                return worker
                    .store
                    .schedule(timer, moved(now, idle_at))
                    .await
                    .map_err(super::store_failed);
            }
            let grace = worker.config.close_grace_s;
            let body = ev::MessageSent {
                message_id: derived_id(
                    &seed(&c.conversation_id, c.last_activity_ms),
                    "idle-notice",
                )
                .to_string(),
                participant_id: "system".into(),
                participant_kind: ev::ParticipantKind::System,
                nickname: "system".into(),
                agent_id: None,
                kind: ev::MessageKind::Notice,
                text: Some(format!(
                    "This chat has been idle; it closes in {} minutes unless you reply.",
                    grace.div_ceil(60)
                )),
                media_ids: Vec::new(),
                in_reply_to: None,
                transcript_position: None,
                visibility: ev::Visibility::All,
            };
            // Ids derive from the idle period, so a timer fired twice notifies once.
            let event = Event::typed(&body, &c.tenant_id, &c.conversation_id, super::PRODUCER)
                .map_err(|e| HandleError::Retry(e.to_string()))?
                .with_derived_id(&seed(&c.conversation_id, c.last_activity_ms), "idle");
            crate::events::publish::publish(worker.bus.as_ref(), AGENT_TOPIC, &event)
                .await
                .map_err(|e| HandleError::Retry(e.to_string()))?;
            let close = Timer {
                kind: IDLE_CLOSE_TIMER.into(),
                ..timer.clone()
            };
            worker
                .store
                .schedule(&close, idle_at.saturating_add(secs_ms(grace)))
                .await
                .map_err(super::store_failed)?;
        }
        IDLE_CLOSE_TIMER if c.state != ConversationState::Closed => {
            let close_at = idle_close_at(
                c.last_activity_ms,
                worker.config.idle_timeout_s,
                worker.config.close_grace_s,
            );
            if now < close_at {
                return Ok(()); // the customer came back; their activity re-armed the idle timer
            }
            let body = ev::ParticipantLeft {
                participant_id: c.customer.participant_id.clone(),
                participant_kind: ev::ParticipantKind::Customer,
                nickname: Some(c.customer.nickname.clone()),
                reason: ev::LeftReason::Timeout,
                transcript_position: None,
                visibility: ev::Visibility::All,
            };
            let event = Event::typed(&body, &c.tenant_id, &c.conversation_id, super::PRODUCER)
                .map_err(|e| HandleError::Retry(e.to_string()))?
                .with_derived_id(&seed(&c.conversation_id, c.last_activity_ms), "idle-close");
            crate::events::publish::publish(worker.bus.as_ref(), INBOUND_TOPIC, &event)
                .await
                .map_err(|e| HandleError::Retry(e.to_string()))?;
        }
        ABANDON_TIMER if c.state != ConversationState::Closed && !c.routing.is_async => {
            let timeout = secs_ms(worker.config.abandon_timeout_s);
            let mark = customer_mark(&c.tenant_id, &c.conversation_id);
            if timeout == 0
                || worker
                    .store
                    .seen(&mark)
                    .await
                    .map_err(super::store_failed)?
            {
                if timeout > 0 {
                    // The mark lapses a timeout after the customer's last sign of life, a
                    // quarter more at most (see the edge's `presence`): looking again every
                    // quarter, a chat closes at most 1.5 timeouts after it.
                    let due = now.saturating_add((timeout / 4).max(1_000));
                    worker
                        .store
                        .schedule(timer, moved(now, due))
                        .await
                        .map_err(super::store_failed)?;
                }
                return Ok(());
            }
            let body = ev::ParticipantLeft {
                participant_id: c.customer.participant_id.clone(),
                participant_kind: ev::ParticipantKind::Customer,
                nickname: Some(c.customer.nickname.clone()),
                reason: ev::LeftReason::Disconnected,
                transcript_position: None,
                visibility: ev::Visibility::All,
            };
            // A chat is abandoned once (it closes): the id derives from the conversation, so
            // a timer fired twice closes it once.
            let source = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("{}/abandoned", c.conversation_id).as_bytes(),
            );
            let event = Event::typed(&body, &c.tenant_id, &c.conversation_id, super::PRODUCER)
                .map_err(|e| HandleError::Retry(e.to_string()))?
                .with_derived_id(&source, "abandoned");
            crate::events::publish::publish(worker.bus.as_ref(), INBOUND_TOPIC, &event)
                .await
                .map_err(|e| HandleError::Retry(e.to_string()))?;
        }
        _ => {}
    }
    Ok(())
}

/// A stable id seed of one idle period of a conversation.
fn seed(conversation_id: &str, last_activity_ms: i64) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("{conversation_id}/idle/{last_activity_ms}").as_bytes(),
    )
}
