"""The dask cluster: which schedulers are accepted, connecting (with a timeout), and the
workers per host."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CONNECT_TIMEOUT = float(os.environ.get("NAPARI_UNET_CONNECT_TIMEOUT", 20))
"""Seconds to wait for a remote scheduler before giving up
(environment variable ``NAPARI_UNET_CONNECT_TIMEOUT``)."""

_ADDRESS = re.compile(
    r"^(?:(tcp|tls|inproc|ucx|ws|wss)://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$"
)


def _parse_local(scheduler: str) -> int:
    """Workers of ``"local[:N]"``: N, or one per GPU, or one single-threaded per core."""
    rest = scheduler[len("local") :].lstrip(":")
    if not rest:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()  # one worker per GPU
        return os.cpu_count() or 1  # one single-threaded worker per core
    try:
        n = int(rest)
    except ValueError:
        raise ValueError(f"bad scheduler {scheduler!r}: use local:N with N workers") from None
    if n < 1:
        raise ValueError(f"bad scheduler {scheduler!r}: need at least one worker")
    return n


def check_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler that is neither a ``Client``, ``local[:N]`` nor an address
    ``[tcp://]host:port`` — before anything is started or connected."""
    if not isinstance(scheduler, str):
        from distributed import Client

        if isinstance(scheduler, Client):
            return
        raise ValueError(
            f"scheduler must be a distributed.Client, an address or 'local:N', got {scheduler!r}"
        )
    if scheduler == "local" or scheduler.startswith("local:"):
        _parse_local(scheduler)
        return
    match = _ADDRESS.match(scheduler)
    if match is None or not 0 < int(match.group(3)) < 65536:
        raise ValueError(
            f"bad scheduler {scheduler!r}: use local:N (N worker processes here) or a "
            "scheduler address such as tcp://host:8786"
        )


@contextmanager
def connect(scheduler: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``; closes what it opened.

    ``scheduler``: a ``Client`` (used as is), a scheduler address (``"tcp://host:8786"``)
    or ``"local:N"`` — a ``LocalCluster`` of N worker processes with one thread each
    (closed afterwards). The client opened here does not become dask's default. An
    unreachable address raises ``RuntimeError`` after ``CONNECT_TIMEOUT`` seconds.
    """
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
        return
    check_scheduler(scheduler)
    if scheduler == "local" or scheduler.startswith("local:"):
        n = _parse_local(scheduler)
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster, set_as_default=False)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(scheduler, set_as_default=False, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(
            f"cannot reach the dask scheduler at {scheduler} within {CONNECT_TIMEOUT:g} s "
            f"({reason[:200]}); is `dask scheduler` running there?"
        ) from None
    try:
        yield client
    finally:
        client.close()


def host_of(address: str) -> str:
    """``tcp://10.0.0.5:40123`` → ``10.0.0.5``."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def workers_per_host(client: Any) -> dict[str, int]:
    """Number of workers on each host of the cluster (to share a host's cores)."""
    per_host: dict[str, int] = {}
    for address in client.scheduler_info()["workers"]:
        per_host[host_of(address)] = per_host.get(host_of(address), 0) + 1
    return per_host


def register(client: Any, plugin: Any) -> None:
    """Register a worker plugin under its ``name`` (set up on every current and future
    worker; an earlier plugin of that name is torn down)."""
    if hasattr(client, "register_plugin"):
        client.register_plugin(plugin, name=plugin.name)
    else:  # pragma: no cover - distributed < 2023.9
        client.register_worker_plugin(plugin, name=plugin.name)
