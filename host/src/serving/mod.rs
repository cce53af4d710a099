//! Serving: the public listening sockets every generation accepts on, the admin endpoint, and the
//! metrics it exposes. The host never accepts on the public sockets itself.

pub mod admin;
pub mod listeners;
pub mod metrics;
pub mod share;
