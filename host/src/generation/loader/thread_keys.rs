//! The process's pthread keys, and who created each: so that the keys a library copy created are
//! deleted when it is unloaded.
//!
//! Every copy's std creates a key of its own the first time a thread of it needs thread-local
//! destructors run, and keeps it in a `static` that nothing deletes: without this module each
//! reload cost one of glibc's 1 024 keys (`PTHREAD_KEYS_MAX`), and the host aborted with "out of
//! TLS keys" at about reload 1 022.
//!
//! The host binary defines `pthread_key_create` and `pthread_key_delete` and exports them
//! (`host/build.rs`). A library opened with `dlopen` looks its undefined symbols up in the global
//! scope first, and the executable comes first in it, so every library copy's calls come here, as
//! do the host's own; each call is passed on to glibc. A created key is recorded with the address
//! its creator returns to, which tells whose code asked for it: a library copy's, or anyone else's.
//!
//! Deleting a key runs no destructor; it only frees the number. A thread that holds a value for it
//! would never have that value's destructor run, so a copy's keys are deleted only once its
//! threads are joined, and only once `dlclose` has unmapped it, so that no code of the copy can
//! ever use them again (`generation/mod.rs`).

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::util::lock;

type Destructor = Option<unsafe extern "C" fn(*mut c_void)>;

/// A key alive in the process, and the code address its creator returns to.
struct Created {
    key: libc::pthread_key_t,
    creator: usize,
    serial: u64,
}

/// A key [`created_in`] found: its number and which creation of that number it was, since a
/// number deleted (by its creator, or by anyone) may be handed out again at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreatedKey {
    key: libc::pthread_key_t,
    serial: u64,
}

/// Every key created through this module and not deleted since. Held across the call to glibc
/// (which does not call back), so that a number freed by one thread and reused by another is
/// never recorded out of order.
static CREATED: Mutex<Vec<Created>> = Mutex::new(Vec::new());

/// Counts creations, so that each record is told apart from any later one of the same number.
static CREATIONS: AtomicU64 = AtomicU64::new(0);

/// Keys of unloaded copies deleted, since the host started.
static GIVEN_BACK: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    /// glibc's own name for `pthread_key_create`, exported for callers that, like this module,
    /// define `pthread_key_create` themselves.
    fn __pthread_key_create(key: *mut libc::pthread_key_t, destructor: Destructor) -> c_int;
}

/// What every call of `pthread_key_create` in the process reaches: passes `creator`, the return
/// address of the call, to [`create`].
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_key_create(key: *mut libc::pthread_key_t, destructor: Destructor) -> c_int {
    // On entry the return address is on top of the stack; the first two arguments stay in their
    // registers and it becomes the third. A tail jump: `create` returns straight to the caller.
    core::arch::naked_asm!("mov rdx, [rsp]", "jmp {create}", create = sym create)
}

/// What every call of `pthread_key_create` in the process reaches: passes `creator`, the return
/// address of the call, to [`create`].
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_key_create(key: *mut libc::pthread_key_t, destructor: Destructor) -> c_int {
    // The return address is in the link register; it becomes the third argument, and the branch
    // leaves the link register as it was, so `create` returns straight to the caller.
    core::arch::naked_asm!("mov x2, x30", "b {create}", create = sym create)
}

/// Creates the key with glibc and records who asked for it.
///
/// # Safety
/// As glibc's `pthread_key_create`: `key` is valid for a write.
unsafe extern "C" fn create(key: *mut libc::pthread_key_t, destructor: Destructor, creator: usize) -> c_int {
    let mut created = lock(&CREATED);
    // SAFETY: the arguments are the caller's own, passed on unchanged to the function they meant.
    let status = unsafe { __pthread_key_create(key, destructor) };
    if status == 0 {
        // SAFETY: glibc wrote the new key through `key`, which its caller gave for that.
        let key = unsafe { key.read() };
        let serial = CREATIONS.fetch_add(1, Ordering::Relaxed);
        created.push(Created { key, creator, serial });
    }
    status
}

/// What every call of `pthread_key_delete` in the process reaches: deletes the key with glibc and
/// forgets it.
#[unsafe(no_mangle)]
pub extern "C" fn pthread_key_delete(key: libc::pthread_key_t) -> c_int {
    let mut created = lock(&CREATED);
    let status = delete_with_glibc(key);
    if status == 0 {
        created.retain(|c| c.key != key);
    }
    status
}

/// glibc's `pthread_key_delete`, which this binary's own definition hides from a plain call.
fn delete_with_glibc(key: libc::pthread_key_t) -> c_int {
    static GLIBC: OnceLock<usize> = OnceLock::new();
    let address = *GLIBC.get_or_init(|| {
        // SAFETY: `dlsym` with `RTLD_NEXT` looks the name up in the objects loaded after this
        // executable (glibc), reading only the loader's tables; the name is a C string.
        unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_key_delete".as_ptr()) as usize }
    });
    if address == 0 {
        return libc::EINVAL;
    }
    // SAFETY: the address is glibc's `pthread_key_delete`, which has this signature.
    let glibc: extern "C" fn(libc::pthread_key_t) -> c_int = unsafe { std::mem::transmute(address) };
    glibc(key)
}

/// The keys alive now whose creator's code lies in one of `ranges` (a library copy's mappings).
pub fn created_in(ranges: &[(usize, usize)]) -> Vec<CreatedKey> {
    lock(&CREATED)
        .iter()
        .filter(|c| ranges.iter().any(|&(start, end)| (start..end).contains(&c.creator)))
        .map(|c| CreatedKey {
            key: c.key,
            serial: c.serial,
        })
        .collect()
}

/// Deletes the keys found with [`created_in`] that are still alive, and answers how many it
/// deleted. Call only once no code of their creator can run any more and no thread that ran it
/// lives, so that nothing can use them after. A key the copy deleted itself meanwhile (mimalloc
/// deletes its own as the copy is closed) is left alone, even if its number was reused since.
pub fn give_back(keys: &[CreatedKey]) -> usize {
    let mut created = lock(&CREATED);
    let mut deleted = 0;
    for found in keys {
        let Some(at) = created.iter().position(|c| c.serial == found.serial) else {
            continue;
        };
        if delete_with_glibc(found.key) == 0 {
            created.swap_remove(at);
            GIVEN_BACK.fetch_add(1, Ordering::Relaxed);
            deleted += 1;
        } else {
            tracing::warn!(
                key = found.key,
                "could not delete a pthread key of an unloaded library copy"
            );
        }
    }
    deleted
}

/// The process's pthread keys: how many are in use, the most there can be, and how many keys of
/// unloaded library copies were deleted.
#[derive(Debug, Clone, Copy)]
pub struct KeyCount {
    pub in_use: u64,
    pub limit: u64,
    pub given_back: u64,
}

impl KeyCount {
    /// How many more keys can be created.
    pub fn left(&self) -> u64 {
        self.limit.saturating_sub(self.in_use)
    }
}

/// Counts the keys now.
pub fn count() -> KeyCount {
    // SAFETY: `sysconf` only reads a constant of the C library.
    let limit = unsafe { libc::sysconf(libc::_SC_THREAD_KEYS_MAX) };
    KeyCount {
        in_use: lock(&CREATED).len() as u64,
        limit: u64::try_from(limit).unwrap_or(1024),
        given_back: GIVEN_BACK.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_recorded_with_their_creator_and_given_back() {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid place for the new key; no destructor.
        assert_eq!(unsafe { libc::pthread_key_create(&mut key, None) }, 0);
        let here = keys_are_recorded_with_their_creator_and_given_back as *const () as usize;
        let creator = lock(&CREATED)
            .iter()
            .find(|c| c.key == key)
            .map(|c| c.creator)
            .expect("the key is recorded");
        // The creator is an address in this test's code.
        const CODE_SIZE: usize = 16 << 10;
        assert!(
            (here..here + CODE_SIZE).contains(&creator),
            "{creator:#x} is not in {here:#x}.."
        );
        let taken = created_in(&[(here, here + CODE_SIZE)]);
        assert_eq!(taken.iter().map(|c| c.key).collect::<Vec<_>>(), [key]);
        let before = GIVEN_BACK.load(Ordering::Relaxed);
        assert_eq!(give_back(&taken), 1);
        assert_eq!(GIVEN_BACK.load(Ordering::Relaxed), before + 1);
        assert!(created_in(&[(here, here + CODE_SIZE)]).is_empty());
        // Given back once only: the number may already be someone else's.
        assert_eq!(give_back(&taken), 0);
        // Deleted for glibc too: setting a value for it is refused (no other test creates keys).
        // SAFETY: a plain call; glibc checks the key.
        let set = unsafe { libc::pthread_setspecific(key, std::ptr::null()) };
        assert_eq!(set, libc::EINVAL);
    }
}
