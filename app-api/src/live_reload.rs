//! Browser live reload, for development: with the host's `--live-reload` (which
//! `cargo xtask dev` turns on), an HTML page of the app open in a browser reloads itself after
//! each swap. Off unless the host says so ([`app_abi::HostApi::live_reload`]); the app needs no
//! code for it.
//!
//! [`wrap`] puts the app's router inside one that
//! - adds a `<script>` to every HTML answer: before its last `</body>`, or at its end if it has
//!   none, with `Content-Length` set to the new length. Only what can be rewritten whole is
//!   touched: `text/html` with no `Content-Encoding`, a body of known length up to
//!   [`MAX_PAGE_BYTES`], and not a 1xx, 204, 206 or 304 answer (a `HEAD` answer gets the length
//!   its `GET` answer has). Anything else passes as the app made it;
//! - answers two paths under `/_hot_reload/`, which is reserved for it (the app's own routes at
//!   these two are never reached): `GET /_hot_reload/client.js`, the script (`live_reload.js`), and
//!   `GET /_hot_reload/events`, a `text/event-stream` that sends at once (with `retry: 250`)
//!   the host's process id and this generation's number (`data: 1234 7`), then only keep-alive
//!   comments.
//!
//! The stream ends as soon as the generation stops serving (its lifecycle leaves `Serving`), so
//! an open page never holds a retiring generation's drain back. The browser's `EventSource` then
//! reconnects by itself; new connections go to the newest generation, whose number is higher than
//! the one the script was served with (written into its tag), and the script reloads the page.
//! The generation that served the page is what the script compares with, rather than the first
//! number it hears: a page served just before a swap may open its stream just after it. Another
//! host process (the dev loop restarted, or the host upgraded) counts generations anew, so a
//! stream from another process id reloads the page too.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use app_abi::{Lifecycle, LifecycleState};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{StreamExt as _, stream};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body::Body as _;
use http_body_util::{BodyExt as _, Limited};
use tokio::sync::watch;

/// The script every page loads.
const CLIENT_PATH: &str = "/_hot_reload/client.js";

/// The event stream the script listens to (also written in `live_reload.js`).
const EVENTS_PATH: &str = "/_hot_reload/events";

const CLIENT: &str = include_str!("live_reload.js");

/// The largest page given a script; a larger one, or one of unknown length (a stream), is left
/// as it is rather than held whole in memory.
const MAX_PAGE_BYTES: u64 = 4 << 20;

/// How long the browser waits before it reconnects to a stream that ended.
const RETRY: Duration = Duration::from_millis(250);

/// How often an open stream sends a comment, so that nothing between browser and host takes it
/// for a dead connection.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The app's `router` with live reload around it, for `generation`, whose streams end when
/// `lifecycle` leaves `Serving`.
pub(crate) fn wrap(router: Router, generation: u64, lifecycle: watch::Receiver<LifecycleState>) -> Router {
    // The library runs inside the host: this is the host's process.
    let served = format!("{} {generation}", std::process::id());
    let tag: Arc<str> = script_tag(&served).into();
    Router::new()
        .route(CLIENT_PATH, get(client))
        .route(EVENTS_PATH, get(move || events(served.clone(), lifecycle.clone())))
        .fallback_service(router)
        .layer(middleware::from_fn_with_state(tag, inject))
}

async fn client() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT,
    )
}

/// The tag every page gets; `served` is the host's process id and the generation's number.
fn script_tag(served: &str) -> String {
    format!(r#"<script src="{CLIENT_PATH}" data-served="{served}"></script>"#)
}

async fn events(served: String, mut lifecycle: watch::Receiver<LifecycleState>) -> impl IntoResponse {
    let hello = Event::default().retry(RETRY).data(served);
    let retired = async move {
        // Err: the generation's state is gone, which it is only once it stops.
        let _ = lifecycle.wait_for(|state| state.phase != Lifecycle::Serving).await;
    };
    let stream = stream::once(std::future::ready(Ok::<_, Infallible>(hello)))
        .chain(stream::once(retired).filter_map(|()| std::future::ready(None)));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

async fn inject(State(tag): State<Arc<str>>, request: Request, next: Next) -> Response {
    let head = request.method() == Method::HEAD;
    let response = next.run(request).await;
    if head {
        with_script_length(response, &tag)
    } else {
        with_script(response, &tag).await
    }
}

/// `response` with `tag` in it, if it is a page that can be rewritten whole.
async fn with_script(response: Response, tag: &str) -> Response {
    let length = response
        .body()
        .size_hint()
        .upper()
        .or_else(|| declared_length(response.headers()));
    if !rewritable(&response, length) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let limit = usize::try_from(MAX_PAGE_BYTES).unwrap_or(usize::MAX);
    let page = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            // Part of the body is read already: the page cannot be sent as the app made it.
            tracing::warn!(error = %e, "live reload: cannot read an HTML answer to add its script");
            return (StatusCode::INTERNAL_SERVER_ERROR, "the page's body failed\n").into_response();
        }
    };
    let page = insert(&page, tag);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(page.len()));
    Response::from_parts(parts, Body::from(page))
}

/// A `HEAD` answer has no body, but says how long the `GET` answer's is: longer by the tag, which
/// goes in whether or not the page has a `</body>`.
fn with_script_length(mut response: Response, tag: &str) -> Response {
    let length = declared_length(response.headers());
    match length {
        Some(length) if rewritable(&response, Some(length)) => {
            let longer = length.saturating_add(tag.len() as u64);
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(longer));
        }
        _ => {}
    }
    response
}

/// Whether `response`, whose body is `length` bytes long, is a page that can be rewritten whole.
fn rewritable(response: &Response, length: Option<u64>) -> bool {
    let status = response.status();
    let without_body = status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        );
    let headers = response.headers();
    !without_body && is_html(headers) && !encoded(headers) && length.is_some_and(|length| length <= MAX_PAGE_BYTES)
}

fn is_html(headers: &HeaderMap) -> bool {
    let Some(Ok(content_type)) = headers.get(header::CONTENT_TYPE).map(HeaderValue::to_str) else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("text/html")
}

fn encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|value| !value.as_bytes().eq_ignore_ascii_case(b"identity"))
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// `page` with `tag` before its last `</body` (any case), or at its end.
fn insert(page: &[u8], tag: &str) -> Vec<u8> {
    const BODY_END: &[u8] = b"</body";
    let at = page
        .windows(BODY_END.len())
        .rposition(|window| window.eq_ignore_ascii_case(BODY_END))
        .unwrap_or(page.len());
    let mut with_tag = Vec::with_capacity(page.len() + tag.len());
    with_tag.extend_from_slice(&page[..at]);
    with_tag.extend_from_slice(tag.as_bytes());
    with_tag.extend_from_slice(&page[at..]);
    with_tag
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::response::Html;
    use tower::ServiceExt as _;

    const GENERATION: u64 = 7;

    fn served() -> String {
        format!("{} {GENERATION}", std::process::id())
    }

    fn tag() -> String {
        script_tag(&served())
    }

    fn lifecycle(phase: Lifecycle) -> (watch::Sender<LifecycleState>, watch::Receiver<LifecycleState>) {
        watch::channel(LifecycleState {
            phase,
            idle_grace_ms: 0,
        })
    }

    /// The app's `router` wrapped, and its answer to `GET path`: head and body.
    async fn get_from(router: Router, method: Method, path: &str) -> (http::response::Parts, Vec<u8>) {
        let (_serving, receiver) = lifecycle(Lifecycle::Serving);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("a request");
        let response = wrap(router, GENERATION, receiver)
            .oneshot(request)
            .await
            .expect("infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a body").to_bytes().to_vec();
        (parts, body)
    }

    fn length(parts: &http::response::Parts) -> Option<usize> {
        parts.headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
    }

    #[tokio::test]
    async fn a_page_gets_the_script_once_before_its_body_ends() {
        let page = "<html><body><p>hello</p></BODY></html>";
        let router = Router::new().route("/", get(move || async move { Html(page) }));
        let (parts, body) = get_from(router, Method::GET, "/").await;
        let body = String::from_utf8(body).expect("text");
        assert_eq!(body, format!("<html><body><p>hello</p>{}</BODY></html>", tag()));
        assert_eq!(body.matches(CLIENT_PATH).count(), 1, "{body}");
        assert_eq!(length(&parts), Some(body.len()));
    }

    #[tokio::test]
    async fn a_page_without_a_body_end_gets_the_script_at_its_end() {
        let router = Router::new().route(
            "/",
            get(|| async { ([(header::CONTENT_TYPE, "Text/HTML; charset=utf-8")], "<p>hi") }),
        );
        let (parts, body) = get_from(router, Method::GET, "/").await;
        let expected = format!("<p>hi{}", tag());
        assert_eq!(String::from_utf8(body).expect("text"), expected);
        assert_eq!(length(&parts), Some(expected.len()));
    }

    #[tokio::test]
    async fn a_streamed_page_of_declared_length_gets_the_script() {
        let router = Router::new().route(
            "/",
            get(|| async {
                let chunks = stream::iter(["<body>", "streamed</body>"].map(Ok::<_, Infallible>));
                (
                    [(header::CONTENT_TYPE, "text/html"), (header::CONTENT_LENGTH, "21")],
                    Body::from_stream(chunks),
                )
            }),
        );
        let (parts, body) = get_from(router, Method::GET, "/").await;
        let expected = format!("<body>streamed{}</body>", tag());
        assert_eq!(String::from_utf8(body).expect("text"), expected);
        assert_eq!(length(&parts), Some(expected.len()));
    }

    #[tokio::test]
    async fn what_is_not_a_rewritable_page_is_left_alone() {
        let page = "<html><body>hello</body></html>";
        let router = Router::new()
            .route("/text", get(move || async move { page }))
            .route(
                "/json",
                get(|| async { ([(header::CONTENT_TYPE, "application/json")], "{}") }),
            )
            .route(
                "/gzip",
                get(move || async move { ([(header::CONTENT_ENCODING, "gzip")], Html(page)) }),
            )
            .route(
                "/stream",
                get(|| async {
                    let chunks = stream::iter(["<body>", "</body>"].map(Ok::<_, Infallible>));
                    ([(header::CONTENT_TYPE, "text/html")], Body::from_stream(chunks))
                }),
            )
            .route(
                "/large",
                get(|| async { Html("x".repeat(usize::try_from(MAX_PAGE_BYTES).expect("small") + 1)) }),
            );
        for path in ["/text", "/json", "/gzip", "/stream", "/large"] {
            let (_, body) = get_from(router.clone(), Method::GET, path).await;
            assert!(
                !String::from_utf8_lossy(&body).contains(CLIENT_PATH),
                "{path} got the script"
            );
        }
        let (parts, body) = get_from(router.clone(), Method::GET, "/gzip").await;
        assert_eq!(body, page.as_bytes());
        assert_eq!(length(&parts), Some(page.len()));
    }

    #[tokio::test]
    async fn a_head_answer_says_how_long_the_page_with_its_script_is() {
        let router = Router::new().route("/", get(|| async { Html("<body>hello</body>") }));
        let (got, body) = get_from(router.clone(), Method::GET, "/").await;
        let (head, _) = get_from(router, Method::HEAD, "/").await;
        assert_eq!(length(&head), Some(body.len()));
        assert_eq!(length(&got), Some(body.len()));
    }

    #[tokio::test]
    async fn the_reserved_paths_answer_and_the_apps_other_routes_still_do() {
        let router = Router::new().route("/", get(|| async { "app" }));
        let (parts, body) = get_from(router.clone(), Method::GET, CLIENT_PATH).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains(EVENTS_PATH));
        let (_, body) = get_from(router.clone(), Method::GET, "/").await;
        assert_eq!(body, b"app");
        let (parts, _) = get_from(router, Method::GET, "/missing").await;
        assert_eq!(parts.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn the_stream_names_the_generation_and_ends_when_it_retires() {
        let (phase, receiver) = lifecycle(Lifecycle::Serving);
        let router = wrap(Router::new(), GENERATION, receiver);
        let request = Request::builder()
            .uri(EVENTS_PATH)
            .body(Body::empty())
            .expect("a request");
        let response = router.oneshot(request).await.expect("infallible");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut body = response.into_body();
        let first = body
            .frame()
            .await
            .expect("a first event")
            .expect("no error")
            .into_data()
            .expect("data");
        assert_eq!(
            String::from_utf8_lossy(&first),
            format!("retry: 250\ndata: {}\n\n", served())
        );
        let pending = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
        assert!(pending.is_err(), "the stream stays open while the generation serves");
        phase.send_replace(LifecycleState {
            phase: Lifecycle::Retiring,
            idle_grace_ms: 0,
        });
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
        assert!(matches!(end, Ok(None)), "the stream ends once the generation retires");
    }
}
