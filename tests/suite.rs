//! Every integration suite in one test binary: one link instead of one per file, and the
//! suites' slow cases overlap under one `--test-threads`. Each file below is one suite;
//! `cargo test --test suite <file>::` runs one (for example `cargo test --test suite chat_e2e::`).

#[macro_use]
mod common;

#[path = "admin_api.rs"]
mod admin_api;
#[path = "agent_review.rs"]
mod agent_review;
#[path = "avro_interop.rs"]
mod avro_interop;
#[path = "backlog.rs"]
mod backlog;
#[path = "bot_review.rs"]
mod bot_review;
#[path = "browser.rs"]
mod browser;
#[path = "bus_conformance.rs"]
mod bus_conformance;
#[path = "bus_review.rs"]
mod bus_review;
#[path = "chat_bad_input.rs"]
mod chat_bad_input;
#[path = "chat_e2e.rs"]
mod chat_e2e;
#[path = "chat_files.rs"]
mod chat_files;
#[path = "chat_routing.rs"]
mod chat_routing;
#[path = "chat_v2_review.rs"]
mod chat_v2_review;
#[path = "chat_v3_review.rs"]
mod chat_v3_review;
#[path = "cli_review.rs"]
mod cli_review;
#[path = "drain.rs"]
mod drain;
#[path = "edge_http.rs"]
mod edge_http;
#[path = "embedded_review.rs"]
mod embedded_review;
#[path = "gws.rs"]
mod gws;
#[path = "gws_review.rs"]
mod gws_review;
#[path = "helm_chart.rs"]
mod helm_chart;
#[path = "history_review.rs"]
mod history_review;
#[path = "history_ucs.rs"]
mod history_ucs;
#[path = "ingest_review.rs"]
mod ingest_review;
#[path = "integration_e2e.rs"]
mod integration_e2e;
#[path = "kafka_foreign_records.rs"]
mod kafka_foreign_records;
#[path = "ops_metrics.rs"]
mod ops_metrics;
#[path = "ops_review.rs"]
mod ops_review;
#[path = "process.rs"]
mod process;
#[path = "redis_cluster_failover.rs"]
mod redis_cluster_failover;
#[path = "replay_review.rs"]
mod replay_review;
#[path = "session_review.rs"]
mod session_review;
#[path = "session_store.rs"]
mod session_store;
#[path = "stream_review.rs"]
mod stream_review;
#[path = "tls_clients.rs"]
mod tls_clients;
#[path = "topology_review.rs"]
mod topology_review;
#[path = "webhooks.rs"]
mod webhooks;
#[path = "worker_kill.rs"]
mod worker_kill;
