//! Just enough HTTP/1.1 to talk to a server on this machine: one request per connection,
//! `Connection: close`, read to the end. (A full HTTP client and its dependency tree would cost the
//! xtask more build time than these lines.)

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// How long connecting may take; the server is local, so this only matters if it is wedged.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An answer: its status code and its body as text.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends `method path` with an empty body and waits (at most `timeout` per read or write) for
/// the whole answer.
pub fn request(address: SocketAddr, method: &str, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    let address = reachable(address);
    let mut stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT.min(timeout))
        .with_context(|| format!("cannot connect to {address}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .context("cannot set a read timeout")?;
    stream
        .set_write_timeout(Some(timeout))
        .context("cannot set a write timeout")?;
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .with_context(|| format!("cannot send {method} {path} to {address}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("no complete answer to {method} {path} from {address}"))?;
    parse(&raw).with_context(|| format!("bad answer to {method} {path} from {address}"))
}

/// A free loopback port: bound and released, so another process could take it in between, which
/// shows as a clear error when the server cannot bind it.
pub fn free_address() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The address to connect to for a listener bound to `address`: a wildcard address is reached
/// through loopback.
fn reachable(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), address.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), address.port()),
        _ => address,
    }
}

fn parse(raw: &[u8]) -> anyhow::Result<Response> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("the answer ended before its header did ({} bytes)", raw.len());
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let Some(status) = status_line.split(' ').nth(1).and_then(|code| code.parse().ok()) else {
        bail!("malformed status line {status_line:?}");
    };
    let chunked = lines.any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = &raw[end + 4..];
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).with_context(|| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).context("truncated chunk")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).context("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_plain_answer() {
        let response = parse(b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 3\r\n\r\nno\n").unwrap();
        assert_eq!(response.status, 422);
        assert_eq!(response.body, "no\n");
    }

    #[test]
    fn parses_a_chunked_answer() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse(raw).unwrap().body, "abcde");
    }

    #[test]
    fn refuses_a_truncated_answer() {
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
