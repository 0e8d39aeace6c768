"""Connecting to Ray: ``local``, ``auto`` or ``host:port``, pinned to loopback where the cluster is local.

Ray resolves "this node's address" to the host's network interface, even for
a cluster on 127.0.0.1 (`ray.init("127.0.0.1:6379")` connects to the
interface address instead). For a loopback or in-process cluster that is
wrong: nothing should leave the machine. `connect` therefore turns Ray's
interface lookup off for such addresses (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
makes every node and driver use the loopback address, as Ray does on
laptops) and then *checks* the address the driver and every node really use.
Usage statistics are never sent (``RAY_USAGE_STATS_ENABLED=0``).

>>> parse_address("127.0.0.1:6379")
('127.0.0.1', 6379)
>>> is_loopback("localhost"), is_loopback("10.0.0.5")
(True, False)
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import sys
from typing import Iterator, Optional

from ..errors import VisualMemoryError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Actors and tasks ask for half a CPU: on a 2-core machine, 2 actors of 1 CPU
# each plus Ray Data's own read tasks starved, and a 2-actor map_batches never finished.
ACTOR_CPUS = 0.5


class ClusterError(VisualMemoryError):
    """Ray is missing, the address is malformed, or the cluster is not where it should be."""


def require_ray():
    """Import ray, or say how to install it."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise ClusterError("Ray is not installed: `pip install 'visual-memory[ray]'` "
                           "(ray[data] and lance-ray, pinned)") from exc
    return sys.modules["ray"]


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), or a `ClusterError` naming the address."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"Ray address must be 'local', 'auto' or 'host:port'; got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(address: Optional[str]) -> Optional[str]:
    """The address to connect to: None to start Ray in-process (``local``), else ``host:port``."""
    if address is None or address == "local":
        return None
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if not env:
            raise ClusterError("ray='auto' needs the RAY_ADDRESS environment variable (host:port of the head node)")
        address = env
    address = str(address)
    if address.startswith("ray://"):
        raise ClusterError(f"Ray client addresses ({address}) are not supported; give the GCS address host:port")
    parse_address(address)
    return address


def pin_loopback() -> None:
    """Make Ray use 127.0.0.1 as this machine's node address (before any node starts).

    Ray reads these at import; where ray is already imported the constant it
    derived is set too, and `check_loopback` verifies the effect either way.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def node_addresses() -> dict[str, str]:
    """Node id -> address of every live node of the connected cluster, plus ``driver``."""
    ray = require_ray()
    out = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    out["driver"] = ray.util.get_node_ip_address()
    return out


def check_loopback() -> dict[str, str]:
    """Raise unless the driver and every live node use a loopback address."""
    addrs = node_addresses()
    bad = {k: v for k, v in addrs.items() if not is_loopback(v)}
    if bad:
        raise ClusterError(f"a loopback Ray cluster is using non-loopback addresses {sorted(set(bad.values()))}; "
                           "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray starts")
    return addrs


@contextlib.contextmanager
def connect(address: Optional[str] = "local", *, num_cpus: Optional[int] = None) -> Iterator[dict]:
    """Connect to Ray for the duration of the block (or reuse the connection already made).

    Parameters
    ----------
    address : {"local", "auto"} or "host:port", default "local"
        ``local`` starts a Ray runtime in this process (stopped on exit);
        ``auto`` reads ``RAY_ADDRESS``; ``host:port`` joins a running cluster.
        A loopback address (or ``local``) pins every node to 127.0.0.1 and
        checks it did.
    num_cpus : int, optional
        CPUs of an in-process runtime (default: all).

    Yields
    ------
    dict
        ``{"address": gcs address, "nodes": {node id: address}, "loopback": bool}``.
    """
    ray = require_ray()
    started = not ray.is_initialized()
    info = ensure(address, num_cpus=num_cpus)
    try:
        log.info("ray: connected to %s (%d node(s))", info["address"], len(info["nodes"]) - 1)
        yield info
    finally:
        if started:
            ray.shutdown()


def cluster_cpus() -> float:
    """CPUs the connected cluster has (all live nodes)."""
    return float(require_ray().cluster_resources().get("CPU", 0.0))


def cluster_gpus() -> float:
    return float(require_ray().cluster_resources().get("GPU", 0.0))


def ensure(address: Optional[str] = "local", *, num_cpus: Optional[int] = None) -> dict:
    """Connect for the life of the process (a sharded memory keeps its actors); reuse a connection made earlier.

    Returns the same dict as `connect`. Ray shuts its in-process runtime
    down at interpreter exit.
    """
    target = resolve(address)
    loopback = target is None or is_loopback(parse_address(target)[0])
    if loopback:
        pin_loopback()
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = require_ray()
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
        if target is None:
            ray.init(num_cpus=num_cpus, **kwargs)
        else:
            ray.init(address=target, **kwargs)
    nodes = check_loopback() if loopback else node_addresses()
    return {"address": ray.get_runtime_context().gcs_address, "nodes": nodes, "loopback": loopback}
