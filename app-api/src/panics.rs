//! What a caught panic says: the app's code (a handler, a body, `init`, `shutdown`) panics inside a
//! generation, which logs or reports the message and serves on.

/// The message of a panic payload (`panic!` with a literal gives a `&str`, with arguments a
/// `String`).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "(a non-string panic payload)"
    }
}
