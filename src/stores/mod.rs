//! The stores nexus keeps state in: provisioning (PostgreSQL, or SQLite for `nexus dev`)
//! holds what tenants configure; live session state comes next to it.

pub mod provisioning;
