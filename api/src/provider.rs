//! Mailbox provider classes. Warmup shares, caps and delivery counts are kept per class, so the set is small and
//! fixed (a bounded metric label). The sidecar decides the class from the MX host name.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The mailbox provider behind an MX host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Gmail,
    Microsoft,
    Yahoo,
    Apple,
    Other,
}

impl Provider {
    /// All classes, in the order `/status` and metrics list them.
    pub const ALL: [Provider; 5] = [
        Provider::Gmail,
        Provider::Microsoft,
        Provider::Yahoo,
        Provider::Apple,
        Provider::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Gmail => "gmail",
            Provider::Microsoft => "microsoft",
            Provider::Yahoo => "yahoo",
            Provider::Apple => "apple",
            Provider::Other => "other",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
