//! Fuzzes the rotator's configuration: arbitrary text as rotator.toml, then
//! every check made before the rotator opens anything.
#![no_main]

use fernetd::config::RotatorConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut config) = toml::from_str::<RotatorConfig>(text) else {
        return;
    };
    // The checks must stay off the file system: keystone.conf and imports are
    // files, fuzzed through their own targets.
    config.keystone_conf = None;
    for repo in &mut config.repositories {
        repo.import = None;
    }
    let _ = fernetd::rotator::check(config);
});
