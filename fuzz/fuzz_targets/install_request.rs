//! Fuzzes the agent's check of a pushed key set: arbitrary bytes decoded as an
//! `InstallRequest` (the protobuf the rotator sends), the structural check the
//! agent runs before touching the disk, and the canaries decrypted with the
//! keys that passed it.
#![no_main]

use fernetd::agent::check;
use fernetd::pb;
use fernetd::token::{Keyring, PayloadConfig};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(mut request) = pb::InstallRequest::decode(data) else {
        return;
    };
    let Ok(checked) = check::key_set(request.generation, &mut request.keys, &request.digest) else {
        return;
    };
    let ring = Keyring::new(&checked.set);
    for canary in &request.canaries {
        let _ = ring.inspect(&canary.token, &PayloadConfig::default());
    }
});
