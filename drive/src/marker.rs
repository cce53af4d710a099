//! Copies of a fixture library that each do something else without compiling anything: the
//! fixture keeps a marker field (`MARKER=` and a name padded with NULs, in a `static` it reads at
//! run time) and a copy gets another name written into it. Each copy is a library of its own:
//! the host tells versions apart by their bytes.

use anyhow::{bail, Context as _};

/// `library` (the bytes of a built fixture) with the name in its marker field replaced by `name`.
/// The field is `field_len` bytes long and starts with `marker`, which must occur exactly once.
pub fn rename(library: &[u8], marker: &str, field_len: usize, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut found = library
        .windows(marker.len())
        .enumerate()
        .filter(|(_, window)| *window == marker.as_bytes())
        .map(|(at, _)| at);
    let at = found
        .next()
        .with_context(|| format!("the library holds no `{marker}`"))?;
    if found.next().is_some() {
        bail!("the library holds `{marker}` more than once");
    }
    let room = field_len.saturating_sub(marker.len());
    if name.len() > room || at + field_len > library.len() {
        bail!("`{name}` does not fit after `{marker}` ({room} bytes)");
    }
    let mut copy = library.to_vec();
    let field = &mut copy[at + marker.len()..at + field_len];
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_the_one_field() {
        let library = b"..\x00FIXTURE=default\x00\x00\x00\x00\x00..";
        let copy = rename(library, "FIXTURE=", 16, "todos").unwrap();
        assert_eq!(&copy, b"..\x00FIXTURE=todos\x00\x00\x00\x00\x00\x00\x00..");
        assert!(rename(library, "FIXTURE=", 16, "too-long-a-name").is_err());
        assert!(rename(b"FIXTURE=a\x00FIXTURE=b\x00", "FIXTURE=", 10, "c").is_err());
        assert!(rename(b"nothing", "FIXTURE=", 10, "c").is_err());
    }
}
