//! Fuzzes the keystone.conf parser and the agreement checks run on what it
//! parsed.
#![no_main]

use std::path::Path;
use std::time::Duration;

use fernetd::policy::KeystoneConf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(conf) = KeystoneConf::parse(Path::new("keystone.conf"), &text) else {
        return;
    };
    let hour = Duration::from_secs(3600);
    let _ = conf.check_cache(3, hour);
    let _ = conf.check_rotator(hour, Duration::ZERO, &[("tokens", 3)], hour);
});
