//! Serving: the public listening sockets every generation accepts on, how the accepts are shared
//! between generations, and the metrics of what they serve. The host never accepts on the public
//! sockets itself; the admin endpoint that shows the metrics is an operation (`ops/admin.rs`).

pub mod listeners;
pub mod metrics;
pub mod share;
