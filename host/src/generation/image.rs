//! A library image as the host sees it outside the loader: the checks of a staged copy's bytes
//! before anything maps it, and where a copy is mapped once loaded (read from `/proc/self/maps`).
//! None of it needs `unsafe`; the loader (`loader.rs`) uses it.

use std::path::Path;

use crate::generation::loader::LoadError;

/// Refuses, before `dlopen`, an ELF image whose program headers or loadable segments run past its
/// end, as a copy still being written does (glibc maps such a file anyway and the process dies of
/// SIGBUS when the loader touches the missing pages), and one with tokio's signal driver in it.
/// Files that are not 64-bit ELF at all are left for `dlopen` to refuse with its own reason.
pub fn check_image(path: &Path, image: &[u8]) -> Result<(), LoadError> {
    check_segments(path, image)?;
    // A message of tokio's signal driver, linked in only with the `signal` feature: the driver
    // is built with every runtime, so its mere presence means the leak described in the error.
    if memchr::memmem::find(image, b"EOF on self-pipe").is_some() {
        return Err(LoadError::TokioSignal {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// The part of [`check_image`] about segments cut short.
fn check_segments(path: &Path, image: &[u8]) -> Result<(), LoadError> {
    use object::Endianness;
    use object::elf::{FileHeader64, PT_LOAD};
    use object::read::elf::{FileHeader as _, ProgramHeader as _};

    let truncated = |reason: String| LoadError::Truncated {
        path: path.display().to_string(),
        reason,
    };
    let Ok(header) = FileHeader64::<Endianness>::parse(image) else {
        return Ok(());
    };
    let Ok(endian) = header.endian() else { return Ok(()) };
    let segments = header.program_headers(endian, image).map_err(|e| {
        truncated(format!(
            "its program headers do not fit in its {} bytes: {e}",
            image.len()
        ))
    })?;
    for (index, segment) in segments.iter().enumerate() {
        if segment.p_type(endian) != PT_LOAD {
            continue;
        }
        let end = segment.p_offset(endian).checked_add(segment.p_filesz(endian));
        if end.is_none_or(|end| end > image.len() as u64) {
            return Err(truncated(format!(
                "loadable segment {index} needs bytes up to {} but the file has {}",
                end.map_or_else(|| "beyond 2^64".to_string(), |end| end.to_string()),
                image.len()
            )));
        }
    }
    Ok(())
}

/// The address ranges at which `path` is mapped in this process (one per mapping).
pub fn mapped_ranges(path: &Path) -> Vec<(usize, usize)> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let needle = path.to_string_lossy();
    maps.lines()
        // `contains`: a mapping of a file deleted since ends with " (deleted)".
        .filter(|line| line.contains(needle.as_ref()))
        .filter_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_cut_short_are_refused_before_dlopen() {
        let path = Path::new("/proc/self/exe");
        let image = std::fs::read(path).expect("this test's own executable is readable");
        // This test's executable has tokio's signal driver (the host uses it): only its segments
        // are checked here.
        check_segments(path, &image).expect("a whole ELF image passes");
        check_image(path, b"not an ELF file at all").expect("non-ELF files are left for dlopen to refuse");
        let error = check_image(path, &image[..4096]).expect_err("a cut image is refused");
        let with_signal_driver = b"a library with the message `EOF on self-pipe` in it";
        let refused = check_image(path, with_signal_driver).expect_err("tokio's signal driver is refused");
        assert!(refused.to_string().contains("`signal` feature"), "{refused}");
        assert!(error.to_string().contains("cut short"), "{error}");
    }
}
