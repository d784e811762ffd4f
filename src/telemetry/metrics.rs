//! Every metric nexus exports, with its description; names follow Prometheus conventions and
//! labels are bounded sets (topic, partition, group, outcome, reason, route template).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Events behind the log end, per `topic`, `partition`, `group`; updated on a timer.
pub const CONSUMER_LAG: &str = "nexus_consumer_lag";
/// Failed lag measurements per `topic`, `group`.
pub const CONSUMER_LAG_ERRORS_TOTAL: &str = "nexus_consumer_lag_errors_total";
/// Events taken from the bus by a consumer, per `topic`, `group`, `outcome` (ok, retried, dead_lettered).
pub const EVENTS_CONSUMED_TOTAL: &str = "nexus_events_consumed_total";
/// Time from delivery to ack, per `topic`, `group`.
pub const EVENT_HANDLE_SECONDS: &str = "nexus_event_handle_seconds";
/// Records the bus acknowledged, per `topic`.
pub const EVENTS_PUBLISHED_TOTAL: &str = "nexus_events_published_total";
/// Publishes the bus refused or did not acknowledge, per `topic`.
pub const BUS_PUBLISH_ERRORS_TOTAL: &str = "nexus_bus_publish_errors_total";
/// Embedded-log retention passes that could not trim a partition (a corrupt record), per
/// `topic`.
pub const BUS_RETENTION_ERRORS_TOTAL: &str = "nexus_bus_retention_errors_total";
/// Publish latency until the broker's ack, per `topic`.
pub const BUS_PUBLISH_SECONDS: &str = "nexus_bus_publish_seconds";
/// Connection flushes that made JetStream acks durable on the socket (acks waiting together
/// share one), per `outcome` (ok, failed).
pub const BUS_ACK_FLUSHES_TOTAL: &str = "nexus_bus_ack_flushes_total";
/// Events written to a dead-letter topic, per `topic`, `group`, `reason`.
pub const EVENTS_DEAD_LETTERED_TOTAL: &str = "nexus_events_dead_lettered_total";
/// HTTP requests, per `method`, `route` (template), `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "nexus_http_requests_total";
/// HTTP request latency, per `method`, `route`.
pub const HTTP_REQUEST_SECONDS: &str = "nexus_http_request_duration_seconds";
/// 1 while the bus answers, 0 otherwise (readiness probe result).
pub const BUS_UP: &str = "nexus_bus_up";
/// Kafka producers replaced after a fatal error, per `code` (librdkafka's).
pub const BUS_PRODUCER_RECREATED_TOTAL: &str = "nexus_bus_producer_recreated_total";
/// Kafka consumer errors librdkafka recovers from by itself, per `reader` (member, tail) and
/// `code`.
pub const BUS_CONSUMER_ERRORS_TOTAL: &str = "nexus_bus_consumer_errors_total";
/// Calls to bot endpoints, per `outcome` (ok, failed, throttled: a 429).
pub const BOT_CALLS_TOTAL: &str = "nexus_bot_calls_total";
/// WebSockets dropped because the client answered no ping for three intervals.
pub const WS_SILENT_CLOSED_TOTAL: &str = "nexus_ws_silent_closed_total";
/// Fields of another op an agent WebSocket request carried, ignored (label: the field).
pub const AGENT_WS_FIELDS_IGNORED_TOTAL: &str = "nexus_agent_ws_fields_ignored_total";
/// Conversation timers that fired (offer timeouts, queue retries), per `kind`.
pub const TIMERS_FIRED_TOTAL: &str = "nexus_conversation_timers_fired_total";
/// Timer claims or actions that failed, per `kind`.
pub const TIMER_ERRORS_TOTAL: &str = "nexus_conversation_timer_errors_total";
/// Expired chat files whose bytes the sweeper emptied.
pub const CHAT_FILES_EXPIRED_TOTAL: &str = "nexus_chat_files_expired_total";
/// Times a customer stream fell behind the edge's live buffer and caught up from the store.
pub const CHAT_STREAMS_LAGGED_TOTAL: &str = "nexus_chat_streams_lagged_total";

/// Calls to peer systems (UCS, GWS), per `role`, `peer`, `outcome` (ok, failed, timeout, rejected,
/// paused: refused unsent while the target's circuit is open).
pub const PEER_CALLS_TOTAL: &str = "nexus_peer_calls_total";
/// Latency of calls to peer systems, per `role`, `peer`.
pub const PEER_CALL_SECONDS: &str = "nexus_peer_call_duration_seconds";
/// 1 while a role waits for a failing peer instead of consuming, per `role`, `peer`.
pub const WORKER_PAUSED: &str = "nexus_worker_paused";
/// Events the history worker handled, per `event` (started, entry, closed) and `outcome`
/// (applied, duplicate, skipped = tenant without UCS).
pub const HISTORY_EVENTS_TOTAL: &str = "nexus_history_events_total";
/// Chat file attachments at close, per `outcome` (added, missing = expired or deleted).
pub const HISTORY_ATTACHMENTS_TOTAL: &str = "nexus_history_attachments_total";
/// GWS operations of the gws role by `operation` and `outcome` (applied, reconciled,
/// duplicate, rejected, skipped).
pub const GWS_OPERATIONS_TOTAL: &str = "nexus_gws_operations_total";
/// Events put in a role's retry backlog, per `role` and `reason` (failed: its call failed;
/// behind: an earlier event of its conversation was waiting there).
pub const BACKLOG_QUEUED_TOTAL: &str = "nexus_backlog_queued_total";
/// Tries of backlogged events, per `role` and `outcome` (applied, retried, dead_lettered).
pub const BACKLOG_REDRIVEN_TOTAL: &str = "nexus_backlog_redriven_total";
/// Events waiting in a role's retry backlog, per `role`.
pub const BACKLOG_EVENTS: &str = "nexus_backlog_events";
/// Age of the oldest event in a role's retry backlog, per `role`.
pub const BACKLOG_OLDEST_AGE_SECONDS: &str = "nexus_backlog_oldest_age_seconds";
/// Backlog store operations that failed, per `role` and `stage` (claim, remove, reschedule, stats).
pub const BACKLOG_ERRORS_TOTAL: &str = "nexus_backlog_errors_total";
/// Old effect-state rows a role pruned (gws effect log, history's finished conversations, the webhook log), per `role`.
pub const EFFECT_STATE_PRUNED_TOTAL: &str = "nexus_effect_state_pruned_total";

// ---- webhooks worker (`subscription` is the webhook id for the first
// `workers.webhooks.metric_subscriptions` subscriptions a process sees, then `other`) ----

/// Webhook delivery attempts, per `subscription`, `outcome` (ok, failed, timeout, aborted, refused).
pub const WEBHOOK_ATTEMPTS_TOTAL: &str = "nexus_webhook_attempts_total";
/// Latency of webhook delivery attempts, per `outcome`.
pub const WEBHOOK_ATTEMPT_SECONDS: &str = "nexus_webhook_attempt_duration_seconds";
/// Webhook messages queued from interaction events (new ones, not redeliveries).
pub const WEBHOOK_MESSAGES_QUEUED_TOTAL: &str = "nexus_webhook_messages_queued_total";
/// Webhook messages waiting for an attempt (first or retry), per `subscription`.
pub const WEBHOOK_QUEUE_DEPTH: &str = "nexus_webhook_retry_queue_depth";
/// Age of the oldest waiting webhook message, per `subscription`.
pub const WEBHOOK_OLDEST_PENDING_SECONDS: &str = "nexus_webhook_oldest_pending_age_seconds";
/// Webhook messages that exhausted their schedule and went to the dead-letter topic, per `subscription`.
pub const WEBHOOK_DEAD_LETTERED_TOTAL: &str = "nexus_webhook_dead_lettered_total";
/// Webhook endpoints disabled after failing for `disable_after`.
pub const WEBHOOK_ENDPOINTS_DISABLED_TOTAL: &str = "nexus_webhook_endpoints_disabled_total";
/// Pauses of a webhook endpoint its receiver asked for (429/503 with `Retry-After`).
pub const WEBHOOK_ENDPOINT_PAUSES_TOTAL: &str = "nexus_webhook_endpoint_pauses_total";
/// Errors of the webhook dispatcher's own work (claims, log writes, publishes), per `stage`.
pub const WEBHOOK_DISPATCH_ERRORS_TOTAL: &str = "nexus_webhook_dispatch_errors_total";
/// Attempt outcomes written to the delivery log per statement (the log writer's batches).
pub const WEBHOOK_LOG_BATCH_SIZE: &str = "nexus_webhook_log_batch_size";
/// Message rows per grouped durable insert (concurrent events sharing one commit).
pub const WEBHOOK_INSERT_BATCH_SIZE: &str = "nexus_webhook_insert_batch_size";
/// First attempts written together with their message's row (sent before the insert).
pub const WEBHOOK_SETTLED_AT_INSERT_TOTAL: &str = "nexus_webhook_settled_at_insert_total";

/// Exports at 0 the unlabelled counters an alert takes `increase()` of. A counter appears
/// only once touched, so its first event would show as a series born at 1, with no increase:
/// the alert would never fire for a process's first (often only) occurrence.
pub(super) fn register_alerting_counters() {
    metrics::counter!(WEBHOOK_ENDPOINTS_DISABLED_TOTAL).increment(0);
}

pub(super) fn describe_all() {
    describe_webhooks();
    describe_counter!(
        BUS_PRODUCER_RECREATED_TOTAL,
        "Kafka producers replaced after a fatal error (librdkafka refuses every record after one), by code."
    );
    describe_counter!(
        BUS_CONSUMER_ERRORS_TOTAL,
        "Kafka consumer errors librdkafka recovers from by itself (a broker down, a handshake failing while it restarts), by reader (member, tail) and code."
    );
    describe_counter!(
        GWS_OPERATIONS_TOTAL,
        "GWS operations of the gws role by operation and outcome (applied, reconciled, duplicate, rejected, skipped)."
    );
    describe_counter!(
        BACKLOG_QUEUED_TOTAL,
        "Events put in a role's retry backlog, by role and reason (failed, behind, deferred)."
    );
    describe_counter!(
        BACKLOG_REDRIVEN_TOTAL,
        "Tries of backlogged events, by role and outcome (applied, retried, deferred, dead_lettered)."
    );
    describe_gauge!(BACKLOG_EVENTS, "Events waiting in a role's retry backlog.");
    describe_gauge!(
        BACKLOG_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest event in a role's retry backlog."
    );
    describe_counter!(
        BACKLOG_ERRORS_TOTAL,
        "Retry backlog store operations that failed, by role and stage."
    );
    describe_counter!(
        EFFECT_STATE_PRUNED_TOTAL,
        "Old effect-state rows a role pruned (gws effect log, history's finished conversations, the webhook log)."
    );
    describe_counter!(
        PEER_CALLS_TOTAL,
        "Calls to peer systems (UCS, GWS) by role, peer and outcome."
    );
    describe_histogram!(
        PEER_CALL_SECONDS,
        Unit::Seconds,
        "Latency of calls to peer systems by role and peer."
    );
    describe_gauge!(
        WORKER_PAUSED,
        "1 while a role waits for a failing peer instead of consuming."
    );
    describe_counter!(
        CHAT_FILES_EXPIRED_TOTAL,
        "Expired chat files (rows and bytes) the sweeper deleted."
    );
    describe_counter!(
        CHAT_STREAMS_LAGGED_TOTAL,
        "Times a customer stream fell behind the edge's live buffer and caught up from the store."
    );
    describe_counter!(
        TIMERS_FIRED_TOTAL,
        "Conversation timers that fired (offer timeouts, queue retries)."
    );
    describe_counter!(
        TIMER_ERRORS_TOTAL,
        "Conversation timer claims or actions that failed."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Events behind the log end per topic, partition and consumer group."
    );
    describe_counter!(CONSUMER_LAG_ERRORS_TOTAL, "Lag measurements that failed.");
    describe_counter!(
        EVENTS_CONSUMED_TOTAL,
        "Events taken from the bus by outcome (ok, retried, dead_lettered)."
    );
    describe_histogram!(
        EVENT_HANDLE_SECONDS,
        Unit::Seconds,
        "Time from delivery to ack of an event."
    );
    describe_counter!(EVENTS_PUBLISHED_TOTAL, "Records acknowledged by the bus.");
    describe_counter!(BUS_PUBLISH_ERRORS_TOTAL, "Publishes that failed.");
    describe_counter!(
        BUS_RETENTION_ERRORS_TOTAL,
        "Embedded-log retention passes that could not trim a partition (a corrupt record)."
    );
    describe_histogram!(
        BUS_PUBLISH_SECONDS,
        Unit::Seconds,
        "Publish latency until the broker acknowledged."
    );
    describe_counter!(
        BUS_ACK_FLUSHES_TOTAL,
        "JetStream connection flushes for acks (acks waiting together share one), by outcome."
    );
    describe_counter!(
        EVENTS_DEAD_LETTERED_TOTAL,
        "Events written to a dead-letter topic, by reason."
    );
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests by method, route template and status."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP request latency by route template."
    );
    describe_gauge!(BUS_UP, "1 if the bus answered the last readiness check.");
    describe_counter!(
        HISTORY_EVENTS_TOTAL,
        "Events the history worker handled, by event kind and outcome (applied, duplicate, skipped, ignored, late)."
    );
    describe_counter!(
        HISTORY_ATTACHMENTS_TOTAL,
        "Chat files written to UCS at close, by outcome (added, missing)."
    );
}

fn describe_webhooks() {
    describe_counter!(
        WEBHOOK_ATTEMPTS_TOTAL,
        "Webhook delivery attempts by subscription (bounded) and outcome."
    );
    describe_histogram!(
        WEBHOOK_ATTEMPT_SECONDS,
        Unit::Seconds,
        "Latency of webhook delivery attempts by outcome."
    );
    describe_counter!(
        WEBHOOK_MESSAGES_QUEUED_TOTAL,
        "Webhook messages queued from interaction events."
    );
    describe_gauge!(
        WEBHOOK_QUEUE_DEPTH,
        "Webhook messages waiting for a first attempt or a retry, by subscription (bounded)."
    );
    describe_gauge!(
        WEBHOOK_OLDEST_PENDING_SECONDS,
        Unit::Seconds,
        "Age of the oldest waiting webhook message, by subscription (bounded)."
    );
    describe_counter!(
        WEBHOOK_DEAD_LETTERED_TOTAL,
        "Webhook messages that exhausted their retries (dead-letter topic)."
    );
    describe_counter!(
        WEBHOOK_ENDPOINT_PAUSES_TOTAL,
        "Webhook endpoints held because their receiver answered 429 or 503 with Retry-After."
    );
    describe_counter!(
        WEBHOOK_ENDPOINTS_DISABLED_TOTAL,
        "Webhook endpoints disabled after failing continuously for disable_after."
    );
    describe_counter!(
        WEBHOOK_DISPATCH_ERRORS_TOTAL,
        "Errors of the webhook dispatcher's own work by stage."
    );
    describe_histogram!(
        WEBHOOK_LOG_BATCH_SIZE,
        "Attempt outcomes written to the webhook delivery log per statement."
    );
    describe_histogram!(
        WEBHOOK_INSERT_BATCH_SIZE,
        "Webhook message rows written per grouped durable insert."
    );
    describe_counter!(
        WEBHOOK_SETTLED_AT_INSERT_TOTAL,
        "Webhook first attempts that ended before their message's row was written and went into the same insert."
    );
}
