//! Integration tests for Keystone token validation and minting (`fernetd::token`
//! and `fernetd token`), checked against real Keystone 30.0.0's `TokenFormatter`.

use std::path::Path;

use fernetd::repository::{self, Key, KeySet};
use fernetd::token;
use serde_json::{Value, json};

use crate::common::keystone;

const KEYSTONE_SCRIPT: &str = include_str!("token_keystone.py");

/// Writes `set` as a Keystone key repository under `dir`.
fn write_repository(dir: &Path, set: &KeySet) {
    std::fs::create_dir_all(dir).unwrap();
    for (index, key) in set.iter() {
        std::fs::write(dir.join(index.to_string()), key.to_base64().as_bytes()).unwrap();
    }
    assert_eq!(&repository::load(dir).unwrap(), set);
}

/// Runs one batch of mint/validate requests through Keystone's `TokenFormatter`.
fn keystone_batch(repo: &Path, request: &Value) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("token_keystone.py");
    std::fs::write(&script, KEYSTONE_SCRIPT).unwrap();
    let req = tmp.path().join("request.json");
    std::fs::write(&req, serde_json::to_vec(request).unwrap()).unwrap();
    let out = keystone::run_python(
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
        &[
            script.to_str().unwrap(),
            repo.to_str().unwrap(),
            req.to_str().unwrap(),
        ],
    );
    serde_json::from_slice(&out.stdout).expect("keystone script prints JSON")
}

fn random_set(n: u32) -> KeySet {
    KeySet::from_keys((0..n).map(|i| (i, Key::generate())))
}

#[test]
fn canaries_from_every_key_are_accepted_by_keystone() {
    let tmp = tempfile::tempdir().unwrap();
    let set = random_set(4);
    write_repository(tmp.path(), &set);
    let canaries: Vec<String> = set.iter().map(|(_, key)| token::canary(key)).collect();
    let ring = token::Keyring::new(&set);
    for (canary, (index, _)) in canaries.iter().zip(set.iter()) {
        assert_eq!(ring.decrypt(canary).unwrap().key_index, index);
    }
    let foreign = token::canary(&Key::generate());
    let mut all = canaries.clone();
    all.push(foreign);
    let out = keystone_batch(tmp.path(), &json!({ "validate": all }));
    let results = out["validate"].as_array().unwrap();
    for r in &results[..canaries.len()] {
        let ok = &r["ok"];
        assert_eq!(ok["methods"], json!(["password"]), "{r}");
        assert_eq!(ok["user_id"].as_str().unwrap().len(), 32, "{r}");
        assert_eq!(ok["audit_ids"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(ok["project_id"], Value::Null);
    }
    assert_eq!(
        results[canaries.len()],
        json!({"error": "ValidationError", "message": "Could not recognize Fernet token"})
    );
}
