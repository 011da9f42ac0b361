//! Daemon settings: the configuration file and the command line, merged into one [`Settings`].
//!
//! Netdevs reach the daemon by three paths that end in the same parser: `netdev_add` JSON,
//! `--netdev` in QEMU's keyval syntax, and the configuration file (either form).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{
    chardev::{ChardevError, ChardevSpec},
    logging::LogFormat,
    netdev::{Netdev, NetdevError},
    qmp::{
        codec::MAX_MESSAGE_BYTES_LIMIT,
        server::{DEFAULT_MAX_MESSAGE_BYTES, ListenAddr, ServerError},
    },
};

/// Read when netdevd is started without `--config`, if it exists.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/netdevd/netdevd.toml";
/// The default configuration, also shipped as `config/netdevd.toml`.
pub const BUILTIN_CONFIG: &str = include_str!("../../config/netdevd.toml");
/// Where clients look for the daemon by default.
pub const DEFAULT_QMP_SOCKET: &str = "/run/netdevd/qmp.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(transparent)]
    Listen(#[from] ServerError),
    #[error(
        "QMP address '{addr}': a TCP listener lets every local user (and any host that can reach \
         it) control netdevd as root; pass --insecure-tcp-qmp (or set insecure-tcp = true under \
         [qmp]) to allow it"
    )]
    InsecureTcp { addr: String },
    #[error("max-message-bytes {value} is over QEMU's limit of {MAX_MESSAGE_BYTES_LIMIT} bytes")]
    MessageLimit { value: usize },
    #[error("chardev '{spec}': {source}")]
    Chardev {
        spec: String,
        #[source]
        source: ChardevError,
    },
    #[error("netdev '{spec}': {source}")]
    Netdev {
        spec: String,
        #[source]
        source: NetdevError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    qmp: QmpSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    netdevs: Vec<NetdevSpec>,
    /// Socket chardevs, made before the netdevs (a `vhost-user` netdev names one).
    #[serde(default)]
    chardevs: Vec<NetdevSpec>,
    #[serde(default)]
    metrics: MetricsSection,
}

/// `[metrics] listen = "unix:PATH"` or `"tcp:IP:PORT"`: the opt-in Prometheus endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LimitsSection {
    #[serde(default = "default_max_netdevs")]
    max_netdevs: usize,
    #[serde(default = "default_setup_timeout")]
    setup_timeout: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self { max_netdevs: default_max_netdevs(), setup_timeout: default_setup_timeout() }
    }
}

const fn default_max_netdevs() -> usize {
    crate::model::registry::DEFAULT_MAX_NETDEVS
}

/// Seconds a `script=`, `downscript=` or `helper=` program may run before it is killed.
pub const DEFAULT_SETUP_TIMEOUT_SECS: u64 = 10;

const fn default_setup_timeout() -> u64 {
    DEFAULT_SETUP_TIMEOUT_SECS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct QmpSection {
    #[serde(default = "default_listen")]
    listen: Vec<String>,
    #[serde(default = "default_max_message_bytes")]
    max_message_bytes: usize,
    /// Allows `tcp:` listeners (see [`ConfigError::InsecureTcp`]).
    #[serde(default)]
    insecure_tcp: bool,
}

impl Default for QmpSection {
    fn default() -> Self {
        Self { listen: default_listen(), max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES, insecure_tcp: false }
    }
}

fn default_listen() -> Vec<String> {
    vec![format!("unix:{DEFAULT_QMP_SOCKET},server=on,wait=off")]
}

const fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    #[serde(default = "default_level")]
    level: String,
    #[serde(default)]
    format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self { level: default_level(), format: LogFormat::default() }
    }
}

fn default_level() -> String {
    "info".to_owned()
}

/// A netdev (chardev) in the file: a `-netdev` (`-chardev`) string or a `netdev_add`
/// (`chardev-add`) table.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NetdevSpec {
    Keyval(String),
    Table(toml::Table),
}

/// Everything the daemon needs to start.
#[derive(Debug)]
pub struct Settings {
    pub listen: Vec<ListenAddr>,
    pub max_message_bytes: usize,
    pub log_level: String,
    pub log_format: LogFormat,
    /// The Prometheus endpoint's address (`unix:PATH`, `tcp:IP:PORT`), if enabled.
    pub metrics: Option<String>,
    /// Created at start, in this order, before the netdevs.
    pub chardevs: Vec<ChardevSpec>,
    /// Created at start, in this order.
    pub netdevs: Vec<Netdev>,
    /// The eBPF object to load instead of the embedded one.
    pub bpf_object: Option<PathBuf>,
    /// What `user` netdevs read as `/etc/resolv.conf`.
    pub user_resolv_conf: Option<PathBuf>,
    /// Netdevs the daemon holds at most (`limits.max-netdevs`).
    pub max_netdevs: usize,
    /// Seconds a network script or bridge helper may run (`limits.setup-timeout`).
    pub setup_timeout: u64,
}

/// The command-line part of the settings.
#[derive(Debug, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub qmp: Vec<String>,
    pub netdevs: Vec<String>,
    /// `--chardev`, in QEMU's `-chardev` syntax.
    pub chardevs: Vec<String>,
    pub bpf_object: Option<PathBuf>,
    /// `--insecure-tcp-qmp`: allows `tcp:` listeners.
    pub insecure_tcp_qmp: bool,
}

impl Settings {
    /// Reads the configuration file (or the default) and applies the command line.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        let (path, text) = match &overrides.config {
            Some(path) => (path.clone(), read(path)?),
            None if Path::new(SYSTEM_CONFIG_PATH).exists() => {
                (PathBuf::from(SYSTEM_CONFIG_PATH), read(Path::new(SYSTEM_CONFIG_PATH))?)
            }
            None => (PathBuf::from("<built-in config>"), BUILTIN_CONFIG.to_owned()),
        };
        Self::from_toml(&path, &text, overrides)
    }

    pub fn from_toml(path: &Path, text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Syntax { path: path.to_owned(), message: e.to_string() })?;
        let listen_specs = if overrides.qmp.is_empty() { &file.qmp.listen } else { &overrides.qmp };
        let listen = listen_specs.iter().map(|spec| spec.parse()).collect::<Result<Vec<ListenAddr>, _>>()?;
        if !(file.qmp.insecure_tcp || overrides.insecure_tcp_qmp)
            && let Some(tcp) = listen.iter().find(|addr| matches!(addr, ListenAddr::Tcp(_)))
        {
            return Err(ConfigError::InsecureTcp { addr: tcp.to_string() });
        }
        if file.qmp.max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            return Err(ConfigError::MessageLimit { value: file.qmp.max_message_bytes });
        }
        let mut netdevs = Vec::new();
        for spec in &file.netdevs {
            netdevs.push(match spec {
                NetdevSpec::Keyval(text) => parse_keyval(text)?,
                NetdevSpec::Table(table) => {
                    let json = serde_json::to_value(table).map_err(|e| ConfigError::Syntax {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?;
                    Netdev::from_json(&json).map_err(|source| ConfigError::Netdev { spec: json.to_string(), source })?
                }
            });
        }
        for text in &overrides.netdevs {
            netdevs.push(parse_keyval(text)?);
        }
        let mut chardevs: Vec<ChardevSpec> = Vec::new();
        let from_file = file.chardevs.iter().map(|spec| match spec {
            NetdevSpec::Keyval(text) => (text.clone(), ChardevSpec::from_opts(text)),
            NetdevSpec::Table(table) => match serde_json::to_value(table) {
                Ok(json) => (json.to_string(), ChardevSpec::from_json(&json)),
                Err(e) => (format!("{table:?}"), Err(ChardevError::Keyval(crate::qapi::keyval::KeyvalError::InvalidKey(e.to_string())))),
            },
        });
        let from_command_line = overrides.chardevs.iter().map(|text| (text.clone(), ChardevSpec::from_opts(text)));
        for (spec, parsed) in from_file.chain(from_command_line) {
            let chardev = parsed.map_err(|source| ConfigError::Chardev { spec: spec.clone(), source })?;
            if chardevs.iter().any(|c| c.id == chardev.id) {
                return Err(ConfigError::Chardev { spec, source: ChardevError::DuplicateOption { id: chardev.id } });
            }
            chardevs.push(chardev);
        }
        Ok(Self {
            listen,
            max_message_bytes: file.qmp.max_message_bytes,
            log_level: file.log.level,
            log_format: file.log.format,
            metrics: file.metrics.listen,
            chardevs,
            netdevs,
            bpf_object: overrides.bpf_object.clone(),
            user_resolv_conf: None,
            max_netdevs: file.limits.max_netdevs,
            setup_timeout: file.limits.setup_timeout,
        })
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })
}

fn parse_keyval(text: &str) -> Result<Netdev, ConfigError> {
    Netdev::from_keyval(text).map_err(|source| ConfigError::Netdev { spec: text.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_config_is_valid() {
        let settings = Settings::from_toml(Path::new("builtin"), BUILTIN_CONFIG, &Overrides::default()).unwrap();
        assert_eq!(settings.listen, vec![ListenAddr::Unix(DEFAULT_QMP_SOCKET.into())]);
        assert!(settings.netdevs.is_empty());
    }

    #[test]
    fn three_entry_points_give_the_same_netdev() {
        let text = r#"netdevs = ["hubport,id=a,hubid=7", { type = "hubport", id = "b", hubid = 7 }]"#;
        let overrides = Overrides { netdevs: vec!["hubport,id=c,hubid=7".into()], ..Overrides::default() };
        let settings = Settings::from_toml(Path::new("t"), text, &overrides).unwrap();
        let json = Netdev::from_json(&serde_json::json!({"type": "hubport", "id": "a", "hubid": 7})).unwrap();
        assert_eq!(settings.netdevs[0], json);
        assert_eq!(settings.netdevs[1].options, json.options);
        assert_eq!(settings.netdevs[2].options, json.options);
    }

    #[test]
    fn chardevs_from_file_and_command_line() {
        let text = r#"chardevs = ["socket,id=a,path=/run/a.sock,server=on,wait=off",
            { id = "b", backend = { type = "socket", data = { addr = { type = "unix", data = { path = "/run/b.sock" } }, server = false, reconnect = 1 } } }]"#;
        let overrides = Overrides { chardevs: vec!["socket,id=c,path=/run/c.sock,reconnect=2".into()], ..Overrides::default() };
        let settings = Settings::from_toml(Path::new("t"), text, &overrides).unwrap();
        let ids: Vec<&str> = settings.chardevs.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(settings.chardevs[0].server && !settings.chardevs[1].server);
        let twice = Overrides { chardevs: vec!["socket,id=a,path=/x,server=on".into()], ..Overrides::default() };
        let error = Settings::from_toml(Path::new("t"), text, &twice).unwrap_err();
        assert_eq!(error.to_string(), "chardev 'socket,id=a,path=/x,server=on': Duplicate ID 'a' for chardev");
        let bad = Overrides { chardevs: vec!["socket,id=d,path=/x,server=on,reconnect=1".into()], ..Overrides::default() };
        let error = Settings::from_toml(Path::new("t"), "", &bad).unwrap_err();
        assert!(error.to_string().ends_with("'reconnect' option is incompatible with socket in server listen mode"), "{error}");
    }

    #[test]
    fn command_line_listen_overrides_file() {
        let overrides =
            Overrides { qmp: vec!["tcp:127.0.0.1:4444".into()], insecure_tcp_qmp: true, ..Overrides::default() };
        let settings = Settings::from_toml(Path::new("t"), "", &overrides).unwrap();
        assert_eq!(settings.listen, vec![ListenAddr::Tcp("127.0.0.1:4444".parse().unwrap())]);
    }

    #[test]
    fn tcp_needs_the_insecure_flag() {
        let tcp = Overrides { qmp: vec!["tcp:127.0.0.1:4444".into()], ..Overrides::default() };
        let error = Settings::from_toml(Path::new("t"), "", &tcp).unwrap_err().to_string();
        assert!(error.starts_with("QMP address 'tcp:127.0.0.1:4444': a TCP listener"), "{error}");
        assert!(error.contains("--insecure-tcp-qmp"), "{error}");
        let file = "[qmp]\nlisten = [\"tcp:127.0.0.1:1\"]\n";
        assert!(Settings::from_toml(Path::new("t"), file, &Overrides::default()).is_err());
        let allowed = "[qmp]\nlisten = [\"tcp:127.0.0.1:1\"]\ninsecure-tcp = true\n";
        assert!(Settings::from_toml(Path::new("t"), allowed, &Overrides::default()).is_ok());
    }

    #[test]
    fn message_limit_is_qemus_at_most() {
        let text = format!("[qmp]\nmax-message-bytes = {}\n", MAX_MESSAGE_BYTES_LIMIT + 1);
        let error = Settings::from_toml(Path::new("t"), &text, &Overrides::default()).unwrap_err();
        assert!(error.to_string().contains("over QEMU's limit"), "{error}");
    }

    #[test]
    fn errors_name_their_source() {
        let e = Settings::from_toml(Path::new("t"), "bogus = 1", &Overrides::default()).unwrap_err();
        assert!(e.to_string().starts_with("t: "), "{e}");
        let e = Settings::from_toml(Path::new("t"), r#"netdevs = ["hubport,id=x"]"#, &Overrides::default()).unwrap_err();
        assert_eq!(e.to_string(), "netdev 'hubport,id=x': Parameter 'hubid' is missing");
    }
}
