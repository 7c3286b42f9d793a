//! Agent options from the kernel command line (`agentvm.*`).

use agentvm_protocol::AGENT_PORT;

/// Options the host passes on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `agentvm.port=N`: the vsock port to listen on.
    pub port: u32,
    /// `agentvm.debug=1`: verbose logging.
    pub debug: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            port: AGENT_PORT,
            debug: false,
        }
    }
}

impl Options {
    /// Parses `/proc/cmdline` contents. Unknown words are ignored (they belong to the kernel);
    /// a malformed `agentvm.*` value keeps the default and yields a warning.
    pub fn parse(cmdline: &str) -> (Self, Vec<String>) {
        let mut opts = Self::default();
        let mut warnings = Vec::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "agentvm.port" => match value.parse::<u32>() {
                    Ok(p) if p != 0 => opts.port = p,
                    _ => warnings.push(format!("ignoring invalid {word}")),
                },
                "agentvm.debug" => match value {
                    "1" | "true" | "yes" | "on" => opts.debug = true,
                    "0" | "false" | "no" | "off" => opts.debug = false,
                    _ => warnings.push(format!("ignoring invalid {word}")),
                },
                _ => {}
            }
        }
        (opts, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_agent_options() {
        let (o, w) = Options::parse("console=ttyS0 reboot=t panic=-1\n");
        assert_eq!(o, Options::default());
        assert_eq!(o.port, AGENT_PORT);
        assert!(w.is_empty());
    }

    #[test]
    fn reads_port_and_debug() {
        let (o, w) = Options::parse("console=ttyS0 agentvm.port=5000 agentvm.debug=1");
        assert_eq!(o.port, 5000);
        assert!(o.debug);
        assert!(w.is_empty());
    }

    #[test]
    fn malformed_values_keep_defaults_and_warn() {
        let (o, w) = Options::parse("agentvm.port=abc agentvm.port=0 agentvm.debug=maybe");
        assert_eq!(o, Options::default());
        assert_eq!(w.len(), 3);
    }
}
