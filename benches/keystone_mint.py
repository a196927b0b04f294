# Mints tokens with Keystone 30.0.0's own TokenFormatter.create_token (payload
# assembly and packing are Keystone's; the Fernet layer is cryptography's, as in
# Keystone), for benches/token.rs. Each token is encrypted with a chosen key at a
# chosen issue time, as the key that was primary somewhere at that time made it.
# Usage: python keystone_mint.py REQUEST.json
# REQUEST: {"expires_at": "ISO time", "tokens": [{"key": base64 key, "issued_at": unix}, ...]}
# Prints one token per line, in the request's order.
import base64
import json
import os
import sys
import uuid
import warnings

warnings.simplefilter("ignore")

import keystone.conf  # noqa: E402
from cryptography import fernet  # noqa: E402
from keystone.token import token_formatters as tf  # noqa: E402

CONF = keystone.conf.CONF
keystone.conf.configure(CONF)
CONF([], project="keystone", default_config_files=[])


class AtTime:
    """The part of MultiFernet that create_token uses, with a fixed key and time."""

    def __init__(self, key, issued_at):
        self.fernet, self.issued_at = fernet.Fernet(key), issued_at

    def encrypt(self, data):
        return self.fernet.encrypt_at_time(data, self.issued_at)


class Minter(tf.TokenFormatter):
    def __init__(self):
        self.current = None

    @property
    def crypto(self):
        return self.current


with open(sys.argv[1]) as f:
    request = json.load(f)
minter = Minter()
out = []
for spec in request["tokens"]:
    minter.current = AtTime(spec["key"], spec["issued_at"])
    out.append(
        minter.create_token(
            user_id=uuid.uuid4().hex,
            expires_at=request["expires_at"],
            audit_ids=[base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()],
            payload_class=tf.ProjectScopedPayload,
            methods=["password"],
            project_id=uuid.uuid4().hex,
        )
    )
sys.stdout.write("\n".join(out) + "\n")
