//! What a plain `axum::serve` does with streams, the host must do too: these tests serve axum's
//! own examples (the `axum-examples` fixture: SSE, WebSocket echo, chat, stream-to-file) and check,
//! over loopback, what a client of such a server relies on:
//!
//! - response bodies are streamed, not buffered: an SSE event arrives before the next one exists;
//! - WebSocket upgrades work, and a WebSocket stays on the generation that accepted it across a
//!   reload, until the retiring generation's `--drain-timeout`; then it gets a close frame with
//!   code 1012 (service restart) and the old library copy is unmapped;
//! - request bodies are streamed into the handler (a file grows while the upload is still being
//!   sent), multipart works, and several MiB go through both ways;
//! - the handler of a client that went away is dropped;
//! - `ConnectInfo` is the client's real address, also on a kept-alive connection that moved to a
//!   new generation;
//! - `HEAD` answers with the `Content-Length` of the `GET` body, and no body.
//!
//! Every wait is bounded ([`STEP`], or a bound of its own), so a host that does not stream fails
//! these tests instead of hanging them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http1;
use hyper::http::response::Parts;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use e2e_tests::{AppVersion, Host, Sandbox, axum_examples, client, wait_until};

/// The longest any one step may take: a response head, the next event or message, an upload.
const STEP: Duration = Duration::from_secs(20);

/// Starts a host serving the fixture's v1 build, with `extra` arguments.
async fn start(extra: &[&str]) -> (Sandbox, Host) {
    let sandbox = Sandbox::new();
    sandbox.deploy(axum_examples(AppVersion::V1));
    let host = sandbox.start_host(extra).await;
    (sandbox, host)
}

/// `future`, or a panic saying `what` did not happen within [`STEP`].
async fn step<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {STEP:?}"))
}

/// Milliseconds since the Unix epoch, the clock the fixture stamps its paced SSE events with.
fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis()
}

/// Deterministic bytes that do not repeat with any chunk size, so that a reordered, duplicated or
/// lost chunk shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

/// Where the first difference between two byte strings is, for failure messages.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(at) => format!("they differ first at byte {at} (lengths {} and {})", a.len(), b.len()),
        None => format!("one is a prefix of the other (lengths {} and {})", a.len(), b.len()),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 with hyper's client, keeping the response body as a stream.

/// Aborts a spawned task when dropped: hyper's connection task, so that dropping a response
/// closes its TCP connection.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response whose body is read frame by frame, on a connection of its own (closed when this is
/// dropped).
struct Streaming {
    what: String,
    head: Parts,
    body: Incoming,
    _connection: AbortOnDrop<Result<(), hyper::Error>>,
}

impl Streaming {
    /// Sends `request` on a fresh connection from `stream` and waits for the response head.
    async fn send<B>(stream: TcpStream, request: Request<B>) -> Streaming
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let what = format!("{} {}", request.method(), request.uri());
        let (mut sender, connection) = step(&what, http1::handshake(TokioIo::new(stream)))
            .await
            .unwrap_or_else(|e| panic!("{what}: HTTP/1.1 handshake: {e}"));
        let connection = AbortOnDrop(tokio::spawn(connection));
        let response = step(&what, sender.send_request(request))
            .await
            .unwrap_or_else(|e| panic!("{what}: no response: {e}"));
        let (head, body) = response.into_parts();
        Streaming {
            what,
            head,
            body,
            _connection: connection,
        }
    }

    /// `GET path` on a fresh connection.
    async fn get(addr: SocketAddr, path: &str) -> Streaming {
        let request = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        Streaming::send(connect(addr).await, request).await
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.head.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The next chunk of data (trailers are skipped); `None` at the end of the body. Panics if
    /// none comes within [`STEP`] or the body fails.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            let frame = step(&format!("{}: the next part of the body", self.what), self.body.frame()).await?;
            let frame = frame.unwrap_or_else(|e| panic!("{}: reading the body: {e}", self.what));
            if let Ok(data) = frame.into_data() {
                return Some(data);
            }
        }
    }

    /// Waits until the body ends, cleanly or not (the server may cut a body that never ends);
    /// returns how it ended. Data that still comes is skipped. Panics if it has not ended within
    /// `within`.
    async fn end(&mut self, within: Duration) -> Result<(), String> {
        let began = Instant::now();
        loop {
            let left = within.saturating_sub(began.elapsed());
            let frame = tokio::time::timeout(left, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("{}: the body did not end within {within:?}", self.what));
            match frame {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The rest of the body.
    async fn rest(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk().await {
            body.extend_from_slice(&chunk);
        }
        body
    }
}

/// A TCP connection to `addr`.
async fn connect(addr: SocketAddr) -> TcpStream {
    let stream = step(&format!("connecting to {addr}"), TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

// ---------------------------------------------------------------------------------------------
// Server-sent events.

/// One server-sent event.
#[derive(Debug, Default)]
struct SseEvent {
    event: Option<String>,
    id: Option<String>,
    data: String,
}

/// Reads the events of an SSE response as they arrive.
struct SseReader {
    response: Streaming,
    buffer: Vec<u8>,
}

impl SseReader {
    /// `GET path`, which must answer `200` with `text/event-stream`.
    async fn open(addr: SocketAddr, path: &str) -> SseReader {
        let response = Streaming::get(addr, path).await;
        assert_eq!(response.head.status, StatusCode::OK, "GET {path}");
        let content_type = response.header(header::CONTENT_TYPE).unwrap_or("");
        assert!(
            content_type.starts_with("text/event-stream"),
            "GET {path} should answer an event stream, its content type is {content_type:?}"
        );
        SseReader {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event (keep-alive comments are skipped); `None` at the end of the stream.
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("SSE is UTF-8");
                if let Some(event) = parse_event(&block) {
                    return Some(event);
                }
            }
            match self.response.next_chunk().await {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => {
                    assert!(
                        self.buffer.iter().all(u8::is_ascii_whitespace),
                        "the event stream ended in the middle of an event: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    return None;
                }
            }
        }
    }
}

/// The event in one block of `field: value` lines; `None` for a block of comments only.
fn parse_event(block: &str) -> Option<SseEvent> {
    let mut event = SseEvent::default();
    let mut data = Vec::new();
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        match field {
            "event" => event.event = Some(value),
            "id" => event.id = Some(value),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() && event.event.is_none() {
        return None;
    }
    event.data = data.join("\n");
    Some(event)
}

/// A `/sse/paced` event's data, `"{version} {name} {produced at, ms since the epoch}"`.
fn paced(event: &SseEvent, id: &str, name: &str) -> u128 {
    assert_eq!(event.event.as_deref(), Some("tick"), "{event:?}");
    assert_eq!(event.id.as_deref(), Some(id), "{event:?}");
    let mut words = event.data.split(' ');
    assert_eq!(
        (words.next(), words.next()),
        (Some("v1"), Some(name)),
        "event {id} should be v1's {name:?}: {event:?}"
    );
    words
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("event {id} should say when it was produced: {event:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_event_arrives_before_the_next_one_is_produced() {
    let (_sandbox, host) = start(&[]).await;

    let mut events = SseReader::open(host.addr(), "/sse/paced").await;
    let first = events.next_event().await.expect("the paced stream's first event");
    let first_arrived = now_ms();
    let first_produced = paced(&first, "1", "first");
    let second = events.next_event().await.expect("the paced stream's second event");
    let second_produced = paced(&second, "2", "second");
    assert!(
        second_produced >= first_produced + 900,
        "the fixture produces its second event a second after the first: {first:?} then {second:?}"
    );
    // The point of streaming: the first event was delivered while the second did not exist yet.
    assert!(
        first_arrived < second_produced,
        "the first event (produced at {first_produced}) arrived at {first_arrived}, not before the second \
         was produced (at {second_produced}): the response body was held back instead of streamed"
    );
    assert!(
        events.next_event().await.is_none(),
        "the paced stream ends after two events"
    );

    // axum's own example: one event a second, forever, with keep-alive comments in between.
    let mut events = SseReader::open(host.addr(), "/sse").await;
    let began = Instant::now();
    for n in 1..=2 {
        let event = events.next_event().await.expect("/sse never ends");
        assert_eq!(event.data, "v1: hi!", "event {n} of /sse");
    }
    assert!(
        began.elapsed() >= Duration::from_millis(800),
        "/sse throttles its events to one a second, two arrived within {:?}",
        began.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// WebSockets.

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `path` (the handshake must answer `101`).
async fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}{path}");
    let handshake = tokio_tungstenite::client_async(url.as_str(), connect(addr).await);
    match step(&format!("the WebSocket handshake with {url}"), handshake).await {
        Ok((ws, response)) => {
            assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS, "{url}");
            ws
        }
        Err(tungstenite::Error::Http(response)) => panic!(
            "{url}: the WebSocket handshake was answered {} with {:?}",
            response.status(),
            response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
        ),
        Err(e) => panic!("{url}: the WebSocket handshake failed: {e}"),
    }
}

/// The next data or close message (pings and pongs are skipped); panics if the socket ends or
/// fails first, or nothing comes within `within`.
async fn ws_next(ws: &mut Ws, within: Duration, what: &str) -> Message {
    let began = Instant::now();
    loop {
        let left = within.saturating_sub(began.elapsed());
        let message = tokio::time::timeout(left, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: no WebSocket message within {within:?}"));
        match message {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return message,
            Some(Err(e)) => panic!("{what}: the WebSocket failed: {e}"),
            None => panic!("{what}: the WebSocket ended"),
        }
    }
}

/// The next message, which must be text.
async fn ws_text(ws: &mut Ws, what: &str) -> String {
    match ws_next(ws, STEP, what).await {
        Message::Text(text) => text.as_str().to_owned(),
        other => panic!("{what}: expected a text message, got {other:?}"),
    }
}

/// Sends `text` and returns the text that comes back.
async fn ws_echo(ws: &mut Ws, text: &str) -> String {
    let what = format!("the echo of {text:?}");
    step(&what, ws.send(Message::text(text)))
        .await
        .unwrap_or_else(|e| panic!("{what}: cannot send: {e}"));
    ws_text(ws, &what).await
}

/// Waits for the socket to end after a close: the other side's close frame (the answer to ours),
/// then `None` or a closed-connection error, nothing else. A connection dropped without the
/// closing handshake fails.
async fn ws_ends(ws: &mut Ws, what: &str) {
    loop {
        match step(what, ws.next()).await {
            None | Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => continue,
            Some(other) => panic!("{what}: expected the end of the WebSocket, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes() {
    let (_sandbox, host) = start(&[]).await;
    let mut ws = ws_connect(host.addr(), "/ws").await;

    assert_eq!(ws_echo(&mut ws, "hello").await, "v1: hello");
    assert_eq!(ws_echo(&mut ws, "and again").await, "v1: and again");

    let binary = Bytes::from(pattern(100_000, 1));
    step("sending a binary message", ws.send(Message::binary(binary.clone())))
        .await
        .expect("sending a binary message");
    match ws_next(&mut ws, STEP, "the echo of a binary message").await {
        Message::Binary(echoed) => assert!(echoed == binary, "{}", first_difference(&echoed, &binary)),
        other => panic!("expected the binary message back, got {other:?}"),
    }

    // Closing from the client: the server answers the close and the socket ends.
    step("closing", ws.close(None)).await.expect("sending a close frame");
    ws_ends(&mut ws, "after the client closed").await;
}

/// The staged copy `/status` says the serving generation runs from.
fn staged_copy(status: &serde_json::Value) -> PathBuf {
    status["library"]["staged_copy"]
        .as_str()
        .unwrap_or_else(|| panic!("/status names the staged copy: {status}"))
        .into()
}

/// Whether `mapped` (from [`Host::mapped_files_under`]) has the file named like `copy`.
fn maps(mapped: &[String], copy: &Path) -> bool {
    let name = copy.file_name().expect("a staged copy has a file name");
    mapped.iter().any(|path| Path::new(path).file_name() == Some(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_stays_on_its_generation_until_the_drain_timeout_then_gets_1012() {
    // Long enough for a reload's answer and a few echoes on a busy machine; the test waits it out.
    const DRAIN: Duration = Duration::from_secs(5);
    // Built before the host starts, so that no build runs while the drain timeout counts.
    let v2 = axum_examples(AppVersion::V2);
    let (sandbox, host) = start(&["--drain-timeout", "5s"]).await;
    let old_copy = staged_copy(&host.status().await);

    let mut old = ws_connect(host.addr(), "/ws").await;
    assert_eq!(ws_echo(&mut old, "before").await, "v1: before");
    // Another stream: an SSE response that never ends.
    let mut events = SseReader::open(host.addr(), "/sse").await;
    let event = events.next_event().await.expect("/sse never ends");
    assert_eq!(event.data, "v1: hi!");

    sandbox.deploy(v2);
    let reload_began = Instant::now();
    host.reload_ok().await;
    // The drain timeout counts from the swap, which came after `reload_began` and before this.
    let swapped = Instant::now();

    // Within the drain timeout: the open socket is still served by v1 (so its library copy is
    // still mapped), a new one by v2.
    assert_eq!(
        ws_echo(&mut old, "after the reload").await,
        "v1: after the reload",
        "an open WebSocket must stay on the generation that accepted it ({:?} after the reload's answer)",
        swapped.elapsed()
    );
    let mapped = host.mapped_files_under(&sandbox.staging_dir());
    let checked = swapped.elapsed();
    assert!(
        maps(&mapped, &old_copy) || checked >= DRAIN,
        "the old library copy {} should still be mapped while its WebSocket is open ({checked:?} after the \
         reload's answer), mapped: {mapped:?}",
        old_copy.display()
    );
    assert!(
        checked < DRAIN,
        "the machine is too slow for this test: an echo took until {checked:?} after the reload's answer, \
         past the drain timeout ({DRAIN:?})"
    );
    let mut new = ws_connect(host.addr(), "/ws").await;
    assert_eq!(ws_echo(&mut new, "new").await, "v2: new");
    let event = events.next_event().await.expect("/sse never ends");
    assert_eq!(
        event.data, "v1: hi!",
        "an SSE stream must stay on the generation that started it"
    );

    // At the drain timeout: a close frame "service restart", then the end of the socket.
    let close = ws_next(&mut old, DRAIN + STEP, "the old WebSocket's close frame").await;
    let closed_after = reload_began.elapsed();
    match close {
        Message::Close(Some(CloseFrame { code, reason })) => assert_eq!(
            code,
            CloseCode::Restart,
            "the close frame should say 1012 (service restart), it says {} ({reason:?})",
            u16::from(code)
        ),
        other => panic!("expected a close frame with code 1012, got {other:?}"),
    }
    assert!(
        closed_after >= DRAIN,
        "the old WebSocket was closed {closed_after:?} after the reload began, before the drain timeout \
         ({DRAIN:?}) could have passed"
    );
    ws_ends(&mut old, "the old WebSocket after its close frame").await;
    // The SSE stream is cut too (it never ends by itself), at the latest when the old generation
    // stops.
    let ended = events.response.end(STEP).await;
    println!(
        "the old SSE stream ended {:?} after the reload began: {ended:?}",
        reload_began.elapsed()
    );
    println!(
        "the old WebSocket got its close frame {closed_after:?} after the reload began, {:?} after its answer",
        closed_after.saturating_sub(swapped - reload_began)
    );

    // The old generation is gone: its library copy is unmapped.
    let staging = sandbox.staging_dir();
    let mapped = wait_until("the old library copy to be unmapped", Duration::from_secs(30), || {
        let mapped = host.mapped_files_under(&staging);
        let still = maps(&mapped, &old_copy);
        async move {
            if still {
                Err(format!("still mapped: {mapped:?}"))
            } else {
                Ok(mapped)
            }
        }
    })
    .await;
    let serving = staged_copy(&host.status().await);
    assert!(
        maps(&mapped, &serving),
        "the serving copy {} should be mapped: {mapped:?}",
        serving.display()
    );

    // The new generation's socket never noticed.
    assert_eq!(ws_echo(&mut new, "still here").await, "v2: still here");
}

// ---------------------------------------------------------------------------------------------
// The chat room.

/// Joins the chat as `name` and waits for the room to announce it.
async fn join_chat(addr: SocketAddr, name: &str) -> Ws {
    let mut ws = ws_connect(addr, "/chat/websocket").await;
    step("sending the user name", ws.send(Message::text(name)))
        .await
        .expect("sending the user name");
    assert_eq!(
        ws_text(&mut ws, &format!("{name} joining")).await,
        format!("v1 {name} joined.")
    );
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_clients_see_each_others_messages() {
    let (_sandbox, host) = start(&[]).await;
    let addr = host.addr();

    let mut alice = join_chat(addr, "alice").await;
    let mut bob = join_chat(addr, "bob").await;
    assert_eq!(ws_text(&mut alice, "alice hearing of bob").await, "v1 bob joined.");

    step("alice speaking", alice.send(Message::text("hi bob")))
        .await
        .expect("alice speaking");
    assert_eq!(ws_text(&mut bob, "bob hearing alice").await, "v1 alice: hi bob");
    assert_eq!(ws_text(&mut alice, "alice hearing herself").await, "v1 alice: hi bob");

    step("bob speaking", bob.send(Message::text("hi alice")))
        .await
        .expect("bob speaking");
    assert_eq!(ws_text(&mut alice, "alice hearing bob").await, "v1 bob: hi alice");
    assert_eq!(ws_text(&mut bob, "bob hearing himself").await, "v1 bob: hi alice");

    // A name that is taken is refused, and the server hangs up (the example just returns, without
    // a closing handshake).
    let mut impostor = ws_connect(addr, "/chat/websocket").await;
    step("sending a taken name", impostor.send(Message::text("alice")))
        .await
        .expect("sending a taken name");
    assert_eq!(
        ws_text(&mut impostor, "a taken name").await,
        "v1 Username already taken."
    );
    match step("the refused client's socket to end", impostor.next()).await {
        None | Some(Err(_) | Ok(Message::Close(_))) => {}
        Some(Ok(other)) => panic!("the refused client should be hung up on, it got {other:?}"),
    }

    // Leaving is announced.
    step("bob leaving", bob.close(None)).await.expect("bob leaving");
    assert_eq!(ws_text(&mut alice, "alice seeing bob leave").await, "v1 bob left.");
}

// ---------------------------------------------------------------------------------------------
// Uploads and downloads (stream-to-file).

/// Starts a host whose app config sends uploads to a directory of the sandbox; returns it too.
async fn start_with_uploads() -> (Sandbox, Host, PathBuf) {
    let sandbox = Sandbox::new();
    sandbox.deploy(axum_examples(AppVersion::V1));
    let uploads = sandbox.path().join("uploads");
    let config = sandbox.path().join("app.conf");
    std::fs::write(
        &config,
        format!(
            "# where the stream-to-file example writes\nuploads = {}\n",
            uploads.display()
        ),
    )
    .expect("writing the app config");
    let host = sandbox
        .start_host(&["--app-config", config.to_str().expect("a UTF-8 sandbox path")])
        .await;
    (sandbox, host, uploads)
}

/// A request body whose chunks the test sends one by one, as it likes.
type ChunkBody = StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn chunk_body() -> (tokio::sync::mpsc::Sender<Bytes>, ChunkBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(Frame::data(chunk)), rx))
    });
    (tx, StreamBody::new(stream.boxed()))
}

/// The size of the file at `path`, 0 if there is none yet.
fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |meta| meta.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_stream_to_files_and_downloads_stream_back() {
    const SIZE: usize = 6 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let (_sandbox, mut host, uploads) = start_with_uploads().await;
    let addr = host.addr();
    let content = pattern(SIZE, 2);
    let file = uploads.join("big.bin");

    // A streamed upload (chunked, no length), sent in two halves. The handler writes the body to
    // the file as it arrives, so the file grows while the second half has not been sent yet.
    let (tx, body) = chunk_body();
    let request = Request::post("/upload/file/big.bin")
        .header(header::HOST, addr.to_string())
        .body(body)
        .expect("a valid request");
    let stream = connect(addr).await;
    let upload = tokio::spawn(async move {
        let mut response = Streaming::send(stream, request).await;
        (response.head.status, response.rest().await)
    });
    let (first_half, second_half) = content.split_at(SIZE / 2);
    for chunk in first_half.chunks(CHUNK) {
        step(
            "sending the first half of the upload",
            tx.send(Bytes::copy_from_slice(chunk)),
        )
        .await
        .expect("the upload's body is read");
    }
    host.wait_until(
        "the uploaded file to grow while the upload is still being sent",
        STEP,
        || {
            let size = file_size(&file);
            async move {
                if size >= 1024 * 1024 {
                    Ok(())
                } else {
                    Err(format!("{size} bytes written of the {} sent", SIZE / 2))
                }
            }
        },
    )
    .await;
    for chunk in second_half.chunks(CHUNK) {
        step(
            "sending the second half of the upload",
            tx.send(Bytes::copy_from_slice(chunk)),
        )
        .await
        .expect("the upload's body is read");
    }
    drop(tx);
    let (status, answer) = step("the upload's answer", upload).await.expect("the upload task");
    assert_eq!(status, StatusCode::OK, "{:?}", String::from_utf8_lossy(&answer));
    let written = std::fs::read(&file).expect("the uploaded file");
    assert!(
        written == content,
        "the file on disk: {}",
        first_difference(&written, &content)
    );

    // A streamed download of it: chunked (no length known in advance), all of it.
    let mut download = Streaming::get(addr, "/upload/file/big.bin").await;
    assert_eq!(download.head.status, StatusCode::OK);
    assert_eq!(
        download.header(header::TRANSFER_ENCODING),
        Some("chunked"),
        "a streamed body has no length: {:?}",
        download.head.headers
    );
    let downloaded = download.rest().await;
    assert!(
        downloaded == content,
        "the download: {}",
        first_difference(&downloaded, &content)
    );

    // A multipart form: a field without a file (skipped), a small file and one of several MiB
    // (more than axum's default 2 MB limit, which the example lifts).
    let small = b"hello multipart\n".to_vec();
    let medium = pattern(3 * 1024 * 1024 + 17, 3);
    let boundary = "e2e-boundary-5f1c2a9d8b7e4c3a";
    let mut form = Vec::new();
    let mut part = |disposition: &str, content: &[u8]| {
        form.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n").as_bytes(),
        );
        form.extend_from_slice(content);
        form.extend_from_slice(b"\r\n");
    };
    part(r#"name="note""#, b"not a file");
    part(r#"name="file"; filename="small.txt""#, &small);
    part(r#"name="file"; filename="medium.bin""#, &medium);
    form.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let request = Request::post("/upload")
        .header(header::HOST, addr.to_string())
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Full::new(Bytes::from(form)))
        .expect("a valid request");
    let mut answer = Streaming::send(connect(addr).await, request).await;
    let body = answer.rest().await;
    assert_eq!(
        answer.head.status,
        StatusCode::SEE_OTHER,
        "the form's answer: {:?}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(answer.header(header::LOCATION), Some("/upload"));
    assert_eq!(std::fs::read(uploads.join("small.txt")).expect("small.txt"), small);
    let written = std::fs::read(uploads.join("medium.bin")).expect("medium.bin");
    assert!(written == medium, "medium.bin: {}", first_difference(&written, &medium));
    assert!(
        !uploads.join("note").exists(),
        "a field without a file name is not a file"
    );
    let reply = client::get(addr, "/upload/file/small.txt")
        .await
        .expect("GET /upload/file/small.txt");
    assert_eq!((reply.status, &reply.body[..]), (StatusCode::OK, &small[..]));

    // A name that would leave the uploads directory is refused.
    let reply = client::request(addr, Method::POST, "/upload/file/..%2Fescaped.txt", Bytes::from("x"))
        .await
        .expect("POST /upload/file/..%2Fescaped.txt");
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(!uploads.parent().expect("a parent").join("escaped.txt").exists());
}

// ---------------------------------------------------------------------------------------------
// A client that goes away.

/// `/dropped`'s counts: guards made, guards dropped.
async fn hold_counts(addr: SocketAddr) -> Result<(u64, u64), String> {
    let reply = client::get(addr, "/dropped").await.map_err(|e| e.to_string())?;
    let text = reply.text();
    let words: Vec<&str> = text.split_whitespace().collect();
    match words[..] {
        ["v1", "held", held, "dropped", dropped] => match (held.parse(), dropped.parse()) {
            (Ok(held), Ok(dropped)) => Ok((held, dropped)),
            _ => Err(format!("unexpected /dropped answer {text:?}")),
        },
        _ => Err(format!("unexpected /dropped answer {} {text:?}", reply.status)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_of_a_client_that_went_away_is_dropped() {
    let (_sandbox, mut host) = start(&[]).await;
    let addr = host.addr();
    assert_eq!(hold_counts(addr).await, Ok((0, 0)));

    // A response body that never ends: once the client is gone, the body (and its guard) must go.
    let mut hold = Streaming::get(addr, "/hold").await;
    assert_eq!(hold.head.status, StatusCode::OK);
    let first = hold.next_chunk().await.expect("/hold's first line");
    assert_eq!(&first[..], b"v1 holding\n");
    assert_eq!(
        hold_counts(addr).await,
        Ok((1, 0)),
        "the body is being sent: its guard lives"
    );
    drop(hold);
    host.wait_until(
        "the never-ending body of a client that disconnected to be dropped",
        STEP,
        || async move {
            match hold_counts(addr).await? {
                (1, 1) => Ok(()),
                counts => Err(format!("(held, dropped) = {counts:?}")),
            }
        },
    )
    .await;

    // A handler that never answers: once the client is gone, its future must go.
    let mut stream = connect(addr).await;
    stream
        .write_all(format!("GET /hold/pending HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("sending GET /hold/pending");
    host.wait_until("GET /hold/pending to reach its handler", STEP, || async move {
        match hold_counts(addr).await? {
            (2, 1) => Ok(()),
            counts => Err(format!("(held, dropped) = {counts:?}")),
        }
    })
    .await;
    drop(stream);
    host.wait_until(
        "the pending handler of a client that disconnected to be dropped",
        STEP,
        || async move {
            match hold_counts(addr).await? {
                (2, 2) => Ok(()),
                counts => Err(format!("(held, dropped) = {counts:?}")),
            }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// ConnectInfo.

/// A connection to `addr` from `from` (a loopback address other than the usual 127.0.0.1, so that
/// an address the server made up would not pass for the real one).
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(format!("{from}:0").parse().expect("an address"))
        .unwrap_or_else(|e| panic!("cannot bind {from}: {e}"));
    let stream = step(&format!("connecting to {addr} from {from}"), socket.connect(addr))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr} from {from}: {e}"));
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// `GET /whoami` on a kept-alive connection.
async fn whoami(sender: &mut http1::SendRequest<Full<Bytes>>, addr: SocketAddr) -> String {
    let request = Request::get("/whoami")
        .header(header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let response = step("GET /whoami", async {
        sender.ready().await?;
        sender.send_request(request).await
    })
    .await
    .unwrap_or_else(|e| panic!("GET /whoami: {e}"));
    let status = response.status();
    let body = step("the body of /whoami", response.into_body().collect())
        .await
        .unwrap_or_else(|e| panic!("GET /whoami: {e}"))
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, StatusCode::OK, "GET /whoami: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_info_is_the_clients_address_also_after_a_reload() {
    let v2 = axum_examples(AppVersion::V2);
    let (sandbox, host) = start(&[]).await;
    let addr = host.addr();

    let stream = connect_from("127.0.0.2", addr).await;
    let client = stream.local_addr().expect("a connected socket's address");
    let (mut sender, connection) = step("HTTP/1.1 handshake", http1::handshake(TokioIo::new(stream)))
        .await
        .expect("HTTP/1.1 handshake");
    let _connection = AbortOnDrop(tokio::spawn(connection));
    assert_eq!(whoami(&mut sender, addr).await, format!("v1 {client}\n"));

    // The same kept-alive connection, now served by the new generation: the address goes with it.
    sandbox.deploy(v2);
    host.reload_ok().await;
    assert_eq!(
        whoami(&mut sender, addr).await,
        format!("v2 {client}\n"),
        "the kept-alive connection should move to v2 and keep its client's address"
    );
}

// ---------------------------------------------------------------------------------------------
// HEAD.

/// Sends `request` (which should ask to close the connection) on a fresh connection and reads
/// everything until the server closes it: the head and whatever bytes follow it.
async fn raw_exchange(addr: SocketAddr, request: &str) -> (String, Vec<u8>) {
    let mut stream = connect(addr).await;
    let mut received = Vec::new();
    step(&format!("{request:?}"), async {
        stream.write_all(request.as_bytes()).await?;
        stream.read_to_end(&mut received).await
    })
    .await
    .unwrap_or_else(|e| panic!("{request:?}: {e}"));
    let end = received
        .windows(4)
        .position(|four| four == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{request:?}: no complete head in {:?}",
                String::from_utf8_lossy(&received)
            )
        });
    let head = String::from_utf8_lossy(&received[..end]).into_owned();
    (head, received[end + 4..].to_vec())
}

/// The value of the header field `name` (case-insensitive) in a response head.
fn head_field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_the_length_of_the_get_body_and_no_body() {
    let (_sandbox, host) = start(&[]).await;
    let addr = host.addr();
    let expected = "v1 fixed\n".repeat(1000);

    let (head, body) = raw_exchange(
        addr,
        &format!("GET /fixed HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 "), "GET /fixed: {head}");
    assert_eq!(String::from_utf8_lossy(&body), expected, "GET /fixed's body");
    assert_eq!(
        head_field(&head, "content-length"),
        Some(expected.len().to_string().as_str()),
        "GET /fixed: {head}"
    );

    let (head, body) = raw_exchange(
        addr,
        &format!("HEAD /fixed HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 "), "HEAD /fixed: {head}");
    assert_eq!(
        head_field(&head, "content-length"),
        Some(expected.len().to_string().as_str()),
        "HEAD /fixed should announce the GET body's length: {head}"
    );
    assert!(
        body.is_empty(),
        "HEAD /fixed must send no body, it sent {} bytes: {:?}",
        body.len(),
        String::from_utf8_lossy(&body)
    );
}
