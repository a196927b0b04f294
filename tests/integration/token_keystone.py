# Real Keystone 30.0.0's TokenFormatter, driven by the token integration tests:
# many batches in one Python process (start-up costs about 1.5 s).
# Usage: python token_keystone.py REQUEST.json
# REQUEST: {"batches": [{"repository": DIR, "methods": [...] (optional),
#                        "mint": [{"class": "ProjectScopedPayload", "repository": DIR, "fields": {...}}],
#                        "validate": ["token", ...]}]}
# Prints, per batch, {"mint": ["token", ...], "minted": [result, ...], "validate": [result, ...]}
# where a result is {"ok": {field: value}} or {"error": exception class, "message": str}:
# "minted" validates every minted token against the batch's repository.
import json
import sys
import warnings

warnings.simplefilter("ignore")

import keystone.conf  # noqa: E402
from keystone.token import token_formatters as tf  # noqa: E402

FIELDS = [
    "user_id", "methods", "audit_ids", "system", "domain_id", "project_id", "trust_id",
    "federated_group_ids", "identity_provider_id", "protocol_id", "access_token_id",
    "app_cred_id", "thumbprint", "issued_at", "expires_at",
]

CONF = keystone.conf.CONF
keystone.conf.configure(CONF)
CONF([], project="keystone", default_config_files=[])
CONF.set_override("max_active_keys", 100, group="fernet_tokens")
formatter = tf.TokenFormatter()


def validate(token):
    try:
        return {"ok": dict(zip(FIELDS, formatter.validate_token(token)))}
    except Exception as e:  # every refusal, as Keystone's HTTP layer would see it
        return {"error": type(e).__name__, "message": str(e)}


def run(batch):
    if batch.get("methods"):
        CONF.set_override("methods", batch["methods"], group="auth")
    else:
        CONF.clear_override("methods", group="auth")
    out = {"mint": [], "minted": [], "validate": []}
    for spec in batch.get("mint", []):
        repo = spec.get("repository", batch["repository"])
        CONF.set_override("key_repository", repo, group="fernet_tokens")
        cls = getattr(tf, spec["class"])
        out["mint"].append(formatter.create_token(payload_class=cls, **spec["fields"]))
    CONF.set_override("key_repository", batch["repository"], group="fernet_tokens")
    out["minted"] = [validate(t) for t in out["mint"]]
    out["validate"] = [validate(t) for t in batch.get("validate", [])]
    return out


with open(sys.argv[1]) as f:
    request = json.load(f)
print(json.dumps([run(b) for b in request["batches"]]))
