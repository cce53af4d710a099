//! Deciding whether a library may be loaded at all.
//!
//! Loading a library is running its code with the host's privileges, so before anything is
//! staged the host checks who could have put the bytes there and, if configured, what the bytes
//! are:
//!
//! - **Ownership and permissions** (like sshd's `StrictModes`): the library file and every
//!   directory above it — along the path as given and along its resolved target, if it is reached
//!   through symlinks — must be owned by root or by the host's user, and must not be writable by
//!   group or others. So must every symlink on the way (whoever owns a link can re-point it, even
//!   in a sticky directory). A directory with the sticky bit (like `/tmp`) may be writable by others:
//!   there only a file's owner can rename or delete it, and the file itself must still pass.
//! - **`--require-sha256`**: the bytes must have exactly this digest.
//! - **`--trusted-key`**: the bytes must carry a detached ed25519 signature, `<app path>.sig`
//!   (64 raw bytes), by one of the keys in the key file (PEM public keys).
//!
//! The file's own checks are made on the open file descriptor, and the digest and signature on
//! the very bytes read from it — the bytes that are then staged and loaded — so the file cannot be
//! swapped between the check and the use.

use std::ffi::OsString;
use std::fs::Metadata;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// What a library must satisfy before it is loaded.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// The required sha256, in lower-case hex.
    pub require_sha256: Option<String>,
    /// Keys one of which must have signed the library; empty means no signature is required.
    pub trusted_keys: Vec<VerifyingKey>,
    /// Where the keys came from, for error messages.
    pub trusted_key_file: Option<PathBuf>,
}

impl TrustPolicy {
    /// Whether any library passes: no digest is required and no signature.
    pub fn checks_nothing(&self) -> bool {
        self.require_sha256.is_none() && self.trusted_keys.is_empty()
    }
}

/// Why a library was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    // `error`, not `source`: the message already says it, and a source would say it twice.
    #[error("cannot read the app library {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("cannot stage a copy of the app library at {copy}: {error}")]
    Stage { copy: PathBuf, error: std::io::Error },
    #[error("the app library {0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("the app library {0} is empty")]
    Empty(PathBuf),
    #[error(
        "refusing to load {library}: {entry} {problem}; a library (or trusted-key file) decides what code \
         the host runs, so it and every directory above it must be owned by root or by the host's user \
         (uid {host_uid}) and writable only by their owner (a directory with the sticky bit, like /tmp, may \
         be writable by others)"
    )]
    Permissions {
        library: PathBuf,
        entry: PathBuf,
        problem: Problem,
        host_uid: u32,
    },
    #[error("refusing to load {library}: its sha256 is {actual}, but --require-sha256 is {required}")]
    Sha256Mismatch {
        library: PathBuf,
        actual: String,
        required: String,
    },
    #[error("refusing to load {library}: cannot read its signature {signature}: {reason}")]
    NoSignature {
        library: PathBuf,
        signature: PathBuf,
        reason: String,
    },
    #[error(
        "refusing to load {library}: the signature {signature} does not match it under any key in {keys} \
         (sha256 of the library: {sha256})"
    )]
    BadSignature {
        library: PathBuf,
        signature: PathBuf,
        keys: String,
        sha256: String,
    },
}

/// What is wrong with one file or directory on a library's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("is owned by uid {0}")]
    OwnedByOther(u32),
    #[error("is writable by its group (mode {0:04o})")]
    GroupWritable(u32),
    #[error("is writable by others (mode {0:04o})")]
    WorldWritable(u32),
}

/// The permission rule for one path entry, apart from any I/O.
pub fn check_entry(is_dir: bool, owner: u32, mode: u32, host_uid: u32) -> Result<(), Problem> {
    const STICKY: u32 = 0o1000;
    if owner != 0 && owner != host_uid {
        return Err(Problem::OwnedByOther(owner));
    }
    let mode = mode & 0o7777;
    // In a sticky directory only an entry's owner may rename or delete it, so writers there can
    // add files but not replace ours (and a file they add fails the ownership check).
    let sticky_dir = is_dir && mode & STICKY != 0;
    if mode & 0o002 != 0 && !sticky_dir {
        return Err(Problem::WorldWritable(mode));
    }
    if mode & 0o020 != 0 && !sticky_dir {
        return Err(Problem::GroupWritable(mode));
    }
    Ok(())
}

fn host_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn check_metadata(library: &Path, entry: &Path, metadata: &Metadata, host_uid: u32) -> Result<(), Refused> {
    check_entry(
        metadata.is_dir(),
        metadata.uid(),
        metadata.permissions().mode(),
        host_uid,
    )
    .map_err(|problem| Refused::Permissions {
        library: library.to_owned(),
        entry: entry.to_owned(),
        problem,
        host_uid,
    })
}

/// Checks every directory above `path` (as given, and as resolved).
fn check_directories(path: &Path, host_uid: u32) -> Result<(), Refused> {
    let mut chains = vec![std::path::absolute(path).unwrap_or_else(|_| path.to_owned())];
    if let Ok(resolved) = std::fs::canonicalize(path) {
        chains.push(resolved);
    }
    for chain in &chains {
        for directory in chain.ancestors().skip(1) {
            if directory.as_os_str().is_empty() {
                continue;
            }
            let metadata = std::fs::metadata(directory).map_err(|source| Refused::Read {
                path: directory.to_owned(),
                error: source,
            })?;
            check_metadata(path, directory, &metadata, host_uid)?;
        }
    }
    Ok(())
}

/// How many symlinks a path may pass through, as the kernel allows (`MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// Checks the owner of every symlink on the way from `path` to the file it names: following
/// each one by hand, so that links reached through other links are checked too.
fn check_symlinks(path: &Path, host_uid: u32) -> Result<(), Refused> {
    let mut remaining: Vec<std::ffi::OsString> = std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .components()
        .rev()
        .map(|c| c.as_os_str().to_owned())
        .collect();
    let mut current = PathBuf::new();
    let mut followed = 0;
    while let Some(component) = remaining.pop() {
        let next = current.join(&component);
        let metadata = std::fs::symlink_metadata(&next).map_err(|source| Refused::Read {
            path: next.clone(),
            error: source,
        })?;
        if !metadata.file_type().is_symlink() {
            current = next;
            continue;
        }
        // A symlink's own mode means nothing; its owner is who may re-point it.
        check_entry(false, metadata.uid(), 0o755, host_uid).map_err(|problem| Refused::Permissions {
            library: path.to_owned(),
            entry: next.clone(),
            problem,
            host_uid,
        })?;
        followed += 1;
        if followed > MAX_SYMLINKS {
            return Err(Refused::Read {
                path: path.to_owned(),
                error: std::io::Error::other("too many levels of symbolic links"),
            });
        }
        let target = std::fs::read_link(&next).map_err(|source| Refused::Read {
            path: next.clone(),
            error: source,
        })?;
        // The target's components replace the link's; an absolute one starts again at `/`.
        if target.is_absolute() {
            current = PathBuf::new();
        }
        remaining.extend(target.components().rev().map(|c| c.as_os_str().to_owned()));
    }
    Ok(())
}

/// A library's sha256 (hex), computed before [`read_trusted`] returned, or still being computed.
#[derive(Debug)]
pub enum Digest {
    Known(String),
    Hashing(std::thread::JoinHandle<String>),
}

impl Digest {
    /// The digest, once the bytes are hashed.
    pub fn wait(self) -> String {
        match self {
            Digest::Known(hex) => hex,
            // Hashing bytes cannot panic; should it all the same, the version stays unnamed ("")
            // rather than leave whoever waits for its name waiting for ever.
            Digest::Hashing(hashing) => hashing.join().unwrap_or_default(),
        }
    }
}

/// One file as `stat` shows it: any write, truncation, rename over it or change of its mode moves
/// one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileIdentity {
    fn of(metadata: &Metadata) -> FileIdentity {
        FileIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }

    /// How long after `instant` the file will have last changed more than `margin` before.
    fn unsettled_for(&self, instant: SystemTime, margin: Duration) -> Option<Duration> {
        let nanos = u32::try_from(self.changed.1).ok()?;
        let changed = UNIX_EPOCH + Duration::new(u64::try_from(self.changed.0).ok()?, nanos);
        (changed + margin + Duration::from_millis(1))
            .duration_since(instant)
            .ok()
    }

    /// Whether the file last changed more than `margin` before `instant`. The kernel stamps
    /// changes with a coarse clock (a tick, up to 10 ms): a file that changed in the same tick
    /// as it was copied could change again without its stamp moving.
    fn settled(&self, instant: SystemTime, margin: Duration) -> bool {
        let Ok(nanos) = u32::try_from(self.changed.1) else {
            return false;
        };
        let changed = match u64::try_from(self.changed.0) {
            Ok(secs) => UNIX_EPOCH + Duration::new(secs, nanos),
            Err(_) => return false,
        };
        changed + margin < instant
    }
}

/// What a library (and its detached signature, when keys must sign it) was when it passed its
/// checks and was copied. A later look that finds the same stamp, on a file that had settled
/// before it was copied, knows the copy still holds the file's bytes and the checks still hold:
/// a copy made ahead of a reload can serve it (`reload/ahead.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStamp {
    library: FileIdentity,
    signature: Option<FileIdentity>,
}

impl SourceStamp {
    /// Whether every file stamped had last changed more than `margin` before `instant`.
    pub fn settled(&self, instant: SystemTime, margin: Duration) -> bool {
        self.library.settled(instant, margin) && self.signature.is_none_or(|s| s.settled(instant, margin))
    }
}

/// How long the file at `path` (and its signature) must stay as it is for its last change to lie
/// more than `margin` before it: `None` if it already does, or cannot be looked at.
pub fn unsettled_for(path: &Path, instant: SystemTime, margin: Duration) -> Option<Duration> {
    let files = [path.to_owned(), signature_path(path)];
    files
        .iter()
        .filter_map(|file| std::fs::metadata(file).ok())
        .filter_map(|metadata| FileIdentity::of(&metadata).unsettled_for(instant, margin))
        .max()
}

/// Opens the library at `path` and makes the checks on who could have put it there (the file, the
/// directories above it, the symlinks on the way), and stamps it. The signature is stamped before
/// anything reads it: a stamp found again later means it was not changed after being read.
pub fn check_source(path: &Path, policy: &TrustPolicy) -> Result<(std::fs::File, SourceStamp), Refused> {
    let read_error = |source| Refused::Read {
        path: path.to_owned(),
        error: source,
    };
    let uid = host_uid();
    let file = std::fs::File::open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.is_file() {
        return Err(Refused::NotAFile(path.to_owned()));
    }
    check_metadata(path, path, &metadata, uid)?;
    check_directories(path, uid)?;
    check_symlinks(path, uid)?;
    let signature = (!policy.trusted_keys.is_empty())
        .then(|| std::fs::metadata(signature_path(path)).ok())
        .flatten()
        .map(|metadata| FileIdentity::of(&metadata));
    let stamp = SourceStamp {
        library: FileIdentity::of(&metadata),
        signature,
    };
    Ok((file, stamp))
}

/// A library checked and copied by [`read_trusted`].
#[derive(Debug)]
pub struct Copied<R> {
    pub digest: Digest,
    /// What `alongside` returned.
    pub alongside: R,
    /// The source as it was copied; `None` if it changed while it was copied.
    pub source: Option<SourceStamp>,
}

/// Copies the library at `path` to `copy` (a new file in the host's staging directory), checks the
/// copy against `policy`, and returns its sha256. The bytes checked are the copy's, mapped: the
/// ones `dlopen` will map. They are given to `alongside`, which runs while they are hashed and
/// checked: work that is useless if they are refused but costs nothing to undo (checking the
/// image, trying its initialisers), done in parallel with the hash rather than after it. Its
/// result is returned with the digest. A policy that checks nothing needs no digest to pass: then
/// the hashing goes on after this returns ([`Digest::Hashing`]), alongside whatever the caller
/// does next. The caller removes `copy` if anything refuses it.
pub fn read_trusted<R: Send>(
    path: &Path,
    copy: &Path,
    policy: &TrustPolicy,
    alongside: impl FnOnce(&[u8]) -> R + Send,
) -> Result<Copied<R>, Refused> {
    let read_error = |source| Refused::Read {
        path: path.to_owned(),
        error: source,
    };
    let stage_error = |source| Refused::Stage {
        copy: copy.to_owned(),
        error: source,
    };
    let (mut file, stamp) = check_source(path, policy)?;

    let copying = std::time::Instant::now();
    let mut staged = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(copy)
        .map_err(stage_error)?;
    // Within the kernel (`copy_file_range`): no pass through a buffer of the host's.
    let copied = std::io::copy(&mut file, &mut staged).map_err(stage_error)?;
    let unchanged = file
        .metadata()
        .is_ok_and(|after| FileIdentity::of(&after) == stamp.library);
    drop(file);
    tracing::debug!(
        duration_ms = crate::util::ms(copying.elapsed()),
        bytes = copied,
        "library copied"
    );
    if copied == 0 {
        return Err(Refused::Empty(path.to_owned()));
    }
    let source = unchanged.then_some(stamp);
    let image = std::sync::Arc::new(crate::generation::loader::map_copy(&staged).map_err(stage_error)?);
    drop(staged);
    if policy.checks_nothing() {
        let hashed = std::sync::Arc::clone(&image);
        let hashing = std::thread::Builder::new()
            .name("host-sha256".into())
            .spawn(move || hash(&hashed))
            .map_err(read_error)?;
        let alongside = alongside(&image);
        return Ok(Copied {
            digest: Digest::Hashing(hashing),
            alongside,
            source,
        });
    }
    check_read(path, policy, &image, alongside).map(|(sha256, alongside)| Copied {
        digest: Digest::Known(sha256),
        alongside,
        source,
    })
}

/// The sha256 of `bytes`, in hex.
pub fn hash(bytes: &[u8]) -> String {
    let hashing = std::time::Instant::now();
    let sha256 = format!("{:x}", Sha256::digest(bytes));
    tracing::debug!(duration_ms = crate::util::ms(hashing.elapsed()), "library hashed");
    sha256
}

/// The part of [`read_trusted`] after the read, for a policy that checks something: the hash,
/// `alongside`, and the policy.
fn check_read<R: Send>(
    path: &Path,
    policy: &TrustPolicy,
    bytes: &[u8],
    alongside: impl FnOnce(&[u8]) -> R + Send,
) -> Result<(String, R), Refused> {
    let (sha256, alongside) = std::thread::scope(|scope| {
        let other = scope.spawn(|| alongside(bytes));
        let sha256 = hash(bytes);
        // A panic in `alongside` is the caller's own, and goes on in the caller.
        let alongside = other.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (sha256, alongside)
    });

    if let Some(required) = &policy.require_sha256 {
        if *required != sha256 {
            return Err(Refused::Sha256Mismatch {
                library: path.to_owned(),
                actual: sha256,
                required: required.clone(),
            });
        }
    }
    if !policy.trusted_keys.is_empty() {
        verify_signature(path, bytes, &sha256, policy)?;
    }
    Ok((sha256, alongside))
}

/// The detached signature of the library at `path`.
pub fn signature_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".sig");
    PathBuf::from(name)
}

fn verify_signature(path: &Path, bytes: &[u8], sha256: &str, policy: &TrustPolicy) -> Result<(), Refused> {
    let signature_file = signature_path(path);
    let no_signature = |reason: String| Refused::NoSignature {
        library: path.to_owned(),
        signature: signature_file.clone(),
        reason,
    };
    let raw = std::fs::read(&signature_file).map_err(|e| no_signature(e.to_string()))?;
    let raw: [u8; 64] = raw
        .as_slice()
        .try_into()
        .map_err(|_| no_signature(format!("it has {} bytes; an ed25519 signature has 64", raw.len())))?;
    let signature = Signature::from_bytes(&raw);
    if policy
        .trusted_keys
        .iter()
        .any(|key| key.verify_strict(bytes, &signature).is_ok())
    {
        return Ok(());
    }
    Err(Refused::BadSignature {
        library: path.to_owned(),
        signature: signature_file,
        keys: policy
            .trusted_key_file
            .as_ref()
            .map_or_else(|| "the trusted keys".to_string(), |p| p.display().to_string()),
        sha256: sha256.to_string(),
    })
}

/// Reads the public keys (one or more PEM `PUBLIC KEY` blocks) from a trusted-key file.
/// The file must pass the same ownership and permission checks as a library: whoever can write
/// it can add a key.
pub fn read_trusted_keys(path: &Path) -> anyhow::Result<Vec<VerifyingKey>> {
    let context = || format!("cannot read the trusted keys {}", path.display());
    let uid = host_uid();
    let mut file = std::fs::File::open(path).with_context(context)?;
    let metadata = file.metadata().with_context(context)?;
    check_metadata(path, path, &metadata, uid)?;
    check_directories(path, uid)?;
    check_symlinks(path, uid)?;
    let mut text = String::new();
    file.read_to_string(&mut text).with_context(context)?;
    let keys = parse_public_keys(&text).with_context(|| format!("invalid trusted-key file {}", path.display()))?;
    Ok(keys)
}

const PEM_BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
const PEM_END: &str = "-----END PUBLIC KEY-----";

pub fn parse_public_keys(text: &str) -> anyhow::Result<Vec<VerifyingKey>> {
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(PEM_BEGIN) {
        let end = rest[start..]
            .find(PEM_END)
            .map(|e| start + e + PEM_END.len())
            .context("a PUBLIC KEY block has no END line")?;
        let key = VerifyingKey::from_public_key_pem(&rest[start..end])
            .map_err(|e| anyhow::anyhow!("public key {} is not an ed25519 key: {e}", keys.len() + 1))?;
        keys.push(key);
        rest = &rest[end..];
    }
    anyhow::ensure!(!keys.is_empty(), "no `{PEM_BEGIN}` block found");
    Ok(keys)
}

/// `host keygen`: writes a new private key to `secret` (mode 0600) and its public key to
/// `secret.pub`.
pub fn keygen(secret: &Path) -> anyhow::Result<PathBuf> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let key = SigningKey::from_bytes(&seed);
    // PKCS#8 v1 (no public key inside): the form openssl writes and reads.
    let private = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(Default::default())
    .map_err(|e| anyhow::anyhow!("cannot encode the private key: {e}"))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| anyhow::anyhow!("cannot encode the public key: {e}"))?;
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(secret)
            .with_context(|| format!("cannot create {}", secret.display()))?;
        file.write_all(private.as_bytes())
            .with_context(|| format!("cannot write {}", secret.display()))?;
    }
    let public_path = {
        let mut name = OsString::from(secret.as_os_str());
        name.push(".pub");
        PathBuf::from(name)
    };
    std::fs::write(&public_path, public).with_context(|| format!("cannot write {}", public_path.display()))?;
    Ok(public_path)
}

/// `host sign`: writes the detached signature of `library` to `library.sig`.
pub fn sign(key: &Path, library: &Path) -> anyhow::Result<PathBuf> {
    let pem = std::fs::read_to_string(key).with_context(|| format!("cannot read the private key {}", key.display()))?;
    let key = SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{} is not an ed25519 private key (PKCS#8 PEM): {e}", key.display()))?;
    let bytes = std::fs::read(library).with_context(|| format!("cannot read {}", library.display()))?;
    let signature = key.sign(&bytes);
    let path = signature_path(library);
    std::fs::write(&path, signature.to_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u32 = 1000;

    #[test]
    fn owner_or_root_with_private_modes_pass() {
        assert_eq!(check_entry(false, HOST, 0o644, HOST), Ok(()));
        assert_eq!(check_entry(false, 0, 0o755, HOST), Ok(()));
        assert_eq!(check_entry(true, 0, 0o755, HOST), Ok(()));
        assert_eq!(check_entry(true, HOST, 0o700, HOST), Ok(()));
    }

    #[test]
    fn other_owners_are_refused() {
        assert_eq!(check_entry(false, 1001, 0o644, HOST), Err(Problem::OwnedByOther(1001)));
        assert_eq!(check_entry(true, 1001, 0o755, 0), Err(Problem::OwnedByOther(1001)));
    }

    #[test]
    fn group_or_world_writable_is_refused() {
        assert_eq!(
            check_entry(false, HOST, 0o664, HOST),
            Err(Problem::GroupWritable(0o664))
        );
        assert_eq!(
            check_entry(false, HOST, 0o646, HOST),
            Err(Problem::WorldWritable(0o646))
        );
        assert_eq!(check_entry(true, 0, 0o777, HOST), Err(Problem::WorldWritable(0o777)));
        assert_eq!(check_entry(true, 0, 0o775, HOST), Err(Problem::GroupWritable(0o775)));
        // The sticky bit protects entries of a directory, not a file's own contents.
        assert_eq!(
            check_entry(false, HOST, 0o1666, HOST),
            Err(Problem::WorldWritable(0o1666))
        );
    }

    #[test]
    fn sticky_directories_like_tmp_pass() {
        assert_eq!(check_entry(true, 0, 0o1777, HOST), Ok(()));
        assert_eq!(check_entry(true, 0, 0o1775, HOST), Ok(()));
    }

    fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn symlinks_owned_by_others_are_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let library = write(dir.path(), "lib.so", b"library", 0o644);
        let chain = dir.path().join("chain");
        std::os::unix::fs::symlink(&library, &chain).expect("a symlink");
        let link = dir.path().join("app.so");
        std::os::unix::fs::symlink("chain", &link).expect("a relative symlink to a symlink");
        let uid = host_uid();
        check_symlinks(&link, uid).expect("links owned by the host's user pass");
        // Only root can give a link away; elsewhere the rule is covered by `check_entry`.
        if uid != 0 {
            return;
        }
        let stranger = rustix::process::Uid::from_raw(54321);
        rustix::fs::chownat(
            rustix::fs::CWD,
            &chain,
            Some(stranger),
            None,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .expect("lchown");
        let refused = check_symlinks(&link, uid).expect_err("a link another user owns is refused");
        assert!(refused.to_string().contains("chain"), "{refused}");
        assert!(refused.to_string().contains("owned by uid 54321"), "{refused}");
    }

    #[test]
    fn files_are_checked_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = write(dir.path(), "good.so", b"code", 0o644);
        let copy = dir.path().join("copy.so");
        let Copied {
            digest: sha256,
            alongside: seen,
            source,
        } = read_trusted(&good, &copy, &TrustPolicy::default(), <[u8]>::to_vec).expect("accepted");
        assert!(source.is_some(), "the file did not change while it was copied");
        assert_eq!(seen, b"code", "`alongside` gets exactly the bytes checked");
        assert!(matches!(sha256, Digest::Hashing(_)), "nothing waits for the digest");
        assert_eq!(sha256.wait(), format!("{:x}", Sha256::digest(b"code")));
        let writable = write(dir.path(), "writable.so", b"code", 0o666);
        let message = read_trusted(&writable, &copy, &TrustPolicy::default(), |_| ())
            .expect_err("refused")
            .to_string();
        assert!(message.contains("writable by others"), "{message}");

        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let message = read_trusted(&good, &copy, &TrustPolicy::default(), |_| ())
            .expect_err("refused")
            .to_string();
        assert!(message.contains("writable by others"), "{message}");
    }

    #[test]
    fn digest_and_signature_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let library = write(dir.path(), "app.so", b"library bytes", 0o644);
        let digest = format!("{:x}", Sha256::digest(b"library bytes"));
        let copy = dir.path().join("copy.so");
        let pinned = TrustPolicy {
            require_sha256: Some(digest),
            ..TrustPolicy::default()
        };
        read_trusted(&library, &copy, &pinned, |_| ()).expect("the right digest passes");
        let wrong = TrustPolicy {
            require_sha256: Some("0".repeat(64)),
            ..TrustPolicy::default()
        };
        assert!(matches!(
            read_trusted(&library, &copy, &wrong, |_| ()),
            Err(Refused::Sha256Mismatch { .. })
        ));

        let secret = dir.path().join("key");
        let public = keygen(&secret).expect("keygen");
        let keys = read_trusted_keys(&public).expect("keys");
        let signed = TrustPolicy {
            trusted_keys: keys,
            trusted_key_file: Some(public),
            ..TrustPolicy::default()
        };
        assert!(matches!(
            read_trusted(&library, &copy, &signed, |_| ()),
            Err(Refused::NoSignature { .. })
        ));
        sign(&secret, &library).expect("sign");
        read_trusted(&library, &copy, &signed, |_| ()).expect("a good signature passes");
        write(dir.path(), "app.so", b"other bytes", 0o644);
        assert!(matches!(
            read_trusted(&library, &copy, &signed, |_| ()),
            Err(Refused::BadSignature { .. })
        ));
    }

    /// Keys and signatures made by openssl work, and openssl reads `host keygen`'s keys.
    #[test]
    fn openssl_compatible() {
        fn openssl(args: &[&std::ffi::OsStr]) -> bool {
            std::process::Command::new("openssl")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        }
        use std::ffi::OsStr;
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, public) = (dir.path().join("key.pem"), dir.path().join("key.pub"));
        let library = write(dir.path(), "app.so", b"library bytes", 0o644);
        let signature = signature_path(&library);
        let s = OsStr::new;
        if !openssl(&[s("genpkey"), s("-algorithm"), s("ed25519"), s("-out"), key.as_os_str()]) {
            eprintln!("skipped: no openssl with ed25519");
            return;
        }
        assert!(openssl(&[
            s("pkey"),
            s("-in"),
            key.as_os_str(),
            s("-pubout"),
            s("-out"),
            public.as_os_str()
        ]));
        assert!(openssl(&[
            s("pkeyutl"),
            s("-sign"),
            s("-rawin"),
            s("-inkey"),
            key.as_os_str(),
            s("-in"),
            library.as_os_str(),
            s("-out"),
            signature.as_os_str(),
        ]));
        let policy = TrustPolicy {
            trusted_keys: read_trusted_keys(&public).expect("openssl's public key"),
            ..TrustPolicy::default()
        };
        read_trusted(&library, &dir.path().join("copy.so"), &policy, |_| ()).expect("openssl's signature verifies");

        let ours = dir.path().join("ours");
        keygen(&ours).expect("keygen");
        assert!(openssl(&[s("pkey"), s("-in"), ours.as_os_str(), s("-noout")]));
    }

    #[test]
    fn several_keys_may_be_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = std::fs::read_to_string(keygen(&dir.path().join("a")).expect("keygen")).expect("read");
        let b = std::fs::read_to_string(keygen(&dir.path().join("b")).expect("keygen")).expect("read");
        assert_eq!(parse_public_keys(&format!("{a}\n{b}")).expect("parsed").len(), 2);
        assert!(parse_public_keys("nothing here").is_err());
    }

    #[test]
    fn a_writable_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let public = keygen(&dir.path().join("key")).expect("keygen");
        read_trusted_keys(&public).expect("a private key file is read");
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let message = format!("{:#}", read_trusted_keys(&public).expect_err("refused"));
        assert!(message.contains("writable by others"), "{message}");
    }
}
