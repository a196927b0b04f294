//! TOML configuration for the rotator, agent and admin client: serde types with
//! defaults and one `load(path)` per role. Any error here exits with code 2.

mod rotator;
pub use self::rotator::{
    AdminConfig, AgentEndpoint, FanoutConfig, PolicyConfig, RepositoryConfig, RotatorConfig,
    ScheduleConfig, duration,
};
