//! State that survives reloads.
//!
//! A generation's memory disappears with its library, so state that must outlive a reload lives in
//! the host: a store of named cells, each holding one serde value as JSON. A [`State<T>`] is a typed
//! handle on one cell.
//!
//! - **No lost update.** [`State::update`] is an atomic read-modify-write: it reads the cell,
//!   applies the closure, and writes back only if no other writer (another request, or the other
//!   generation during a reload) wrote in between; otherwise it retries with the fresh value. Old
//!   and new generations may serve side by side during a reload and both see one value.
//! - **Schema evolution.** A new version may add fields (give them `#[serde(default)]`), and it
//!   reads what the old version wrote. A write keeps the stored fields that `T` does not know
//!   (that did not survive reading the value as `T`), so an older version still draining does
//!   not erase fields a newer one added; everything `T` does know is written as `T` now has it,
//!   so a removed map key or a field set to `None` stays removed.
//! - **Refusal.** [`InitContext::state`](crate::InitContext::state) checks, during `init`, that the
//!   cell's current value can be read as `T`. If it cannot, `init` fails with a clear error, the
//!   reload is refused, and the old version keeps serving.
//! - **Failure.** If the host cannot read or write its store (a `--state-file` whose disk fails),
//!   [`State::get`] and [`State::update`] return [`StateError::Unavailable`] at once: a value is
//!   never made up, and an update neither waits nor half-happens.
//!
//! ```no_run
//! use app_api::axum::{extract::State as Extract, routing::post, Router};
//! use app_api::{App, InitContext, State};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Default)]
//! struct Visits {
//!     count: u64,
//! }
//!
//! struct Counter {
//!     visits: State<Visits>,
//! }
//!
//! impl App for Counter {
//!     async fn init(ctx: InitContext) -> Result<Self, app_api::Error> {
//!         Ok(Counter { visits: ctx.state("visits")? })
//!     }
//!
//!     fn router(&self) -> Router {
//!         Router::new()
//!             .route("/visit", post(|Extract(visits): Extract<State<Visits>>| async move {
//!                 match visits.update(|v| { v.count += 1; v.count }) {
//!                     Ok(count) => count.to_string(),
//!                     Err(e) => e.to_string(),
//!                 }
//!             }))
//!             .with_state(self.visits.clone())
//!     }
//! }
//! # app_api::export_app!(Counter);
//! ```
//!
//! A `State` is only usable while its generation runs; keep it in the app, its router and its
//! tasks, not in a `static`.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};

use abi_stable::std_types::{RResult, RSlice, RStr};
use serde::Serialize;
use serde::de::DeserializeOwned;

use app_abi::StateApi;

/// Why a state cell could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The cell holds a value this version cannot read as `T` (returned from `init`, it refuses
    /// the new version).
    #[error("state `{key}` holds a value this version cannot read as {type_name}: {source}")]
    Incompatible {
        /// The cell's name.
        key: String,
        /// The type the value was read as.
        type_name: &'static str,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The new value cannot be serialised as JSON.
    #[error("state `{key}` cannot be stored: {source}")]
    Serialize {
        /// The cell's name.
        key: String,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The host cannot read or write its store (a state file whose disk fails, say). Nothing was
    /// written; the host's log has the details too.
    #[error("state `{key}` cannot be read or written: {reason}")]
    Unavailable {
        /// The cell's name.
        key: String,
        /// What the host said.
        reason: String,
    },
}

/// Where a generation's state cells live.
#[derive(Clone, Debug)]
pub(crate) enum Cells {
    /// In the host, through its state interface: they outlive the library.
    Host(StateApi),
    /// In this process's memory, for an app served without the host
    /// ([`serve_without_host`](crate::serve_without_host)): each cell a version and a value.
    InProcess(Arc<Mutex<HashMap<String, InProcessCell>>>),
}

/// A cell kept in this process: its version (how many writes it has had) and its value.
type InProcessCell = (u64, Vec<u8>);

impl Cells {
    /// Empty cells in this process's memory.
    pub(crate) fn in_process() -> Cells {
        Cells::InProcess(Arc::default())
    }

    /// Calls `with` with the cell's version (0 if it was never written) and its bytes; or says
    /// why the host cannot read it.
    fn read<R>(&self, key: &str, with: impl FnOnce(u64, Option<&[u8]>) -> R) -> Result<R, String> {
        match self {
            Cells::Host(api) => match (api.read)(api.handle, RStr::from_str(key)) {
                RResult::ROk(cell) => Ok(with(
                    cell.version,
                    cell.bytes.as_ref().into_option().map(|bytes| bytes.as_slice()),
                )),
                RResult::RErr(reason) => Err(reason.as_str().to_owned()),
            },
            Cells::InProcess(cells) => Ok(match cells.lock().unwrap_or_else(PoisonError::into_inner).get(key) {
                Some((version, bytes)) => with(*version, Some(bytes)),
                None => with(0, None),
            }),
        }
    }

    /// Writes the cell if its version is still `version`; whether it did, or why the host cannot
    /// write it.
    fn compare_and_set(&self, key: &str, version: u64, bytes: Vec<u8>) -> Result<bool, String> {
        match self {
            Cells::Host(api) => {
                (api.compare_and_set)(api.handle, RStr::from_str(key), version, RSlice::from_slice(&bytes))
                    .into_result()
                    .map_err(|reason| reason.as_str().to_owned())
            }
            Cells::InProcess(cells) => {
                let mut cells = cells.lock().unwrap_or_else(PoisonError::into_inner);
                let current = cells.get(key).map_or(0, |(version, _)| *version);
                if current != version {
                    return Ok(false);
                }
                cells.insert(key.to_owned(), (version + 1, bytes));
                Ok(true)
            }
        }
    }
}

/// A cell as read: its version, its stored JSON, and its value as `T` (an error if `T` cannot
/// read what it holds).
type Read<T> = (u64, Option<serde_json::Value>, Result<T, StateError>);

/// A typed handle on one host-owned state cell. Cheap to clone; see the [module docs](self).
pub struct State<T> {
    key: String,
    cells: Cells,
    _value: PhantomData<fn() -> T>,
}

impl<T> Clone for State<T> {
    fn clone(&self) -> Self {
        State {
            key: self.key.clone(),
            cells: self.cells.clone(),
            _value: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for State<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("key", &self.key).finish_non_exhaustive()
    }
}

impl<T: Serialize + DeserializeOwned + Default> State<T> {
    pub(crate) fn open(cells: Cells, key: &str) -> Result<Self, StateError> {
        let state = State {
            key: key.to_owned(),
            cells,
            _value: PhantomData,
        };
        state.get()?;
        Ok(state)
    }

    /// The cell's name.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current value (`T::default()` if the cell was never written).
    pub fn get(&self) -> Result<T, StateError> {
        self.read_raw()?.2
    }

    /// Replaces the value.
    pub fn set(&self, value: T) -> Result<(), StateError> {
        let mut value = Some(value);
        self.update(|current| {
            if let Some(value) = value.take() {
                *current = value;
            }
        })
    }

    /// Atomically applies `change` to the current value and stores the result, returning what
    /// `change` returned. `change` may run more than once if other writers race with it, each
    /// time on the freshest value, so it should only compute from its argument.
    pub fn update<R>(&self, mut change: impl FnMut(&mut T) -> R) -> Result<R, StateError> {
        loop {
            let (version, stored, value) = self.read_raw()?;
            let mut value = value?;
            // What of the stored value `T` knows: everything else is another version's to keep.
            let known = match &stored {
                Some(_) => Some(serde_json::to_value(&value).map_err(|source| self.serialize_error(source))?),
                None => None,
            };
            let result = change(&mut value);
            let bytes = self.encode(&value, stored, known.as_ref())?;
            if self
                .cells
                .compare_and_set(&self.key, version, bytes)
                .map_err(|reason| self.unavailable(reason))?
            {
                return Ok(result);
            }
            // Another writer came first: go again on its value.
            std::thread::yield_now();
        }
    }

    /// The cell as it is now (an error if the host cannot read it).
    fn read_raw(&self) -> Result<Read<T>, StateError> {
        self.cells
            .read(&self.key, |version, bytes| {
                let Some(bytes) = bytes else {
                    return (version, None, Ok(T::default()));
                };
                match serde_json::from_slice::<serde_json::Value>(bytes) {
                    Ok(stored) => {
                        let value = T::deserialize(&stored).map_err(|source| self.incompatible(source));
                        (version, Some(stored), value)
                    }
                    Err(source) => (version, None, Err(self.incompatible(source))),
                }
            })
            .map_err(|reason| self.unavailable(reason))
    }

    fn unavailable(&self, reason: String) -> StateError {
        StateError::Unavailable {
            key: self.key.clone(),
            reason,
        }
    }

    /// Serialises `value`, keeping the fields of the stored object that `T` does not know.
    fn encode(
        &self,
        value: &T,
        stored: Option<serde_json::Value>,
        known: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, StateError> {
        let new = serde_json::to_value(value).map_err(|source| self.serialize_error(source))?;
        let merged = match (stored, known) {
            (Some(stored), Some(known)) => keep_unknown_fields(stored, known, new),
            _ => new,
        };
        serde_json::to_vec(&merged).map_err(|source| self.serialize_error(source))
    }

    fn serialize_error(&self, source: serde_json::Error) -> StateError {
        StateError::Serialize {
            key: self.key.clone(),
            source,
        }
    }

    fn incompatible(&self, source: serde_json::Error) -> StateError {
        StateError::Incompatible {
            key: self.key.clone(),
            type_name: std::any::type_name::<T>(),
            source,
        }
    }
}

/// `new`, plus the fields of `stored` that reading it as the app's type dropped (absent from
/// `known`, the stored value as that type sees it), at every level of nested objects. A field
/// that `known` has and `new` lacks was removed by the app, and stays removed.
fn keep_unknown_fields(
    stored: serde_json::Value,
    known: &serde_json::Value,
    new: serde_json::Value,
) -> serde_json::Value {
    use serde_json::Value;
    match (stored, new) {
        (Value::Object(stored), Value::Object(mut new)) => {
            let known = known.as_object();
            for (key, old) in stored {
                match known.and_then(|known| known.get(&key)) {
                    None => {
                        new.entry(key).or_insert(old);
                    }
                    Some(known_child) => {
                        if let Some(new_child) = new.remove(&key) {
                            new.insert(key, keep_unknown_fields(old, known_child, new_child));
                        }
                    }
                }
            }
            Value::Object(new)
        }
        (_, new) => new,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::keep_unknown_fields;

    #[test]
    fn removed_keys_stay_removed_and_unknown_fields_are_kept() {
        // A map: every key is known, so a removed one stays removed.
        let stored = json!({"a": 1, "b": 2});
        assert_eq!(
            keep_unknown_fields(stored.clone(), &stored, json!({"a": 1})),
            json!({"a": 1})
        );
        // A struct from an older version: `added` (a newer version's field) is kept, `gone` (an
        // `Option` this version set to `None`, skipped when serialised) stays removed.
        let stored = json!({"count": 1, "gone": 5, "added": "x", "inner": {"n": 1, "later": true}});
        let known = json!({"count": 1, "gone": 5, "inner": {"n": 1}});
        let new = json!({"count": 2, "inner": {"n": 2}});
        assert_eq!(
            keep_unknown_fields(stored, &known, new),
            json!({"count": 2, "added": "x", "inner": {"n": 2, "later": true}})
        );
        // Not objects: the new value as it is.
        assert_eq!(
            keep_unknown_fields(json!([1, 2]), &json!([1, 2]), json!([1])),
            json!([1])
        );
    }
}
