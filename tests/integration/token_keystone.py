# Real Keystone 30.0.0's TokenFormatter, driven by the token integration tests.
# Usage: python token_keystone.py REPOSITORY REQUEST.json
# REQUEST: {"methods": [...]?, "mint": [{"class": "ProjectScopedPayload", "fields": {...}}],
#           "validate": ["token", ...]}
# Prints {"mint": ["token", ...], "validate": [{"ok": {...}} | {"error": cls, "message": str}]}
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
CONF.set_override("key_repository", sys.argv[1], group="fernet_tokens")
CONF.set_override("max_active_keys", 100, group="fernet_tokens")
with open(sys.argv[2]) as f:
    request = json.load(f)
if request.get("methods"):
    CONF.set_override("methods", request["methods"], group="auth")

formatter = tf.TokenFormatter()
out = {"mint": [], "validate": []}
for spec in request.get("mint", []):
    cls = getattr(tf, spec["class"])
    out["mint"].append(formatter.create_token(payload_class=cls, **spec["fields"]))
for token in request.get("validate", []):
    try:
        out["validate"].append({"ok": dict(zip(FIELDS, formatter.validate_token(token)))})
    except Exception as e:  # every refusal, as Keystone's HTTP layer would see it
        out["validate"].append({"error": type(e).__name__, "message": str(e)})
print(json.dumps(out))
