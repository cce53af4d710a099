//! The service manager's side of the host's systemd integration: a [`NotifySocket`] that receives
//! the host's notifications (`READY=1`, `RELOADING=1`, …), and the shell script that passes
//! listening sockets the way socket activation does (see [`crate::HostCommand::socket_activation`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixDatagram;

/// Run as `sh -c SCRIPT <host binary> <host args>` with the public socket as stdin and the admin
/// socket as stdout: moves them to fds 3 and 4 (stdin from `/dev/null`, stdout to stderr), and
/// execs the host (which keeps the shell's pid, as `LISTEN_PID` requires) with systemd's
/// variables for two sockets named `http` and `admin`.
pub(crate) const SOCKET_ACTIVATION_SCRIPT: &str =
    r#"exec 3<&0 4>&1 0</dev/null 1>&2; LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=http:admin exec "$0" "$@""#;

/// A datagram socket standing for systemd's `NOTIFY_SOCKET` (give it to the host with
/// [`crate::HostCommand::notify_socket`]). Must be made inside a tokio runtime.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds a socket at `path` (which must not exist).
    pub fn bind(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path)
            .unwrap_or_else(|e| panic!("cannot bind a notify socket at {}: {e}", path.display()));
        NotifySocket {
            socket,
            path: path.to_owned(),
        }
    }

    /// Where the socket is: the value of `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next message, skipping watchdog pings (`WATCHDOG=1`); panics if none comes within
    /// `timeout`.
    pub async fn next(&self, timeout: Duration) -> String {
        let receive = async {
            let mut buffer = [0u8; 4096];
            loop {
                let length = self
                    .socket
                    .recv(&mut buffer)
                    .await
                    .unwrap_or_else(|e| panic!("cannot receive on {}: {e}", self.path.display()));
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                if message.trim() != "WATCHDOG=1" {
                    return message;
                }
            }
        };
        tokio::time::timeout(timeout, receive)
            .await
            .unwrap_or_else(|_| panic!("no notification on {} within {timeout:?}", self.path.display()))
    }
}
