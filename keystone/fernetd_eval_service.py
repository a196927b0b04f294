"""A stand-in OpenStack service for one region: a WSGI app behind
keystonemiddleware's auth_token, configured from a file holding the bundle's
``[keystone_authtoken]`` section (keystone/keystone-authtoken.conf.template).

Served by gunicorn (``fernetd_eval_service:application``); the configuration file
comes from ``FERNETD_EVAL_SERVICE_CONF``. Every authenticated request answers 200
with the token's user and project; a request the middleware refused never
reaches the app (401 from auth_token, 503 when the region's Keystone is
unreachable).

Each answer says whether auth_token validated the token against Keystone for
this request (header ``X-Eval-Validation: miss``) or found it in memcached
(``hit``), so an evaluation can report the cache's hit rate and the latency of
each kind. The flag comes from wrapping the middleware's call to Keystone; it
changes nothing in how tokens are validated.
"""

import json
import os
import sys
import threading

sys.argv = sys.argv[:1]

from keystonemiddleware import auth_token  # noqa: E402
from keystonemiddleware.auth_token import _identity  # noqa: E402

_local = threading.local()
_verify = _identity.IdentityServer.verify_token


def _counting_verify(self, *args, **kwargs):
    _local.miss = True
    return _verify(self, *args, **kwargs)


_identity.IdentityServer.verify_token = _counting_verify


def _app(environ, start_response):
    body = json.dumps(
        {
            "region": os.environ.get("FERNETD_EVAL_REGION", ""),
            "user_id": environ.get("HTTP_X_USER_ID"),
            "project_id": environ.get("HTTP_X_PROJECT_ID"),
        }
    ).encode()
    start_response(
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


_protected = auth_token.AuthProtocol(
    _app,
    {
        "oslo_config_project": "fernetd-eval-service",
        "oslo_config_file": os.environ["FERNETD_EVAL_SERVICE_CONF"],
    },
)


def application(environ, start_response):
    _local.miss = False

    def start(status, headers, exc_info=None):
        headers = list(headers) + [
            ("X-Eval-Validation", "miss" if _local.miss else "hit")
        ]
        return start_response(status, headers, exc_info)

    return _protected(environ, start)
