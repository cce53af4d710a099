//! Running the host as a service: its configuration, the admin endpoint operators and tools drive
//! it through, `--pid-file`, systemd's notifications and socket activation, `--watch`, and
//! replacing the host process itself (`upgrade`).

pub mod admin;
pub mod config;
pub mod ctl;
pub mod notify;
pub mod pidfile;
pub mod systemd;
pub mod upgrade;
pub mod watch;
