//! Running the host as a service: its configuration, `--pid-file`, systemd's notifications and
//! socket activation, `--watch`, and replacing the host process itself (`upgrade`).

pub mod config;
pub mod notify;
pub mod pidfile;
pub mod systemd;
pub mod upgrade;
pub mod watch;
