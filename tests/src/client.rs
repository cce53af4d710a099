//! A small HTTP client on hyper's connection API, so that the tests control connections exactly:
//! [`get`] and [`request`] open a fresh TCP connection per request, [`KeepAlive`] sends every
//! request on one HTTP/1.1 connection (and never reconnects), [`Http2`] speaks HTTP/2 with prior
//! knowledge. Every request is bounded by [`REQUEST_TIMEOUT`].

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
    sender: http1::SendRequest<Full<Bytes>>,
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> Result<KeepAlive, Error> {
        bounded("connecting", async {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
            let connection = tokio::spawn(connection);
            Ok(KeepAlive {
                addr,
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
}
