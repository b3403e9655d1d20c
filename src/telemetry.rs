//! Logging: `RUST_LOG` filter, text or JSON lines on stderr; colours only for a terminal, and
//! never with `NO_COLOR` set (<https://no-color.org>), so `kubectl logs` and log files show text.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber; `filter` uses `RUST_LOG` syntax.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("RUST_LOG {filter:?} is not a valid filter ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => {
            use std::io::IsTerminal as _;
            let no_color = std::env::var("NO_COLOR").ok();
            let ansi = colours(std::io::stderr().is_terminal(), no_color.as_deref());
            registry.with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).try_init()
        }
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_writer(std::io::stderr))
            .try_init(),
    };
    if result.is_err() {
        tracing::debug!("a tracing subscriber was already installed");
    }
}

/// Whether text logs get ANSI colours: only on a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string.
pub fn colours(stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
    stderr_is_terminal && no_color.is_none_or(str::is_empty)
}

#[cfg(test)]
mod tests {
    use super::colours;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(colours(true, Some("")), "an empty NO_COLOR does not count");
        assert!(!colours(true, Some("1")));
        assert!(!colours(false, None), "a pipe or a file gets plain text");
    }
}
