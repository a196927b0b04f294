# Keystone 30.0.0's own TokenFormatter.validate_token over given tokens, timed on
# whatever CPU the caller pins it to (benches/token.rs runs it under `taskset -c 0`).
# Usage: python keystone_validate.py SECONDS ROUNDS REPOSITORY MAX_ACTIVE_KEYS TOKEN
# (the median of ROUNDS rounds of SECONDS each); TOKEN may be @FILE, one token a line,
# validated in turn (every one must be valid).
# Prints two JSON numbers (validations per CPU-second): validate_token as shipped, which
# re-reads the key repository for every token, and with the key set built once.
import itertools
import json
import statistics
import sys
import time
import warnings

warnings.simplefilter("ignore")

import keystone.conf  # noqa: E402
from cryptography import fernet  # noqa: E402
from keystone.common import fernet_utils  # noqa: E402
from keystone.token import token_formatters as tf  # noqa: E402

seconds, rounds = float(sys.argv[1]), int(sys.argv[2])
repository, max_keys, token = sys.argv[3], int(sys.argv[4]), sys.argv[5]
if token.startswith("@"):
    with open(token[1:]) as f:
        tokens = [line.strip() for line in f if line.strip()]
else:
    tokens = [token]
CONF = keystone.conf.CONF
keystone.conf.configure(CONF)
CONF([], project="keystone", default_config_files=[])
CONF.set_override("key_repository", repository, group="fernet_tokens")
CONF.set_override("max_active_keys", max_keys, group="fernet_tokens")


def one_round(formatter):
    """Validations per CPU-second (process time: the machine may be shared)."""
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    turn = itertools.cycle(tokens)
    while True:
        for _ in range(100):
            formatter.validate_token(next(turn))
        n += 100
        if time.perf_counter() - start >= seconds:
            return n / (time.process_time() - cpu)


def rate(formatter):
    for t in tokens:  # warm up, and fail loudly on a bad token
        formatter.validate_token(t)
    return statistics.median(one_round(formatter) for _ in range(rounds))


class Cached(tf.TokenFormatter):
    """validate_token with the MultiFernet built once instead of per token."""

    def __init__(self):
        keys = fernet_utils.FernetUtils(repository, max_keys, "fernet_tokens").load_keys()
        self._crypto = fernet.MultiFernet([fernet.Fernet(k) for k in keys])

    @property
    def crypto(self):
        return self._crypto


print(json.dumps({"as_shipped": rate(tf.TokenFormatter()), "keys_cached": rate(Cached())}))
