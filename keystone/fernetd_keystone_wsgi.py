"""WSGI entry point for a regional validating Keystone served by gunicorn.

Keystone parses its configuration with oslo.config's ``CONF()`` without ``args=``,
so it would read gunicorn's own command line (``sys.argv``) as its flags and every
worker would exit with code 2. Clearing ``sys.argv`` first leaves the configuration
to the ``OS_KEYSTONE_CONFIG_FILES`` environment variable (``keystone.conf`` paths
separated by ``;``), which keystone/run-keystone.sh sets.
"""

import sys

sys.argv = sys.argv[:1]

from keystone.server import wsgi  # noqa: E402  (must follow the argv reset)

application = wsgi.initialize_public_application()
