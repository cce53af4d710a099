//! Host upgrades without downtime: SIGUSR2 or `POST /upgrade` start the host binary anew, hand it
//! the listening sockets, and let this process go once the new one serves.
//!
//! ## The hand-off, step by step
//!
//! 1. The old host creates a private directory (mode 0700) with a unix stream socket in it, and
//!    starts the new binary (`--upgrade-binary`, by default this host's own path as resolved at
//!    start-up) with the same arguments, environment and working directory, plus
//!    [`HANDOFF_VARIABLE`](crate::child::HANDOFF_VARIABLE) naming that socket.
//! 2. The new host, at start-up and before it starts any thread, connects to the socket; the old
//!    host checks that the peer is that very child (`SO_PEERCRED` pid) and the child that the
//!    listener is its parent. The old host then sends one message: the names of the sockets in
//!    the format of systemd's `LISTEN_FDNAMES` (`http:http:admin`), with the listening sockets
//!    themselves attached (`SCM_RIGHTS`). The new host treats them exactly like sockets passed by
//!    socket activation: the one named `admin` is its admin listener, every other one a public
//!    listener, and an address it is configured to listen on that one of them already listens on
//!    is not bound again.
//!    If the old host keeps state cells, the message also names where (`STATE=` and `STATE_FILE=`
//!    lines): its `--state-file`, whose lock descriptor comes last among the attached ones (the new
//!    host shares the lock, so no other host can take the file between the two), or, for cells in
//!    memory, a hand-off file the old host has just copied them into (see `state/`). Both
//!    processes then read and write that one file until the old one exits.
//! 3. The new host loads its app and starts serving on those sockets — both processes now accept
//!    from the same sockets, so no connection is refused — and then writes `READY=1` (with a
//!    `STATUS=` line, and `TAKES_CONNECTIONS=1`: it takes kept-alive connections) on the hand-off
//!    socket, where a systemd service would notify the manager. It keeps the socket open.
//! 4. The old host, on `READY=1`: under systemd sends `MAINPID=<new pid>`, `READY=1` and the new
//!    process's `STATUS=` (and then nothing more), rewrites `--pid-file` with the new pid, and
//!    answers the caller. Then it stops accepting and its generations retire as at a reload:
//!    requests in flight finish here, and each kept-alive HTTP/1 connection is handed back as soon
//!    as it is idle (at once, or after the response under way) and sent, with the bytes read
//!    ahead on it, over the hand-off socket (`wire.rs`); the new host serves it as a connection
//!    handed over by an older generation of its own, so its client never sees it close. Once no
//!    connection is left (or at `--drain-timeout`) the old host unloads its generations, closes
//!    the socket and exits 0.
//!
//!    What does not move: HTTP/2 connections get `GOAWAY` and finish their streams here (hyper
//!    cannot hand their state over; HTTP/2 clients open a new connection for new streams), and
//!    upgraded connections such as WebSockets stay until they end or the drain deadline (their
//!    bytes belong to the app's task, not to hyper). When the new host did not say
//!    `TAKES_CONNECTIONS=1` (an older binary), or from the moment sending to it fails (it closed
//!    the socket, or took nothing for 5 s), the old host does what it did before connections
//!    moved: HTTP/1 responses say `Connection: close`, so keep-alive clients reconnect, to the new
//!    process, and idle connections are closed after
//!    [`crate::serving::listeners::HANDOFF_IDLE_GRACE`]. A connection whose frame the kernel has
//!    taken is the new host's: should the new host die before it reads it, the kernel closes it
//!    and its client reconnects; it is never served twice.
//!
//! If the new process cannot be started, exits, closes the hand-off socket, or has not written
//! `READY=1` within `--upgrade-timeout`, it gets SIGTERM (SIGKILL after [`KILL_GRACE`](crate::child::KILL_GRACE)) and the
//! old host serves on as if nothing had happened; the reason is the upgrade's outcome.
//!
//! The sockets are passed over the hand-off socket rather than inherited at fixed descriptor
//! numbers: placing descriptors at 3, 4, … in a child needs code between `fork` and `exec`
//! (`unsafe`), and the child's `LISTEN_PID` cannot be known before it exists. Passing them this
//! way needs neither, no descriptor is ever inheritable (so no other program the host or its app
//! starts can receive a listening socket), and both ends check who is on the other side.
//!
//! One upgrade runs at a time. A host that is PID 1 (a container's init) refuses to upgrade: its
//! exit would end the container, and the new process with it.
//!
//! The new host's side is `new_host.rs`, the old host's `old_host.rs`, and what they say to each
//! other `wire.rs`.

pub mod new_host;
pub mod old_host;
pub mod wire;
