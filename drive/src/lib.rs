//! How the end-to-end tests (`tests/`), `cargo xtask dev` and the benchmarks (`cargo xtask bench`)
//! drive the servers they start, from outside: [`process`] signals them and waits for them, never
//! longer than it is told and never by name; [`http`] sends one plain HTTP/1.1 request and reads
//! the whole answer.
//!
//! Blocking and small on purpose (std and rustix): the xtask builds it before it can do anything.
//! What speaks HTTP/2, keeps connections alive or streams (the tests' `client`, the benchmarks'
//! load generator and streaming client) exercises the protocol itself and stays with its user.

pub mod http;
pub mod process;
