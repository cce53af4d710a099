//! Exports the host's `pthread_key_create` and `pthread_key_delete` from its executable, so that
//! the app libraries it opens call them instead of glibc's (`src/generation/loader/thread_keys.rs`
//! says why). An executable exports nothing by default.

fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" {
        for symbol in ["pthread_key_create", "pthread_key_delete"] {
            println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol={symbol}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
