//! The daemon's log: plain text or one JSON object a line, on stderr, coloured only on a terminal.

use std::{io::IsTerminal, str::FromStr};

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// How log lines are written (`--log-format`, `[log] format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`, `fields`, `target`.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format '{other}': expected text or json")),
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` if set, else `level`. Colour only when stderr is a
/// terminal and `NO_COLOR` is unset, so files and the journal get no escape sequences.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(colour).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}
