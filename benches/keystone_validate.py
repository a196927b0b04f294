# Keystone 30.0.0's own TokenFormatter.validate_token over given tokens, timed on
# whatever CPU the caller pins it to (benches/token.rs runs it under `taskset -c 0`).
# Usage: python keystone_validate.py SECONDS REPOSITORY TOKEN
# Prints two JSON numbers (validations per CPU-second): validate_token as shipped, which
# re-reads the key repository for every token, and with the key set built once.
import json
import sys
import time
import warnings

warnings.simplefilter("ignore")

import keystone.conf  # noqa: E402
from cryptography import fernet  # noqa: E402
from keystone.common import fernet_utils  # noqa: E402
from keystone.token import token_formatters as tf  # noqa: E402

seconds, repository, token = float(sys.argv[1]), sys.argv[2], sys.argv[3]
CONF = keystone.conf.CONF
keystone.conf.configure(CONF)
CONF([], project="keystone", default_config_files=[])
CONF.set_override("key_repository", repository, group="fernet_tokens")
CONF.set_override("max_active_keys", 100, group="fernet_tokens")


def rate(formatter):
    """Validations per CPU-second (process time: the machine may be shared)."""
    formatter.validate_token(token)  # warm up, and fail loudly on a bad token
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        for _ in range(100):
            formatter.validate_token(token)
        n += 100
        if time.perf_counter() - start >= seconds:
            return n / (time.process_time() - cpu)


class Cached(tf.TokenFormatter):
    """validate_token with the MultiFernet built once instead of per token."""

    def __init__(self):
        keys = fernet_utils.FernetUtils(repository, 100, "fernet_tokens").load_keys()
        self._crypto = fernet.MultiFernet([fernet.Fernet(k) for k in keys])

    @property
    def crypto(self):
        return self._crypto


print(json.dumps({"as_shipped": rate(tf.TokenFormatter()), "keys_cached": rate(Cached())}))
