//! Fuzzes the agent's configuration: arbitrary text as agent.toml, then its
//! validation (everything the agent checks before touching a file).
#![no_main]

use fernetd::config::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = toml::from_str::<AgentConfig>(text) {
        let _ = config.validate();
    }
});
