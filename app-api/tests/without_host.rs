//! An app served by `serve_without_host`: plain HTTP on a real socket, state cells in memory.

use app_api::axum::Router;
use app_api::axum::extract::State as Extract;
use app_api::axum::routing::post;
use app_api::tokio::io::{AsyncReadExt, AsyncWriteExt};
use app_api::tokio::net::{TcpListener, TcpStream};
use app_api::{App, InitContext, State};

struct Counter {
    visits: State<u64>,
    config: String,
}

impl App for Counter {
    async fn init(ctx: InitContext) -> Result<Self, app_api::Error> {
        Ok(Counter {
            visits: ctx.state("visits")?,
            config: ctx.config().to_owned(),
        })
    }

    fn router(&self) -> Router {
        let config = self.config.clone();
        Router::new()
            .route(
                "/visit",
                post(|Extract(visits): Extract<State<u64>>| async move {
                    match visits.update(|count| {
                        *count += 1;
                        *count
                    }) {
                        Ok(count) => format!("{config} {count}"),
                        Err(e) => e.to_string(),
                    }
                }),
            )
            .with_state(self.visits.clone())
    }
}

async fn post_visit(address: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.expect("the server accepts");
    stream
        .write_all(b"POST /visit HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .expect("the request is sent");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("the response is read");
    assert!(response.starts_with("HTTP/1.1 200"), "unexpected response: {response}");
    response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
}

#[app_api::tokio::test(crate = "app_api::tokio")]
async fn serves_the_router_and_keeps_state_in_memory() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port is free");
    let address = listener.local_addr().expect("the listener has an address");
    let server = app_api::tokio::spawn(app_api::serve_without_host::<Counter>(listener, "visits:".into()));

    let answers = futures_util::future::join_all((0..20).map(|_| post_visit(address))).await;
    let mut counts: Vec<u64> = answers
        .iter()
        .map(|body| {
            let count = body
                .strip_prefix("visits: ")
                .unwrap_or_else(|| panic!("unexpected body: {body}"));
            count.parse().expect("a count")
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=20).collect::<Vec<u64>>(), "every visit counted once");
    server.abort();
}

struct Refuses;

impl App for Refuses {
    async fn init(_ctx: InitContext) -> Result<Self, app_api::Error> {
        Err("no database".into())
    }

    fn router(&self) -> Router {
        Router::new()
    }
}

#[app_api::tokio::test(crate = "app_api::tokio")]
async fn a_failing_init_is_returned() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port is free");
    let error = app_api::serve_without_host::<Refuses>(listener, String::new())
        .await
        .expect_err("init fails");
    assert_eq!(error.to_string(), "no database");
}
