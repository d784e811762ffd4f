//! nexus: an event-driven digital-channels hub.
//!
//! Thin HTTP/WebSocket edges turn every exchange into a typed Avro event on a bus; stateless
//! workers consume the events. The modules, by role:
//!
//! - [`bus`]: the one event-bus trait and its backends (Kafka, NATS JetStream, embedded log),
//!   plus the consumer runtime (per-key ordering, ack after effect, dead letters, lag).
//! - [`events`]: the Avro schema registry built from `schemas/`, the envelope and the
//!   single-object codec.
//! - [`topology`]: topics and worker roles declared in YAML; plan/apply and AsyncAPI.
//! - [`replay`]: moving a consumer group's offsets and copying ranges between topics.
//! - [`edge`]: the HTTP/WebSocket API (health, metrics, event ingest; channels add theirs).
//! - [`stores`]: where state is kept: provisioning (PostgreSQL / SQLite).
//! - [`workers`]: worker roles, one folder each.
//! - [`telemetry`]: logging, tracing and Prometheus metrics.
//! - [`memory`]: process-wide memory settings for the binary's allocator.
//! - [`config`]: layered configuration (embedded defaults → file → `NEXUS_*` env).
//! - [`app`]: assembling the roles into `nexus dev`, `nexus edge` and `nexus worker`.
#![forbid(unsafe_code)]

pub mod app;
pub mod bus;
pub mod config;
pub mod edge;
pub mod events;
pub mod http_client;
pub mod memory;
pub mod replay;
pub mod stores;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod workers;
