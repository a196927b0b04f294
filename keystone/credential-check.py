"""Counts the rows of Keystone's `credential` table by the key that encrypts them.

Usage: python3 keystone/credential-check.py KEYSTONE_CONF

Uses Keystone's own code: its configuration, its database session and model, and
its credential key loading (`load_keys(use_null_key=True)`, as decryption does).
Prints one JSON object on standard output:

  {"total": N, "primary": N, "other": N, "null": N, "undecryptable": N,
   "by_key_hash": {"<sha1>": N, ...}, "primary_key_hash": "<sha1>"}

- primary: the row's key_hash is the primary key's and the primary decrypts it;
- other: another key of the repository decrypts it (credential_migrate moves it);
- null: only the public all-zero key decrypts it (Keystone wrote it without keys);
- undecryptable: no key does (GET /v3/credentials/{id} answers 500).

Exit 0 when counted (whatever the counts), 1 when the database or the keys
cannot be read. fernetd's agent runs the copy built into its binary.
"""
import hashlib
import json
import sys
import warnings

warnings.simplefilter("ignore")


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: credential-check.py KEYSTONE_CONF\n")
        return 2
    import cryptography.fernet
    import keystone.conf
    from keystone.common import fernet_utils
    from keystone.common import sql
    from keystone.credential.backends import sql as credential_sql
    import importlib

    fernet_core = importlib.import_module("keystone.credential.providers.fernet.core")

    conf = keystone.conf.CONF
    keystone.conf.configure()
    sql.initialize()
    conf(args=[], project="keystone", default_config_files=[argv[1]])

    utils = fernet_utils.FernetUtils(
        conf.credential.key_repository, fernet_core.MAX_ACTIVE_KEYS, "credential"
    )
    # Bytes throughout: Keystone's primary_key_hash encodes keys[0] in place.
    keys = [
        k if isinstance(k, bytes) else k.encode("utf-8")
        for k in utils.load_keys(use_null_key=True)
    ]
    # load_keys puts the primary first and appends the all-zero key.
    null_key = keys[-1]
    real = keys[:-1]
    primary_hash = fernet_core.primary_key_hash(keys)
    fernets = [(k, cryptography.fernet.Fernet(k)) for k in keys]

    counts = {"total": 0, "primary": 0, "other": 0, "null": 0, "undecryptable": 0}
    by_hash = {}
    with sql.session_for_read() as session:
        for row in session.query(credential_sql.CredentialModel).all():
            counts["total"] += 1
            by_hash[row.key_hash] = by_hash.get(row.key_hash, 0) + 1
            blob = row.encrypted_blob
            if isinstance(blob, str):
                blob = blob.encode("utf-8")
            opened = None
            for key, fernet in fernets:
                try:
                    fernet.decrypt(blob)
                except cryptography.fernet.InvalidToken:
                    continue
                opened = key
                break
            if opened is None:
                counts["undecryptable"] += 1
            elif real and opened == real[0] and row.key_hash == primary_hash:
                counts["primary"] += 1
            elif opened == null_key:
                counts["null"] += 1
            else:
                counts["other"] += 1
    counts["by_key_hash"] = by_hash
    counts["primary_key_hash"] = primary_hash
    json.dump(counts, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
