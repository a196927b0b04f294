//! TOML configuration for the rotator, agent and admin client: serde types with
//! defaults and one `load(path)` for all of them. Any error here exits with code 2.
//! Each role's section below is owned by that role's module.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Reads and parses one TOML configuration file. Unknown keys are refused by the
/// types themselves (`deny_unknown_fields`), so a typo is an error, not a default.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// The PEM files of one TLS identity and the CA that peers must chain to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This process's certificate chain.
    pub cert: PathBuf,
    /// This process's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

// ---------------------------------------------------------------- agent

// ---------------------------------------------------------------- rotator

mod rotator;
pub use self::rotator::{
    AdminConfig, AgentEndpoint, FanoutConfig, PolicyConfig, RepositoryConfig, RotatorConfig,
    ScheduleConfig, duration,
};

// ---------------------------------------------------------------- admin
