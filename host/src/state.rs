//! The host-owned state store: named cells that outlive every generation.
//!
//! Apps reach it through app-api's `State<T>`. Cells hold bytes (JSON, written by app-api) and a
//! version that grows with every write; writers compare-and-set on the version, so concurrent
//! updates from one generation, or from an old and a new one during a reload, are never lost.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

#[derive(Default)]
pub struct StateStore {
    cells: Mutex<HashMap<String, Cell>>,
}

struct Cell {
    version: u64,
    bytes: Vec<u8>,
}

impl StateStore {
    /// The cell's version (0 if never written) and a copy of its bytes.
    pub fn read<T>(&self, key: &str, copy: impl FnOnce(&[u8]) -> T) -> (u64, Option<T>) {
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        match cells.get(key) {
            Some(cell) => (cell.version, Some(copy(&cell.bytes))),
            None => (0, None),
        }
    }

    /// Stores `bytes` if the cell's version is still `expected`.
    pub fn compare_and_set(&self, key: &str, expected: u64, bytes: &[u8]) -> bool {
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        let current = cells.get(key).map_or(0, |cell| cell.version);
        if current != expected {
            return false;
        }
        cells.insert(
            key.to_owned(),
            Cell {
                version: expected + 1,
                bytes: bytes.to_vec(),
            },
        );
        true
    }

    pub fn len(&self) -> usize {
        self.cells.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_set_refuses_stale_versions() {
        let store = StateStore::default();
        assert_eq!(store.read("k", <[u8]>::to_vec), (0, None));
        assert!(store.compare_and_set("k", 0, b"1"));
        assert!(
            !store.compare_and_set("k", 0, b"2"),
            "a writer that read version 0 must lose"
        );
        assert_eq!(store.read("k", <[u8]>::to_vec), (1, Some(b"1".to_vec())));
        assert!(store.compare_and_set("k", 1, b"2"));
        assert_eq!(store.read("k", <[u8]>::to_vec), (2, Some(b"2".to_vec())));
    }
}
