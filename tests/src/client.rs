//! A small HTTP client on hyper's connection API, so that the tests control connections exactly:
//! [`get`] and [`request`] open a fresh TCP connection per request, [`KeepAlive`] sends every
//! request on one HTTP/1.1 connection (and never reconnects), [`Http2`] speaks HTTP/2 with prior
//! knowledge, and [`Raw`] writes exactly the bytes a test gives it (partial heads, pipelined
//! requests) on one HTTP/1.1 connection and reads the answers one by one. Every request is bounded
//! by [`REQUEST_TIMEOUT`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// Any error of the client, described.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The longest any request may take, connecting included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A response, with its body read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub body: Bytes,
}

impl Reply {
    /// The body as text (lossily).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, Error> {
        serde_json::from_slice(&self.body).map_err(|e| format!("not JSON ({e}): {:?}", self.text()).into())
    }
}

async fn bounded<T>(what: &str, future: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
    match tokio::time::timeout(REQUEST_TIMEOUT, future).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("{what}: no answer within {REQUEST_TIMEOUT:?}").into()),
    }
}

fn build(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
    absolute: bool,
) -> Result<Request<Full<Bytes>>, Error> {
    let uri = if absolute {
        format!("http://{addr}{path}")
    } else {
        path.to_owned()
    };
    let mut builder = Request::builder().method(method).uri(uri);
    if !absolute {
        builder = builder.header(hyper::header::HOST, addr.to_string());
    }
    Ok(builder.body(Full::new(body))?)
}

async fn read(response: hyper::Response<hyper::body::Incoming>) -> Result<Reply, Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        body,
    })
}

/// `GET path` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, Error> {
    request(addr, Method::GET, path, Bytes::new()).await
}

/// One request on a fresh HTTP/1.1 connection, which is closed afterwards.
pub async fn request(addr: SocketAddr, method: Method, path: &str, body: Bytes) -> Result<Reply, Error> {
    let what = format!("{method} {path} on a fresh connection to {addr}");
    let request = build(addr, method, path, body, false)?;
    bounded(&what, async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let reply = async {
            sender.ready().await?;
            read(sender.send_request(request).await?).await
        }
        .await;
        // Closes the connection.
        connection.abort();
        reply
    })
    .await
    .map_err(|e| format!("{what}: {e}").into())
}

/// One HTTP/1.1 keep-alive connection: every request goes on it, and it is never re-opened.
pub struct KeepAlive {
    addr: SocketAddr,
    local: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> Result<KeepAlive, Error> {
        bounded("connecting", async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let local = stream.local_addr()?;
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            let connection = tokio::spawn(connection);
            Ok(KeepAlive {
                addr,
                local,
                sender,
                connection,
            })
        })
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}").into())
    }

    /// `GET path` on this connection.
    pub async fn get(&mut self, path: &str) -> Result<Reply, Error> {
        self.request(Method::GET, path, Bytes::new()).await
    }

    /// One request on this connection; fails if the connection was closed.
    pub async fn request(&mut self, method: Method, path: &str, body: Bytes) -> Result<Reply, Error> {
        let what = format!("{method} {path} on a keep-alive connection to {}", self.addr);
        let request = build(self.addr, method, path, body, false)?;
        bounded(&what, async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            read(response).await
        })
        .await
        .map_err(|e| format!("{what}: {e}").into())
    }

    /// Whether the connection has been closed (by either side).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// The client's end of the TCP connection (the one socket every request goes on).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether hyper's connection task has ended: the TCP connection is gone (closed by either
    /// side, or broken).
    pub fn connection_ended(&self) -> bool {
        self.connection.is_finished()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// One HTTP/2 connection (prior knowledge, no upgrade). Cloning it shares the connection, for
/// concurrent streams.
#[derive(Clone)]
pub struct Http2 {
    addr: SocketAddr,
    sender: http2::SendRequest<Full<Bytes>>,
}

impl Http2 {
    pub async fn connect(addr: SocketAddr) -> Result<Http2, Error> {
        bounded("connecting", async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            Ok(Http2 { addr, sender })
        })
        .await
        .map_err(|e| format!("cannot connect to {addr} with HTTP/2: {e}").into())
    }

    pub async fn request(&mut self, method: Method, path: &str, body: Bytes) -> Result<Reply, Error> {
        let what = format!("{method} {path} on an HTTP/2 connection to {}", self.addr);
        let request = build(self.addr, method, path, body, true)?;
        bounded(&what, async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            read(response).await
        })
        .await
        .map_err(|e| format!("{what}: {e}").into())
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, Error> {
        self.request(Method::GET, path, Bytes::new()).await
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Like [`Http2::request`], but a failure says whether the server cannot have processed the
    /// request ([`Http2Failure::unprocessed`]), as a client that retries needs to know.
    pub async fn request_or_refused(&mut self, method: Method, path: &str, body: Bytes) -> Result<Reply, Http2Failure> {
        let what = format!("{method} {path} on an HTTP/2 connection to {}", self.addr);
        let failure = |error: Error, unprocessed: bool| Http2Failure {
            error: format!("{what}: {error}").into(),
            unprocessed,
            refused_by_goaway: false,
        };
        let request = build(self.addr, method, path, body, true).map_err(|e| failure(e, false))?;
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
            // A connection that is closed has not seen this request.
            self.sender.ready().await.map_err(|e| failure(e.into(), true))?;
            let response = match self.sender.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => {
                    // hyper gives the request back when it never reached the connection.
                    let unsent = e.take_message().is_some();
                    let error = e.into_error();
                    let refused = !unsent && refused_by_goaway(&error);
                    return Err(Http2Failure {
                        refused_by_goaway: refused,
                        ..failure(error.into(), unsent || refused)
                    });
                }
            };
            read(response).await.map_err(|e| failure(e, false))
        })
        .await;
        outcome.unwrap_or_else(|_| Err(failure(format!("no answer within {REQUEST_TIMEOUT:?}").into(), false)))
    }
}

/// An HTTP/2 request that failed ([`Http2::request_or_refused`]).
#[derive(Debug)]
pub struct Http2Failure {
    pub error: Error,
    /// Whether the server cannot have processed the request: it never left the client (the
    /// connection was closed or going away), or the server's `GOAWAY` refused its stream (its id
    /// is above the frame's last stream id). Such a request may be retried on a new connection
    /// (RFC 9113, section 6.8); any other failure may have happened after the server acted on it.
    pub unprocessed: bool,
    /// Whether it is unprocessed because a `GOAWAY` refused it (rather than because it never
    /// left the client).
    pub refused_by_goaway: bool,
}

impl std::fmt::Display for Http2Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        if self.refused_by_goaway {
            write!(f, " (refused by the server's GOAWAY, not processed)")?;
        } else if self.unprocessed {
            write!(f, " (never sent)")?;
        }
        Ok(())
    }
}

/// Whether `error` is h2's for a stream that a graceful `GOAWAY` (reason `NO_ERROR`) from the
/// server refused: a new stream on a connection after its `GOAWAY` arrived, or a stream above the
/// frame's last stream id. h2 reports both with the remote `GOAWAY` as the stream's error, which
/// hyper keeps as its source; h2 0.4 displays it as `connection error received: not a result of
/// an error`. A stream the server did take and then lost (the connection closed under it, a
/// `RST_STREAM`) has another error.
fn refused_by_goaway(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause
            .to_string()
            .starts_with("connection error received: not a result of an error")
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// One HTTP/1.1 connection on which a test writes exactly the bytes it wants (a request head cut
/// anywhere, several requests at once) and reads the answers one by one, in order. Nothing is
/// added or checked on the way: [`Raw::read_reply`] parses what the server sent.
pub struct Raw {
    stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    /// Bytes read and not yet parsed as part of an answer.
    buffer: Vec<u8>,
}

/// An answer read by [`Raw::read_reply`].
#[derive(Debug, Clone)]
pub struct RawReply {
    pub status: StatusCode,
    /// The header fields, names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RawReply {
    /// The first field `name` (lower case), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether the server said it closes the connection after this answer.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|value| value.split(',').any(|token| token.trim().eq_ignore_ascii_case("close")))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The largest answer head [`Raw::read_reply`] accepts.
const RAW_MAX_HEAD: usize = 64 * 1024;

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Result<Raw, Error> {
        bounded("connecting", async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let local = stream.local_addr()?;
            Ok(Raw {
                stream,
                local,
                peer: addr,
                buffer: Vec::new(),
            })
        })
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}").into())
    }

    /// `GET path HTTP/1.1` with a `Host` field and nothing else: the bytes of a whole request.
    pub fn get_request(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
    }

    /// The client's end of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server's end of the connection.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Writes `bytes`, all of them, as they are.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        use tokio::io::AsyncWriteExt as _;
        let peer = self.peer;
        bounded("writing", async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await?;
            Ok(())
        })
        .await
        .map_err(|e| format!("cannot write {} bytes to {peer}: {e}", bytes.len()).into())
    }

    /// Reads the next answer: its head, and its body as `Content-Length` or chunked encoding
    /// delimit it (or the end of the connection, if neither does).
    pub async fn read_reply(&mut self) -> Result<RawReply, Error> {
        let peer = self.peer;
        bounded("reading an answer", self.read_reply_unbounded())
            .await
            .map_err(|e| format!("reading an answer from {peer}: {e}").into())
    }

    /// Whether the server has closed the connection (or reset it), without waiting: reads what
    /// has arrived, which the next [`Raw::read_reply`] then parses.
    pub fn peer_closed(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return true,
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }

    /// Reads more bytes into the buffer; fails at the end of the connection.
    async fn fill(&mut self) -> Result<(), Error> {
        use tokio::io::AsyncReadExt as _;
        let mut chunk = [0u8; 16 * 1024];
        let read = self.stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(format!(
                "the server closed the connection ({} bytes of an unfinished answer: {:?})",
                self.buffer.len(),
                String::from_utf8_lossy(&self.buffer)
            )
            .into());
        }
        self.buffer.extend_from_slice(&chunk[..read]);
        Ok(())
    }

    /// Takes the first `len` bytes of the buffer, reading more as needed.
    async fn take(&mut self, len: usize) -> Result<Vec<u8>, Error> {
        while self.buffer.len() < len {
            self.fill().await?;
        }
        Ok(self.buffer.drain(..len).collect())
    }

    /// Takes one line ending in CRLF (without it), reading more as needed.
    async fn take_line(&mut self) -> Result<String, Error> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\r\n") {
                let line: Vec<u8> = self.buffer.drain(..end + 2).take(end).collect();
                return String::from_utf8(line).map_err(|e| format!("a line that is not UTF-8: {e}").into());
            }
            if self.buffer.len() > RAW_MAX_HEAD {
                return Err(format!("no line end in {} bytes", self.buffer.len()).into());
            }
            self.fill().await?;
        }
    }

    async fn read_reply_unbounded(&mut self) -> Result<RawReply, Error> {
        let status_line = self.take_line().await?;
        let mut parts = status_line.splitn(3, ' ');
        let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if version != "HTTP/1.1" && version != "HTTP/1.0" {
            return Err(format!("not an HTTP/1 status line: {status_line:?}").into());
        }
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or_else(|| format!("no status code in {status_line:?}"))?;
        let mut headers = Vec::new();
        loop {
            let line = self.take_line().await?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("a header line without a colon: {line:?}"))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut reply = RawReply {
            status,
            headers,
            body: Bytes::new(),
        };
        let chunked = reply
            .header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
        let length = reply.header("content-length").map(str::to_owned);
        if status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok(reply);
        }
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let size_line = self.take_line().await?;
                let size = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16).map_err(|e| format!("chunk size {size_line:?}: {e}"))?;
                if size == 0 {
                    // Trailers, up to an empty line.
                    while !self.take_line().await?.is_empty() {}
                    break;
                }
                body.extend(self.take(size).await?);
                if !self.take_line().await?.is_empty() {
                    return Err("a chunk longer than its size".into());
                }
            }
            body
        } else if let Some(length) = length {
            let length: usize = length.parse().map_err(|e| format!("Content-Length {length:?}: {e}"))?;
            self.take(length).await?
        } else {
            // Delimited by the end of the connection.
            use tokio::io::AsyncReadExt as _;
            let mut rest = std::mem::take(&mut self.buffer);
            self.stream.read_to_end(&mut rest).await?;
            rest
        };
        reply.body = body.into();
        Ok(reply)
    }
}
