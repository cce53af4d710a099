//! Host upgrades, end to end: the real host binary replaces itself (SIGUSR2, `POST /upgrade`)
//! while it serves the real example app.
//!
//! - under continuous load — keep-alive clients and clients that open a connection per request —
//!   no request fails; requests in flight at the hand-off finish on the old process; new
//!   connections land on the new process; the pid file, `/status` and the admin listener follow;
//! - a new binary that crashes at start, and one that never becomes ready, leave the old host
//!   serving as if nothing had happened, a second upgrade during one is refused, and a later good
//!   upgrade still works.
//!
//! How a request is counted: a keep-alive client checks, before it sends, whether the server has
//! closed the connection (as a server winding down does with idle connections), and if so opens
//! a new one — that request was never sent, so nothing failed. A request that was sent and got no
//! complete response, or a connection that was refused, is a failure.
//!
//! Everything talks to 127.0.0.1 only; every loop is bounded in count and time; there are no
//! timing assertions.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::{example_app, host_binary, AppVersion};

const WAIT: Duration = Duration::from_secs(60);
/// Load clients stop after this long whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(180);
/// ... or after this many requests each.
const LOAD_MAX_REQUESTS: u64 = 200_000;

fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A scratch directory with a copy of the example app; removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("upgrade-{name}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let library = dir.join("libapp.so");
        std::fs::copy(example_app(AppVersion::V1), &library).expect("copy the example app");
        std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes an executable script, renamed into place (never executed half-written).
    fn script(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let temporary = self.path(&format!(".{name}.{}", unique()));
        std::fs::write(&temporary, text).expect("write the script");
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&temporary, &path).expect("rename the script");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host this test started, and any host that replaced it; all are stopped when dropped.
struct Hosts {
    child: Child,
    log: PathBuf,
    public: SocketAddr,
    admin: SocketAddr,
    /// Processes started by upgrades (not children of this test).
    others: Vec<u32>,
}

impl Hosts {
    fn start(scratch: &Scratch, extra: &[&str]) -> Hosts {
        Hosts::start_with(scratch, extra, None)
    }

    /// Like [`Hosts::start`], with `NOTIFY_SOCKET` set to `notify` if given.
    fn start_with(scratch: &Scratch, extra: &[&str], notify: Option<&std::path::Path>) -> Hosts {
        let (public, admin) = (free_address(), free_address());
        let log = scratch.path(&format!("host-{}.log", unique()));
        let mut command = Command::new(host_binary());
        command
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .current_dir(&scratch.0);
        for (key, _) in std::env::vars() {
            if key.starts_with("HOST_") {
                command.env_remove(key);
            }
        }
        if let Some(notify) = notify {
            command.env("NOTIFY_SOCKET", notify);
        }
        let child = command
            .arg("--app")
            .arg(scratch.path("libapp.so"))
            .args(["--listen", &public.to_string(), "--admin", &admin.to_string()])
            .args(["--drain-timeout", "20s"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("the host starts");
        let mut hosts = Hosts {
            child,
            log,
            public,
            admin,
            others: Vec::new(),
        };
        hosts.wait_ready();
        hosts
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the host exited with {status} before serving:\n{}", self.log());
            }
            if request(self.admin, "GET", "/healthz").is_some_and(|(s, _, _)| s == 200)
                && request(self.public, "GET", "/").is_some_and(|(s, _, _)| s == 200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the host did not serve within {WAIT:?}:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status(&self) -> String {
        let (status, _, body) = request(self.admin, "GET", "/status").expect("/status answers");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// `POST /upgrade`: its status code and body.
    fn upgrade(&self) -> (u16, String) {
        let (status, _, body) = request(self.admin, "POST", "/upgrade").expect("POST /upgrade answers");
        (status, body)
    }

    /// Waits for the test's own host process to exit.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the old host did not exit within {WAIT:?}:\n{}", self.log());
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for &pid in &self.others {
            signal(pid, "KILL");
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` runs (a zombie does not count).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Stops a host that is not this test's child and waits until it is gone.
fn stop_other(pid: u32) {
    signal(pid, "TERM");
    let deadline = Instant::now() + WAIT;
    while is_running(pid) {
        assert!(Instant::now() < deadline, "host {pid} did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request on a fresh connection: status, head and body; `None` if the connection fails.
fn request(address: SocketAddr, method: &str, path: &str) -> Option<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(WAIT)).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head.to_owned(), body.to_owned()))
}

/// The number after `"key":` in a JSON text (enough for the flat fields read here).
fn json_number(json: &str, key: &str) -> Option<u64> {
    let rest = &json[json.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// A load client.

/// A response read off a keep-alive connection.
struct Response {
    status: u16,
    body: String,
    close: bool,
}

/// Reads one response (Content-Length framed, as the host sends them).
fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let mut line = String::new();
    let mut status = None;
    let mut length = 0usize;
    let mut close = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed before a whole response head",
            ));
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if status.is_none() {
            status = trimmed.split(' ').nth(1).and_then(|s| s.parse().ok());
            continue;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
            if name == "content-length" {
                length = value.parse().unwrap_or(0);
            } else if name == "connection" && value == "close" {
                close = true;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Response {
        status: status.unwrap_or(0),
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
    })
}

/// What one load client saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    failures: Vec<String>,
    /// Connections the server closed between requests (the next request went on a new one).
    reconnects: u64,
    /// `Connection: close` responses.
    closes: u64,
    /// Responses by serving generation, in order of change: (generation, count).
    generations: Vec<(u64, u64)>,
}

impl Tally {
    fn saw(&mut self, generation: u64) {
        match self.generations.last_mut() {
            Some((last, count)) if *last == generation => *count += 1,
            _ => self.generations.push((generation, 1)),
        }
    }

    /// Responses from `generation` since it was last seen first.
    fn latest(&self, generation: u64) -> u64 {
        match self.generations.last() {
            Some((last, count)) if *last == generation => *count,
            _ => 0,
        }
    }
}

/// Whether the peer has closed `stream` (a read would return end of file now).
fn closed_by_server(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// Sends `GET /cache` in a loop until `stop`, on one keep-alive connection at a time (or a new
/// connection per request if `fresh`), and counts.
fn load_client(address: SocketAddr, fresh: bool, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let began = Instant::now();
    let mut connection: Option<BufReader<TcpStream>> = None;
    for _ in 0..LOAD_MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) || began.elapsed() > LOAD_LIMIT {
            return;
        }
        if let Some(reader) = &connection {
            if closed_by_server(reader.get_ref()) {
                connection = None;
                tally.lock().expect("tally").reconnects += 1;
            }
        }
        if connection.is_none() {
            match TcpStream::connect_timeout(&address, Duration::from_secs(10)) {
                Ok(stream) => {
                    let _ = stream.set_read_timeout(Some(WAIT));
                    let _ = stream.set_nodelay(true);
                    connection = Some(BufReader::new(stream));
                }
                Err(e) => {
                    tally.lock().expect("tally").failures.push(format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        let Some(reader) = connection.as_mut() else { continue };
        let head = if fresh {
            "GET /cache HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        } else {
            "GET /cache HTTP/1.1\r\nHost: test\r\n\r\n"
        };
        let result = reader
            .get_mut()
            .write_all(head.as_bytes())
            .and_then(|()| read_response(reader));
        let mut tally = tally.lock().expect("tally");
        match result {
            Ok(response) if response.status == 200 => {
                tally.ok += 1;
                if let Some(generation) = json_number(&response.body, "generation") {
                    tally.saw(generation);
                }
                if response.close {
                    tally.closes += 1;
                }
                if response.close || fresh {
                    connection = None;
                }
            }
            Ok(response) => {
                tally
                    .failures
                    .push(format!("status {}: {}", response.status, response.body.trim()));
                connection = None;
            }
            Err(e) => {
                tally.failures.push(format!("request sent, no response: {e}"));
                connection = None;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn upgrade_under_load_loses_no_request() {
    let scratch = Scratch::new("load");
    let pid_file = scratch.path("host.pid");
    let mut hosts = Hosts::start(&scratch, &["--pid-file", pid_file.to_str().expect("a UTF-8 path")]);
    let old_pid = hosts.pid();

    // Two reloads, so that the old process serves generation 3 and the new one (which loads the
    // library anew) generation 1: `/cache` says which process answered.
    for _ in 0..2 {
        let (status, _, body) = request(hosts.admin, "POST", "/reload").expect("POST /reload answers");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(json_number(&hosts.status(), "generation"), Some(3));

    // Continuous load: keep-alive clients and a client per fresh connection.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for fresh in [false, false, false, true, true] {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop, tally_for_thread, address) = (stop.clone(), tally.clone(), hosts.public);
        let thread = std::thread::spawn(move || load_client(address, fresh, stop, tally_for_thread));
        clients.push((fresh, tally, thread));
    }
    wait_until("every load client is served by the old host", || {
        clients
            .iter()
            .all(|(_, tally, _)| tally.lock().expect("tally").latest(3) >= 20)
    });

    // Requests in flight at the hand-off: slow ones, on connections the old process accepted.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let address = hosts.public;
            std::thread::spawn(move || request(address, "GET", "/slow?ms=3000"))
        })
        .collect();
    wait_until("the slow requests are in flight on the old host", || {
        let status = hosts.status();
        status.split("\"in_flight\":").skip(1).any(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0)
                >= 3
        })
    });

    let (status, body) = hosts.upgrade();
    assert_eq!(status, 200, "{body}\n{}", hosts.log());
    assert!(body.contains("\"ok\":true"), "{body}");
    let new_pid = json_number(&body, "pid").expect("the new pid") as u32;
    hosts.others.push(new_pid);
    assert_ne!(new_pid, old_pid);

    // The old process finishes what it has and exits 0; its requests in flight were answered.
    let exit = hosts.wait_exit();
    assert!(exit.success(), "the old host exited with {exit}:\n{}", hosts.log());
    for thread in slow {
        let answer = thread.join().expect("a slow request thread");
        let (status, _, body) = answer.expect("the slow request in flight got an answer");
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("slow 3000 ms"), "{body}");
    }
    assert!(is_running(new_pid), "the new host is not running:\n{}", hosts.log());

    // New connections land on the new process (generation 1), also for keep-alive clients.
    wait_until("every load client is served by the new host", || {
        clients
            .iter()
            .all(|(_, tally, _)| tally.lock().expect("tally").latest(1) >= 20)
    });
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (fresh, tally, thread) in clients {
        thread.join().expect("a load client");
        let tally = tally.lock().expect("tally");
        assert!(
            tally.failures.is_empty(),
            "a {} client had failed requests: {:?}\n{}",
            if fresh { "fresh-connection" } else { "keep-alive" },
            tally.failures,
            hosts.log()
        );
        // The old process's generation 3, then the new process's generation 1 (alternating while
        // both accept), and nothing else.
        let order: Vec<u64> = tally.generations.iter().map(|(g, _)| *g).collect();
        assert!(
            order.first() == Some(&3) && order.last() == Some(&1) && order.iter().all(|g| [1, 3].contains(g)),
            "served by generations {:?}",
            tally.generations
        );
        if !fresh {
            assert!(
                tally.closes + tally.reconnects >= 1,
                "the keep-alive client was never told to reconnect"
            );
        }
        total += tally.ok;
    }
    eprintln!("{total} requests, none failed");

    // The admin listener, /status and the pid file belong to the new process now.
    let status = hosts.status();
    assert_eq!(json_number(&status, "pid"), Some(u64::from(new_pid)), "{status}");
    assert_eq!(
        json_number(&status, "upgraded_from"),
        Some(u64::from(old_pid)),
        "{status}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("the pid file").trim(),
        new_pid.to_string()
    );
    let log = hosts.log();
    assert!(
        log.contains("took the listening sockets over from the old host"),
        "{log}"
    );

    stop_other(new_pid);
    assert!(!pid_file.exists(), "the new host removes the pid file when it stops");
}

#[test]
fn failed_upgrades_leave_the_old_host_serving() {
    let scratch = Scratch::new("failures");
    let binary = scratch.path("new-host");
    let started = scratch.path("started");
    // A new host that crashes at start.
    scratch.script("new-host", "#!/bin/sh\necho 'new host: cannot start' >&2\nexit 3\n");
    let mut hosts = Hosts::start(
        &scratch,
        &[
            "--upgrade-binary",
            binary.to_str().expect("a UTF-8 path"),
            "--upgrade-timeout",
            "3s",
        ],
    );
    let pid = hosts.pid();

    // By signal: the outcome is in /status.
    signal(pid, "USR2");
    wait_until("the failed upgrade is reported", || {
        hosts.status().contains("\"last_upgrade\":{")
    });
    let status = hosts.status();
    assert!(
        status.contains("\"ok\":false") && status.contains("exit status: 3"),
        "{status}"
    );
    assert_serves(&hosts, pid);

    // By request: the caller gets the outcome.
    let (code, body) = hosts.upgrade();
    assert_eq!(code, 422, "{body}");
    assert!(
        body.contains("exited with exit status: 3 before it was ready"),
        "{body}"
    );
    assert_serves(&hosts, pid);

    // A new host that never becomes ready: stopped after --upgrade-timeout; meanwhile a second
    // upgrade is refused.
    scratch.script(
        "new-host",
        &format!("#!/bin/sh\necho $$ > {}\nexec sleep 60\n", started.display()),
    );
    let admin = hosts.admin;
    let first = std::thread::spawn(move || request(admin, "POST", "/upgrade"));
    wait_until("the never-ready host has started", || started.exists());
    let (code, body) = hosts.upgrade();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("an upgrade is already in progress"), "{body}");
    let (code, _, body) = first
        .join()
        .expect("the upgrade thread")
        .expect("POST /upgrade answers");
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("was not ready within 3s; it was stopped"), "{body}");
    let stuck: u32 = std::fs::read_to_string(&started)
        .expect("its pid")
        .trim()
        .parse()
        .expect("a pid");
    assert!(!is_running(stuck), "the never-ready host (pid {stuck}) was not stopped");
    assert_serves(&hosts, pid);

    // A real host that cannot serve (here: it refuses the library) says why.
    scratch.script(
        "new-host",
        &format!(
            "#!/bin/sh\nexec {} \"$@\" --require-sha256 {}\n",
            host_binary().display(),
            "0".repeat(64)
        ),
    );
    let (code, body) = hosts.upgrade();
    assert_eq!(code, 422, "{body}");
    assert!(
        body.contains("before it was ready: cannot serve") && body.contains("sha256"),
        "{body}"
    );
    assert_serves(&hosts, pid);

    // A good upgrade still works afterwards.
    scratch.script(
        "new-host",
        &format!("#!/bin/sh\nexec {} \"$@\"\n", host_binary().display()),
    );
    let (code, body) = hosts.upgrade();
    assert_eq!(code, 200, "{body}\n{}", hosts.log());
    let new_pid = json_number(&body, "pid").expect("the new pid") as u32;
    hosts.others.push(new_pid);
    let exit = hosts.wait_exit();
    assert!(exit.success(), "the old host exited with {exit}:\n{}", hosts.log());
    let status = hosts.status();
    assert_eq!(json_number(&status, "pid"), Some(u64::from(new_pid)), "{status}");
    let (code, _, body) = request(hosts.public, "GET", "/").expect("the new host serves");
    assert_eq!(code, 200, "{body}");
    stop_other(new_pid);
}

/// The host `pid` still serves the app and answers `/status` itself.
fn assert_serves(hosts: &Hosts, pid: u32) {
    let (code, _, body) = request(hosts.public, "GET", "/").expect("the old host serves");
    assert_eq!(code, 200, "{body}");
    let status = hosts.status();
    assert_eq!(json_number(&status, "pid"), Some(u64::from(pid)), "{status}");
}

/// Messages the hosts sent to the test's `NOTIFY_SOCKET`, skipping watchdog pings.
fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    loop {
        let n = socket.recv(&mut buffer).expect("a notification within the timeout");
        let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
        if message.trim() != "WATCHDOG=1" {
            return message;
        }
    }
}

#[test]
fn under_systemd_the_new_process_becomes_the_main_pid() {
    let scratch = Scratch::new("systemd");
    let socket_path = scratch.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(WAIT)).expect("a timeout");
    let mut hosts = Hosts::start_with(&scratch, &[], Some(&socket_path));
    let old_pid = hosts.pid();
    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");

    let (code, body) = hosts.upgrade();
    assert_eq!(code, 200, "{body}\n{}", hosts.log());
    let new_pid = json_number(&body, "pid").expect("the new pid") as u32;
    hosts.others.push(new_pid);

    // The old host hands the service over: MAINPID, READY and the new process's status, once.
    let handed = next_notification(&socket);
    let lines: Vec<&str> = handed.lines().collect();
    assert!(lines.contains(&format!("MAINPID={new_pid}").as_str()), "{handed}");
    assert!(lines.contains(&"READY=1"), "{handed}");
    assert!(
        lines.iter().any(|l| l.starts_with("STATUS=serving generation 1")),
        "{handed}"
    );
    let exit = hosts.wait_exit();
    assert!(exit.success(), "the old host exited with {exit}:\n{}", hosts.log());

    // The old one said nothing more (no STOPPING=1); the next message is the new one's reload.
    signal(new_pid, "HUP");
    let reloading = next_notification(&socket);
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let done = next_notification(&socket);
    assert!(done.contains("STATUS=serving generation 2"), "{done}");

    // The new process says STOPPING=1 when it stops.
    signal(new_pid, "TERM");
    let stopping = next_notification(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    stop_other(new_pid);
    let _ = old_pid;
}
