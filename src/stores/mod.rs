//! The stores nexus keeps state in: live sessions (Redis or embedded) and provisioning
//! (PostgreSQL or SQLite).

pub mod provisioning;
pub mod session;
