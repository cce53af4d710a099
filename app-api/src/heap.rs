//! Each library copy's own heap, returned whole when the copy is unloaded.
//!
//! [`export_app!`](crate::export_app) makes [`GenerationHeap`] the library's global allocator: a
//! mimalloc statically linked into the copy, so every copy has its own instance, with its own
//! arenas mapped from the kernel. When the copy is unloaded, mimalloc's destructor (run by
//! `dlclose`) unmaps those arenas. Whatever the copy never freed (a `LazyLock` cache, `tracing`'s
//! global subscriber, a leaked `Box`, fragments its threads left) goes with it, and none of it
//! pins a page of the host's heap.
//!
//! What this asks of both sides (app-abi's ownership rules): nothing the copy allocated may be
//! used after it is unloaded, and neither side takes over a buffer the other allocated (copy
//! out of an `RString` or `RVec` from across the boundary, never `into_string`/`into_vec`:
//! abi_stable adopts the buffer when the element types match, and the heaps differ).

use libmimalloc_sys::{mi_option_set, mi_option_t};

/// mimalloc.h's `mi_option_destroy_on_exit` (the same in its v2 and v3), which libmimalloc-sys does
/// not name. The end-to-end test of a library that leaks a heap per generation fails if it is wrong.
const DESTROY_ON_EXIT: mi_option_t = 22;

/// The global allocator [`export_app!`](crate::export_app) gives an app library.
pub use mimalloc::MiMalloc as GenerationHeap;

/// Makes this copy's heap go when the copy is unloaded: mimalloc's destructor, which `dlclose`
/// runs, then unmaps it. The host calls it (through the symbol `export_app!` exports,
/// `app_abi::RETURN_HEAP_SYMBOL`) just before `dlclose`, and only for a copy it unloads: set at
/// start, the destructor would also run at the exit of a process that keeps a copy loaded because
/// one of its threads still runs, and unmap the heap under that thread.
pub extern "C" fn return_at_unload() {
    // SAFETY: `mi_option_set` only stores the option's value in this copy's mimalloc. The host
    // calls this once every thread that ran this copy's code was joined, right before `dlclose`,
    // and app-abi's rules keep the host from holding memory this copy allocated.
    unsafe { mi_option_set(DESTROY_ON_EXIT, 1) };
}
