"""The cloud fernetd is for, on one host, every process real: a 3-node Galera
cluster behind the identity database's VIP, three regions (RegionOne with two
controllers behind its regional VIP, RegionTwo and RegionThree with one), a
memcached and a keystonemiddleware-protected service per region, the global
identity VIP, and fernetd's rotator with one agent per controller.

Run it through keystone/eval-cloud.sh (which makes the virtualenv first); this
module runs with the virtualenv's Python. Everything listens on 127.0.0.1 at
ports chosen at run time. The configuration comes from the bundle's files
(keystone.conf.template, keystone-authtoken.conf.template, galera.cnf.template,
memcached.conf, the haproxy templates), rendered by its render scripts.

Two modes:
- interactive (default): bring the cloud up, print its endpoints and an
  openstack credential file, wait for Ctrl-C, tear everything down;
- --control: print one line ``READY <json>`` describing the cloud, then obey
  one command per line on standard input (``kill NAME``, ``stop NAME``,
  ``cont NAME``, ``start NAME``, ``wait NAME``, ``quit``), answering one line
  each (``ok ...`` or ``error ...``). fernetd's integration test drives the
  cloud this way, so the test and the evaluation cloud are the same code.
"""

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
REGIONS = ["RegionOne", "RegionTwo", "RegionThree"]
# (agent name in fernetd's demo layout, region): RegionOne has two controllers.
CONTROLLERS = [
    ("ctl1.regionone", "RegionOne"),
    ("ctl2.regionone", "RegionOne"),
    ("ctl1.regiontwo", "RegionTwo"),
    ("ctl1.regionthree", "RegionThree"),
]
SERVICE_USER = "fernetd-eval-service"
DEBIAN = {
    # The server alone (mariadb-server-core) lacks the state-transfer scripts a
    # joining Galera node runs: both must be there.
    "mariadb-server": lambda: os.path.exists("/usr/sbin/mariadbd")
    and shutil.which("wsrep_sst_rsync") is not None,
    "galera-4": lambda: os.path.exists("/usr/lib/galera/libgalera_smm.so"),
    "rsync": lambda: shutil.which("rsync") is not None,
    "memcached": lambda: os.path.exists("/usr/bin/memcached"),
    "haproxy": lambda: os.path.exists("/usr/sbin/haproxy"),
}


class Refused(Exception):
    """The cloud cannot be brought up here; the message says why and what to do."""


def say(*args):
    print("eval-cloud:", *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# What must be there before anything starts.


def preflight():
    if os.geteuid() != 0:
        raise Refused(
            "must run as root: it installs Debian packages when missing and runs "
            "MariaDB/Galera as the mysql user, memcached as memcache"
        )
    if not shutil.which("apt-get"):
        missing = [p for p, present in DEBIAN.items() if not present()]
        if missing:
            raise Refused(f"missing {' '.join(missing)} and no apt-get to install them")
    missing = [p for p, present in DEBIAN.items() if not present()]
    if not missing:
        return
    say(f"installing Debian packages {' '.join(missing)} with apt-get")
    # mariadb-server's postinst would start a server on port 3306; policy-rc.d
    # (exit 101: "action forbidden") keeps the install from starting anything.
    policy = "/usr/sbin/policy-rc.d"
    ours = not os.path.exists(policy)
    if ours:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
        install = apt + ["install", "-y", "--no-install-recommends"] + missing
        if subprocess.run(install, env=env, stdout=sys.stderr).returncode != 0:
            if subprocess.run(apt + ["update"], env=env, stdout=sys.stderr).returncode != 0:
                raise Refused(
                    "apt-get update failed: no Debian registry reachable to install "
                    + " ".join(missing)
                )
            if subprocess.run(install, env=env, stdout=sys.stderr).returncode != 0:
                raise Refused(f"apt-get could not install {' '.join(missing)}")
    finally:
        if ours:
            os.unlink(policy)
    still = [p for p, present in DEBIAN.items() if not present()]
    if still:
        raise Refused(f"installed but still not usable: {' '.join(still)}")


def find_fernetd(path):
    if path:
        if not os.access(path, os.X_OK):
            raise Refused(f"--fernetd {path} is not an executable")
        return os.path.abspath(path)
    for profile in ("release", "debug"):
        candidate = os.path.join(ROOT, "target", profile, "fernetd")
        if os.access(candidate, os.X_OK):
            return candidate
    raise Refused("no fernetd binary: run `cargo build --release` or pass --fernetd PATH")


# ---------------------------------------------------------------------------
# Small helpers.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def addr(port):
    return f"127.0.0.1:{port}"


def render(script, args, out):
    """Runs one of the bundle's render scripts; its output goes to `out`."""
    r = subprocess.run(
        ["bash", os.path.join(HERE, script)] + args, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise Refused(f"{script} {' '.join(args[:2])}...: {r.stderr.strip()}")
    with open(out, "w") as f:
        f.write(r.stdout)
    return out


def wait_until(what, check, timeout, proc=None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the last error is reported below
            last = e
        if proc is not None and proc.exited():
            raise Refused(f"{proc.name} exited ({proc.popen.returncode}) while waiting for "
                          f"{what}; see {proc.log}")
        time.sleep(0.2)
    raise Refused(f"timed out after {timeout} s waiting for {what} (last error: {last})")


def http(method, url, headers=None, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_dump(table, prefix=""):
    """Writes what tomllib read back (tables, arrays of tables, scalars)."""
    lines, nested = [], []
    for k, v in table.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            nested.append((k, v))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    for k, v in nested:
        name = prefix + k
        if isinstance(v, dict):
            lines.append(f"\n[{name}]")
            lines.append(toml_dump(v, name + "."))
        else:
            for item in v:
                lines.append(f"\n[[{name}]]")
                lines.append(toml_dump(item, name + "."))
    return "\n".join(lines)


class Proc:
    """One process of the cloud: started in its own session (Ctrl-C reaches
    only the orchestrator, which stops everything in order), logging to a file,
    restartable with the same command line."""

    def __init__(self, name, argv, log, env=None, ready=None, cwd=None):
        self.name, self.argv, self.log, self.env, self.ready, self.cwd = (
            name, argv, log, env, ready, cwd)
        self.popen = None

    def start(self):
        out = open(self.log, "ab")
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            env=self.env, cwd=self.cwd, start_new_session=True)
        out.close()
        return self

    def exited(self):
        return self.popen is None or self.popen.poll() is not None

    def signal(self, sig):
        if not self.exited():
            os.kill(self.popen.pid, sig)

    def wait_ready(self, timeout=120):
        if self.ready:
            wait_until(f"{self.name} ready", self.ready, timeout, self)

    def stop(self, timeout=15):
        if self.exited():
            return
        try:
            os.kill(self.popen.pid, signal.SIGCONT)
            os.kill(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------
# The cloud.


class Cloud:
    def __init__(self, args):
        self.args = args
        self.dir = os.path.abspath(args.dir)
        self.procs = {}
        self.order = []
        self.fernetd = find_fernetd(args.fernetd)
        self.db_password = secrets.token_hex(12)
        self.service_password = secrets.token_hex(12)
        # The token policy: a rotation every I s, tokens valid E s, caches C s.
        self.interval = args.rotate_every
        self.expiration = args.token_expiration
        self.token_cache = args.keystone_cache_time
        self.revoke_cache = args.revoke_cache_time
        self.middleware_cache = args.middleware_cache_time
        # Keystone's formula with the cache rule: N >= ceil((E + W + C) / I) + 2.
        self.max_active_keys = (
            math.ceil((self.expiration + self.token_cache) / self.interval) + 2)

    def add(self, proc):
        self.procs[proc.name] = proc
        if proc.name not in self.order:
            self.order.append(proc.name)
        return proc.start()

    def path(self, *parts):
        p = os.path.join(self.dir, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def home(self):
        """gunicorn 27 writes ~/.gunicorn and ~/.cache: keep them in the cloud's dir."""
        home = os.path.join(self.dir, "home")
        os.makedirs(home, exist_ok=True)
        return home

    # -- ports and layout ---------------------------------------------------
    def plan(self):
        os.makedirs(self.dir, exist_ok=True)
        # Galera's rsync state transfer runs as mysql: the data directories and
        # every directory above them must be reachable by that user.
        os.chmod(self.dir, 0o755)
        d = self.dir
        while d != "/":
            if not os.stat(d).st_mode & 0o001:
                raise Refused(
                    f"{d} is not reachable by other users (mode "
                    f"{oct(os.stat(d).st_mode & 0o777)}): Galera's rsync state transfer runs "
                    "as mysql and needs every directory above its datadir to be; use --dir "
                    "somewhere else (or chmod o+x it)")
            d = os.path.dirname(d)
        self.galera = [
            {"name": f"node{i}", "port": free_port(), "gport": free_port(),
             "ist": free_port(), "sst": free_port()}
            for i in (1, 2, 3)
        ]
        self.db_vip = free_port()
        self.global_vip = free_port()
        self.memcached = {r: free_port() for r in REGIONS}
        self.service = {r: free_port() for r in REGIONS}
        self.keystone = {name: free_port() for name, _ in CONTROLLERS}
        self.region_one_vip = free_port()

    def region_identity(self, region):
        """The address a region's services and catalog use for its Keystone."""
        if region == "RegionOne":
            return addr(self.region_one_vip)
        name = next(n for n, r in CONTROLLERS if r == region)
        return addr(self.keystone[name])

    # -- fernetd ------------------------------------------------------------
    def fernetd_config(self):
        fdir = os.path.join(self.dir, "fernetd")
        r = subprocess.run(
            [self.fernetd, "demo", "--config-only", "--dir", fdir, "--regions", "3",
             "--controllers", "2"], capture_output=True, text=True)
        if r.returncode != 0:
            raise Refused(f"fernetd demo --config-only: {r.stderr.strip()}")
        self.fernetd_dir = fdir
        keep = [n for n, _ in CONTROLLERS]
        with open(os.path.join(fdir, "rotator.toml"), "rb") as f:
            rot = tomllib.load(f)
        rot["agents"] = [a for a in rot["agents"] if a.get("name") in keep]
        rot["schedule"]["cron"] = f"*/{self.interval} * * * * *"
        rot["policy"]["token_expiration"] = f"{self.expiration}s"
        rot["policy"]["allow_expired_window"] = "0s"
        rot["repositories"][0]["max_active_keys"] = self.max_active_keys
        rot["keystone_conf"] = self.keystone_conf_path(CONTROLLERS[0][0])
        with open(os.path.join(fdir, "rotator.toml"), "w") as f:
            f.write(toml_dump(rot) + "\n")
        self.repos = {}
        self.agent_configs = {}
        for name, _region in CONTROLLERS:
            path = os.path.join(fdir, "agents", f"{name}.toml")
            with open(path, "rb") as f:
                agent = tomllib.load(f)
            agent["keystone_conf"] = self.keystone_conf_path(name)
            self.repos[name] = agent["repositories"][0]["path"]
            self.agent_configs[name] = agent
            with open(path, "w") as f:
                f.write(toml_dump(agent) + "\n")

    def start_fernetd(self):
        fdir = self.fernetd_dir
        for name, _ in CONTROLLERS:
            self.add(Proc(f"agent.{name}",
                          [self.fernetd, "agent", "--config", os.path.join(fdir, "agents", f"{name}.toml")],
                          self.path("logs", f"agent.{name}.log"),
                          ready=self.agent_ready(name)))
        self.add(Proc("rotator", [self.fernetd, "rotator", "--config", os.path.join(fdir, "rotator.toml")],
                      self.path("logs", "rotator.log")))

    def agent_ready(self, name):
        def ready():
            listen = self.agent_configs[name]["listen"]
            host, port = listen.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        return ready

    def generation(self, name):
        try:
            with open(os.path.join(self.repos[name], ".fernetd-stamp")) as f:
                return json.load(f).get("generation", 0)
        except (OSError, ValueError):
            return 0

    # -- memcached ----------------------------------------------------------
    def start_memcached(self):
        # The bundle's memcached.conf with this region's port (and loopback).
        opts = []
        with open(os.path.join(HERE, "memcached.conf")) as f:
            for line in f:
                line = line.strip()
                if line.startswith("-"):
                    opts += line.split(None, 1)
        for region in REGIONS:
            argv = ["/usr/bin/memcached", "-u", "memcache"]
            i = 0
            while i < len(opts):
                flag = opts[i]
                value = opts[i + 1] if i + 1 < len(opts) and not opts[i + 1].startswith("-") else None
                if flag == "-p":
                    value = str(self.memcached[region])
                if flag == "-l":
                    value = "127.0.0.1"
                argv += [flag] + ([value] if value is not None else [])
                i += 2 if value is not None else 1
            port = self.memcached[region]
            self.add(Proc(f"memcached.{region.lower()}", argv,
                          self.path("logs", f"memcached.{region.lower()}.log"),
                          ready=lambda port=port: socket.create_connection(("127.0.0.1", port), 1).close() or True))

    # -- Galera -------------------------------------------------------------
    def galera_conf(self, node):
        ndir = os.path.join(self.dir, "galera", node["name"])
        os.makedirs(os.path.join(ndir, "data"), exist_ok=True)
        peers = ",".join(addr(n["gport"]) for n in self.galera)
        cnf = render("render-conf.sh", [
            "--template", "galera.cnf.template",
            f"DATADIR={ndir}/data", f"SOCKET={ndir}/mysqld.sock",
            f"PIDFILE={ndir}/mysqld.pid", f"ERROR_LOG={ndir}/error.log",
            f"PORT={node['port']}", "ADDRESS=127.0.0.1", "BUFFER_POOL=64M",
            "CLUSTER_NAME=fernetd-eval", f"CLUSTER_PEERS={peers}",
            f"NODE_NAME={node['name']}", f"GALERA_PORT={node['gport']}",
            f"IST_PORT={node['ist']}", f"SST_PORT={node['sst']}",
        ], os.path.join(ndir, "my.cnf"))
        node["dir"], node["cnf"], node["socket"] = ndir, cnf, f"{ndir}/mysqld.sock"

    def galera_query(self, node, sql):
        import pymysql
        conn = pymysql.connect(unix_socket=node["socket"], user="root", connect_timeout=2,
                               read_timeout=10, autocommit=True)
        try:
            with conn.cursor() as c:
                c.execute(sql)
                return c.fetchall()
        finally:
            conn.close()

    def galera_synced(self, node, size=3):
        def ready():
            st = dict(self.galera_query(node, "SHOW STATUS LIKE 'wsrep_%'"))
            return (st.get("wsrep_ready") == "ON"
                    and st.get("wsrep_local_state_comment") == "Synced"
                    and int(st.get("wsrep_cluster_size", 0)) >= size)
        return ready

    def start_galera_node(self, node, new_cluster=False):
        argv = ["/usr/sbin/mariadbd", f"--defaults-file={node['cnf']}"]
        if new_cluster:
            argv.append("--wsrep-new-cluster")
        p = Proc(f"galera.{node['name']}", argv, self.path("logs", f"galera.{node['name']}.log"),
                 ready=self.galera_synced(node, 1 if new_cluster else 2))
        self.add(p)
        return p

    def start_galera(self):
        for node in self.galera:
            self.galera_conf(node)
        subprocess.run(["chown", "-R", "mysql:mysql", os.path.join(self.dir, "galera")], check=True)
        first = self.galera[0]
        r = subprocess.run(
            ["mariadb-install-db", f"--defaults-file={first['cnf']}", "--user=mysql",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True)
        if r.returncode != 0:
            raise Refused(f"mariadb-install-db: {r.stdout}{r.stderr}")
        self.start_galera_node(first, new_cluster=True).wait_ready(120)
        # Once bootstrapped, node1 restarts as an ordinary member.
        self.procs["galera.node1"].argv = self.procs["galera.node1"].argv[:2]
        for sql in [
            "CREATE DATABASE keystone",
            f"CREATE USER 'keystone'@'127.0.0.1' IDENTIFIED BY '{self.db_password}'",
            "GRANT ALL PRIVILEGES ON keystone.* TO 'keystone'@'127.0.0.1'",
            "CREATE USER 'haproxy_check'@'127.0.0.1'",
        ]:
            self.galera_query(first, sql)
        # Joiners one at a time: each receives the whole datadir by rsync.
        for node in self.galera[1:]:
            self.start_galera_node(node).wait_ready(180)
        wait_until("a Galera cluster of 3", self.galera_synced(first, 3), 60)

    def galera_wait(self, name):
        node = next(n for n in self.galera if f"galera.{n['name']}" == name)
        wait_until(f"{name} Synced in a cluster of 3", self.galera_synced(node, 3), 180,
                   self.procs[name])

    # -- haproxy ------------------------------------------------------------
    def start_haproxy(self, name, template, vip, servers, backups=()):
        args = ["--template", template, f"VIP={addr(vip)}"]
        args += [f"SERVER={n}={a}" for n, a in servers]
        args += [f"BACKUP={n}={a}" for n, a in backups]
        cfg = render("render-haproxy.sh", args, self.path("haproxy", f"{name}.cfg"))
        self.add(Proc(name, ["/usr/sbin/haproxy", "-db", "-f", cfg], self.path("logs", f"{name}.log"),
                      ready=lambda: socket.create_connection(("127.0.0.1", vip), 1).close() or True))

    # -- Keystone -----------------------------------------------------------
    def keystone_conf_path(self, name):
        return os.path.join(self.dir, "keystone", f"{name}.conf")

    def keystone_confs(self):
        os.makedirs(os.path.join(self.dir, "keystone"), exist_ok=True)
        self.credential_keys = os.path.join(self.dir, "keystone", "credential-keys")
        os.makedirs(self.credential_keys, exist_ok=True)
        for name, region in CONTROLLERS:
            conf = self.keystone_conf_path(name)
            render("render-conf.sh", [
                f"DATABASE_CONNECTION=mysql+pymysql://keystone:{self.db_password}@{addr(self.db_vip)}/keystone",
                f"KEY_REPOSITORY={self.repos[name]}",
                f"CREDENTIAL_KEY_REPOSITORY={self.credential_keys}",
                f"TOKEN_EXPIRATION={self.expiration}", "ALLOW_EXPIRED_WINDOW=0",
                f"MAX_ACTIVE_KEYS={self.max_active_keys}",
                f"TOKEN_CACHE_TIME={self.token_cache}", f"REVOKE_CACHE_TIME={self.revoke_cache}",
                "CACHE_ENABLED=true", f"MEMCACHE_SERVERS={addr(self.memcached[region])}",
            ], conf)
            if self.args.db_options == "defaults":
                # For comparison only: oslo.db's defaults instead of the bundle's.
                with open(conf) as f:
                    lines = f.read().split("\n")
                tuned = ("connection_recycle_time", "max_retries", "retry_interval", "pool_timeout",
                         "max_pool_size", "max_overflow")
                with open(conf, "w") as f:
                    f.write("\n".join(l for l in lines if not l.startswith(tuned)))
            with open(conf, "a") as f:
                # Evaluation only: the cheapest bcrypt Keystone allows, so that
                # logins cost little CPU on a small machine.
                f.write("\n[identity]\npassword_hash_rounds = 4\n")

    def manage(self, *args):
        r = subprocess.run(
            [os.path.join(VENV_BIN, "keystone-manage"), "--config-file",
             self.keystone_conf_path(CONTROLLERS[0][0])] + list(args),
            capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if r.returncode != 0:
            raise Refused(f"keystone-manage {args[0]}: {r.stderr.strip()[-2000:]}")

    def bootstrap(self):
        self.manage("db_sync")
        self.manage("credential_setup", "--keystone-user", "root", "--keystone-group", "root")
        self.manage("bootstrap", "--bootstrap-password", self.args.admin_password,
                    "--bootstrap-region-id", "RegionOne",
                    "--bootstrap-public-url", f"http://{self.region_identity('RegionOne')}/v3")

    def keystone_proc(self, name):
        env = dict(os.environ, HOME=self.home(), XDG_CACHE_HOME=self.home(),
                   FERNETD_KEYSTONE_VENV=os.path.dirname(VENV_BIN))
        port = self.keystone[name]

        def ready():
            return http("GET", f"http://{addr(port)}/v3", timeout=5)[0] == 200
        return Proc(f"keystone.{name}",
                    ["bash", os.path.join(HERE, "run-keystone.sh"), "--config",
                     self.keystone_conf_path(name), "--bind", addr(port), "--workers",
                     str(self.args.keystone_workers)],
                    self.path("logs", f"keystone.{name}.log"), env=env, ready=ready)

    def start_keystones(self):
        for name, _ in CONTROLLERS:
            self.add(self.keystone_proc(name))
        for name, _ in CONTROLLERS:
            self.procs[f"keystone.{name}"].wait_ready(180)

    def admin_token(self, at):
        st, headers, body = http("POST", f"http://{at}/v3/auth/tokens", body={"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"id": "default"}, "password": self.args.admin_password}}},
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}})
        if st != 201:
            raise Refused(f"admin login at {at}: {st} {body[:300]}")
        return {k.lower(): v for k, v in headers.items()}["x-subject-token"]

    def catalog(self):
        """Regions, an identity endpoint per region (bootstrap made RegionOne's),
        and the service user with the service role that auth_token logs in as."""
        at = addr(self.keystone[CONTROLLERS[0][0]])
        h = {"X-Auth-Token": self.admin_token(at)}
        base = f"http://{at}/v3"

        def call(method, path, body=None, want=(200, 201, 204)):
            st, _, text = http(method, base + path, h, body)
            if st not in want:
                raise Refused(f"{method} {path}: {st} {text[:300]}")
            return json.loads(text) if text else {}
        service = call("GET", "/services?type=identity")["services"][0]["id"]
        for region in REGIONS[1:]:
            call("POST", "/regions", {"region": {"id": region}})
            call("POST", "/endpoints", {"endpoint": {
                "service_id": service, "interface": "public", "region_id": region,
                "url": f"http://{self.region_identity(region)}/v3"}})
        project = call("POST", "/projects", {"project": {"name": "service", "domain_id": "default"}})["project"]["id"]
        user = call("POST", "/users", {"user": {"name": SERVICE_USER, "domain_id": "default",
                                                  "password": self.service_password}})["user"]["id"]
        roles = call("GET", "/roles?name=service")["roles"]
        role = roles[0]["id"] if roles else call("POST", "/roles", {"role": {"name": "service"}})["role"]["id"]
        call("PUT", f"/projects/{project}/users/{user}/roles/{role}")

    # -- services -----------------------------------------------------------
    def start_services(self):
        for region in REGIONS:
            # The fault the test injects to prove its own-region assertion can
            # fail: this region's services validate against another region's.
            against = dict(kv.split("=", 1) for kv in self.args.miswire).get(region, region)
            conf = render("render-conf.sh", [
                "--template", "keystone-authtoken.conf.template",
                f"WWW_AUTHENTICATE_URI=http://{addr(self.global_vip)}/v3",
                f"AUTH_URL=http://{self.region_identity(against)}/v3",
                f"SERVICE_USER={SERVICE_USER}", f"SERVICE_PASSWORD={self.service_password}",
                f"REGION_NAME={against}",
                f"MEMCACHED_SERVERS={addr(self.memcached[region])}",
                f"TOKEN_CACHE_TIME={self.middleware_cache}",
                f"MEMCACHE_SECRET_KEY={secrets.token_hex(16)}",
            ], self.path("services", f"{region.lower()}.conf"))
            port = self.service[region]
            env = dict(os.environ, FERNETD_EVAL_SERVICE_CONF=conf, FERNETD_EVAL_REGION=region,
                       HOME=self.home(), XDG_CACHE_HOME=self.home(), PYTHONWARNINGS="ignore")
            self.add(Proc(f"service.{region.lower()}", [
                os.path.join(VENV_BIN, "gunicorn"), "--no-control-socket", "--bind", addr(port),
                "--workers", str(self.args.service_workers), "--worker-class", "sync",
                "--timeout", "60", "--pythonpath", HERE, "--access-logfile", "-",
                "fernetd_eval_service:application"],
                self.path("logs", f"service.{region.lower()}.log"), env=env,
                ready=lambda port=port: http("GET", f"http://{addr(port)}/", timeout=5)[0] == 401))
        for region in REGIONS:
            self.procs[f"service.{region.lower()}"].wait_ready(120)

    # -- the whole -----------------------------------------------------------
    def up(self):
        t0 = time.monotonic()
        self.plan()
        self.fernetd_config()
        self.keystone_confs()
        say(f"files and logs under {self.dir}")
        self.start_memcached()
        self.start_fernetd()
        for name, _ in CONTROLLERS:
            self.procs[f"agent.{name}"].wait_ready(60)
        say("memcached x3, fernetd rotator and 4 agents started; Galera next")
        self.start_galera()
        nodes = [(n["name"], addr(n["port"])) for n in self.galera]
        if self.args.db_standby == "backup":
            # For comparison only: the usual one-active-others-backup VIP.
            self.start_haproxy("haproxy.identity-db", "haproxy-identity-db.cfg.template", self.db_vip,
                               nodes[:1], nodes[1:])
        else:
            self.start_haproxy("haproxy.identity-db", "haproxy-identity-db.cfg.template", self.db_vip,
                               nodes)
        wait_until("generation 1 at every controller",
                   lambda: all(self.generation(n) >= 1 for n, _ in CONTROLLERS), 60)
        say(f"Galera synced (3 nodes) after {time.monotonic() - t0:.0f} s; Keystone db_sync and bootstrap")
        self.bootstrap()
        self.start_keystones()
        r1 = [(n, addr(self.keystone[n])) for n, r in CONTROLLERS if r == "RegionOne"]
        others = [(n, addr(self.keystone[n])) for n, r in CONTROLLERS if r != "RegionOne"]
        self.start_haproxy("haproxy.regionone", "haproxy.cfg.template", self.region_one_vip, r1)
        self.start_haproxy("haproxy.global", "haproxy-global.cfg.template", self.global_vip, r1, others)
        for name in ("haproxy.identity-db", "haproxy.regionone", "haproxy.global"):
            self.procs[name].wait_ready(30)
        self.catalog()
        self.start_services()
        self.write_credentials()
        self.up_seconds = time.monotonic() - t0
        say(f"the cloud is up after {self.up_seconds:.0f} s")

    def write_credentials(self):
        auth = f"http://{addr(self.global_vip)}/v3"
        self.openrc = self.path("openrc")
        with open(self.openrc, "w") as f:
            f.write(f"""# source me: the evaluation cloud's admin, through the global identity VIP
export OS_AUTH_URL={auth}
export OS_IDENTITY_API_VERSION=3
export OS_USERNAME=admin
export OS_PASSWORD={self.args.admin_password}
export OS_PROJECT_NAME=admin
export OS_USER_DOMAIN_ID=default
export OS_PROJECT_DOMAIN_ID=default
export OS_REGION_NAME=RegionOne
""")
        self.clouds_yaml = self.path("clouds.yaml")
        with open(self.clouds_yaml, "w") as f:
            f.write(f"""clouds:
  fernetd-eval:
    auth:
      auth_url: {auth}
      username: admin
      password: {self.args.admin_password}
      project_name: admin
      user_domain_id: default
      project_domain_id: default
    region_name: RegionOne
    identity_api_version: 3
""")

    def describe(self):
        return {
            "dir": self.dir,
            "up_seconds": round(self.up_seconds, 1),
            "global_vip": addr(self.global_vip),
            "db_vip": addr(self.db_vip),
            "admin": {"user": "admin", "password": self.args.admin_password, "project": "admin"},
            "policy": {"rotate_every": self.interval, "token_expiration": self.expiration,
                       "max_active_keys": self.max_active_keys,
                       "keystone_cache_time": self.token_cache,
                       "revoke_cache_time": self.revoke_cache,
                       "middleware_cache_time": self.middleware_cache},
            "fernetd": {"binary": self.fernetd, "dir": self.fernetd_dir,
                        "admin_config": os.path.join(self.fernetd_dir, "admin.toml"),
                        "rotator_state": os.path.join(self.fernetd_dir, "rotator-state")},
            "regions": {r: {
                "identity": self.region_identity(r),
                "service": addr(self.service[r]),
                "service_log": self.procs[f"service.{r.lower()}"].log,
                "memcached": addr(self.memcached[r]),
                "controllers": [{
                    "name": n, "keystone": addr(self.keystone[n]),
                    "keystone_log": self.procs[f"keystone.{n}"].log,
                    "repository": self.repos[n],
                } for n, rr in CONTROLLERS if rr == r],
            } for r in REGIONS},
            "galera": [{"name": f"galera.{n['name']}", "port": n["port"]} for n in self.galera],
            "processes": {n: p.popen.pid for n, p in self.procs.items() if not p.exited()},
            "openrc": self.openrc,
            "clouds_yaml": self.clouds_yaml,
        }

    def down(self):
        # Clients first, the database last.
        for name in reversed(self.order):
            self.procs[name].stop()

    # -- control ------------------------------------------------------------
    def command(self, line):
        words = line.split()
        if not words:
            return "error empty command"
        verb, name = words[0], (words[1] if len(words) > 1 else "")
        if verb == "quit":
            return None
        proc = self.procs.get(name)
        if proc is None:
            return f"error no process {name!r}"
        if verb == "kill":
            proc.signal(signal.SIGKILL)
            proc.popen.wait()
        elif verb == "term":
            proc.stop()
        elif verb == "stop":
            proc.signal(signal.SIGSTOP)
        elif verb == "cont":
            proc.signal(signal.SIGCONT)
        elif verb == "start":
            if not proc.exited():
                return f"error {name} is running"
            proc.start()
        elif verb == "wait":
            if name.startswith("galera."):
                self.galera_wait(name)
            else:
                proc.wait_ready(180)
        else:
            return f"error unknown command {verb!r}"
        pid = proc.popen.pid if not proc.exited() else 0
        return f"ok {verb} {name} pid={pid}"


def main(argv):
    p = argparse.ArgumentParser(prog="eval-cloud", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where files and logs go (default: a new directory under /var/tmp)")
    p.add_argument("--fernetd", help="the fernetd binary (default: target/release or target/debug)")
    p.add_argument("--control", action="store_true", help="print READY <json>, then obey commands on stdin")
    p.add_argument("--keep", action="store_true", help="keep --dir after tear-down")
    p.add_argument("--rotate-every", type=int, default=20, help="seconds between rotations")
    p.add_argument("--token-expiration", type=int, default=120)
    p.add_argument("--keystone-cache-time", type=int, default=5, help="keystone.conf [token] cache_time")
    p.add_argument("--revoke-cache-time", type=int, default=5, help="keystone.conf [revoke] cache_time")
    p.add_argument("--middleware-cache-time", type=int, default=10, help="auth_token's token_cache_time")
    p.add_argument("--admin-password", default="fernetd-eval-admin", help="the bootstrap admin's password")
    p.add_argument("--keystone-workers", type=int, default=2)
    p.add_argument("--service-workers", type=int, default=2)
    p.add_argument("--db-standby", choices=["next", "backup"], default="next",
                   help="(comparison) how the database VIP lists the other Galera nodes")
    p.add_argument("--db-options", choices=["bundle", "defaults"], default="bundle",
                   help="(comparison) keystone.conf [database] tuning: the bundle's or oslo.db's defaults")
    p.add_argument("--miswire", action="append", default=[], metavar="REGION=OTHER",
                   help="(negative tests) REGION's service validates against OTHER's Keystone")
    args = p.parse_args(argv)
    if 60 % args.rotate_every:
        p.error("--rotate-every must divide 60 (a cron seconds field)")
    made_dir = args.dir is None
    if made_dir:
        args.dir = tempfile.mkdtemp(prefix="fernetd-eval-", dir="/var/tmp")
    cloud = None
    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    # Explicitly: a shell that starts this in the background leaves SIGINT
    # ignored, and Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        preflight()
        cloud = Cloud(args)
        cloud.up()
        info = cloud.describe()
        if args.control:
            print("READY " + json.dumps(info), flush=True)
            for line in sys.stdin:
                answer = cloud.command(line)
                if answer is None:
                    break
                print(answer, flush=True)
        else:
            show(info)
            signal.pause()
        return 0
    except Refused as e:
        say(f"refused: {e}")
        return 2
    except KeyboardInterrupt:
        say("interrupted: tearing the cloud down")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cloud is not None:
            cloud.down()
            say("every process stopped")
        if made_dir and not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


def show(info):
    r = info["regions"]
    lines = [
        "",
        f"fernetd evaluation cloud: up in {info['up_seconds']} s, files under {info['dir']}",
        f"  global identity VIP   http://{info['global_vip']}/v3   (RegionOne's Keystones, others as backup)",
        f"  identity database VIP {info['db_vip']}   (Galera: "
        + ", ".join(f"{g['name']} 127.0.0.1:{g['port']}" for g in info["galera"]) + ")",
    ]
    for name, region in r.items():
        ctl = ", ".join(f"{c['name']} {c['keystone']}" for c in region["controllers"])
        lines.append(f"  {name:<11} identity http://{region['identity']}/v3  service http://{region['service']}/  "
                     f"memcached {region['memcached']}  Keystone: {ctl}")
    pol = info["policy"]
    lines += [
        f"  fernetd: rotation every {pol['rotate_every']} s, tokens {pol['token_expiration']} s, "
        f"{pol['max_active_keys']} keys; status: {info['fernetd']['binary']} admin --config "
        f"{info['fernetd']['admin_config']} status",
        f"  revoked tokens are refused everywhere within {pol['middleware_cache_time']} + "
        f"{pol['keystone_cache_time']} + {pol['revoke_cache_time']} s",
        "",
        f"Credentials: source {info['openrc']}   (or OS_CLIENT_CONFIG_FILE={info['clouds_yaml']} "
        "OS_CLOUD=fernetd-eval)",
        "Try:",
        f"  T=$(curl -si http://{info['global_vip']}/v3/auth/tokens -H 'Content-Type: application/json' -d "
        "'{\"auth\":{\"identity\":{\"methods\":[\"password\"],\"password\":{\"user\":{\"name\":\"admin\","
        f"\"domain\":{{\"id\":\"default\"}},\"password\":\"{info['admin']['password']}\"}}}}}},\"scope\":"
        "{\"project\":{\"name\":\"admin\",\"domain\":{\"id\":\"default\"}}}}}' | "
        "awk 'tolower($1)==\"x-subject-token:\"{print $2}' | tr -d '\\r')",
    ]
    lines += [f"  curl -s -H \"X-Auth-Token: $T\" http://{region['service']}/   # {name}"
              for name, region in r.items()]
    lines += ["", "Ctrl-C tears everything down."]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
