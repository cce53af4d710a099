//! What asks the reload loop for something, what it asks for, and what it gets back.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::generation::StartSteps;
use crate::reload::canary::Verdict;

/// Who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (`systemctl reload`).
    Sighup,
    /// `--watch`: the library file changed.
    Watch,
    /// The admin endpoint (`POST /reload`, `/promote`, `/rollback`).
    Admin,
    /// A canary's judge.
    Canary,
}

impl Trigger {
    /// Its name in the log and in `/status` (`last_reload.trigger`).
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Sighup => "SIGHUP",
            Trigger::Watch => "watch",
            Trigger::Admin => "admin",
            Trigger::Canary => "canary",
        }
    }
}

/// What a trigger asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Load the app library anew, as a canary with this share of new connections (`None`: the
    /// `--canary` setting; 0: swap at once).
    Reload { canary: Option<u8> },
    /// Abort the canary if one runs; otherwise load a kept version again: the previous one, or
    /// the one with this sha256.
    Rollback { sha256: Option<String> },
    /// Make the canary the serving generation now.
    Promote,
    /// The canary's verdict (`canary.rs`), for the canary of that generation.
    Judged { generation: u64, verdict: Verdict },
}

/// A request queued for the reload loop, with where to send its outcome if anyone waits for it.
pub struct Request {
    pub trigger: Trigger,
    pub action: Action,
    pub reply: Option<oneshot::Sender<ReloadOutcome>>,
}

/// What a generation that now serves is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Done {
    pub generation: u64,
    /// Its share of new connections, in percent, if it runs as a canary.
    pub canary: Option<u8>,
    /// The canary generation a rollback retired, if it retired one (the serving one stays).
    pub rolled_back: Option<u64>,
    /// How long the steps of its start took, if it was started by this action.
    pub steps: Option<StartSteps>,
}

impl Done {
    pub fn serving(generation: u64) -> Done {
        Done {
            generation,
            canary: None,
            rolled_back: None,
            steps: None,
        }
    }
}

/// Why an action did nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// It was tried and failed; what serves stays. Shared: every request answered by the same
    /// attempt gets it.
    #[error("{0:#}")]
    Failed(Arc<anyhow::Error>),
    /// It cannot be done now: there is no canary to promote or version to roll back to, or a
    /// canary runs (promote it or roll it back first).
    #[error("{0}")]
    Conflict(String),
}

impl Refusal {
    /// A failure with nothing but a message.
    pub fn failed(message: impl Into<String>) -> Refusal {
        Refusal::Failed(Arc::new(anyhow::Error::msg(message.into())))
    }
}

/// The outcome of a reload, promotion or rollback.
pub type ReloadOutcome = Result<Done, Refusal>;
