"""Ray for the parameter server: start a local Ray of this run's own (or join a cluster), and keep it quiet.

A local Ray listens on 127.0.0.1 only, without a dashboard, with token authentication on, and its log lines
stay in its own files (Ray's banners and worker errors do not reach the terminal). A run that joins a cluster
says on stderr whether token authentication is on, and an address nothing answers at fails in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator

from keiryo.errors import KeiryoError, one_line


def ray_init(address: str | None) -> bool:
    """Start a Ray of this run's own (or join `address`) unless already connected; True when this call
    started it.

    A local Ray is kept on the loopback address with Ray's own switch for single-machine clusters
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by every Ray process it starts), so that an embedded run never
    listens on the machine's network interfaces. Token authentication is Ray's default for a cluster it
    starts; `quiet_ray` keeps its banner off the terminal.
    """
    import ray

    if ray.is_initialized():
        return False
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with quiet_ray():
            if address is None:
                with _loopback_only():
                    # "local": a new Ray of this run's own, never one found running on the machine
                    ray.init("local", num_cpus=2, _node_ip_address="127.0.0.1", **options)
            else:
                check_reachable(address)
                _auth_for_cluster()
                ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at '{address}'" if address else "a local Ray"
        raise KeiryoError(f"cannot start {where}: {one_line(exc)}") from exc
    if address is not None:
        auth = os.environ.get("RAY_AUTH_MODE", "disabled")
        note = (
            "token authentication on"
            if auth == "token"
            else "token authentication OFF: anyone who reaches the cluster can run code on it "
            "(start it with RAY_AUTH_MODE=token)"
        )
        print(f"note: joined the Ray cluster at {address}, {note}", file=sys.stderr)
    return True


def check_reachable(address: str) -> None:
    """Fail in one line at once when nothing answers at `address` (host:port, or ray://host:port): Ray
    itself retries for minutes and prints a warning every few seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise KeiryoError(
            f"cannot reach the Ray cluster at '{address}': {exc.strerror or type(exc).__name__}; "
            "check --ray-address (the head's host:port, e.g. 10.0.0.5:6379)"
        ) from None


def _auth_for_cluster() -> None:
    """Keep token authentication on when joining a cluster: Ray enables it by itself only for a cluster it
    finds on its own, so keiryo asks Ray to when RAY_AUTH_MODE is unset and a token is at hand."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:  # Ray's own switch (private): sets RAY_AUTH_MODE=token and reloads Ray's cached config
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's "no cluster" switch, on while a local Ray starts: its processes inherit the variable, and the
    driver's already-imported constant is set too (it was read when ray was first imported)."""
    import ray._private.ray_constants as constants

    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before, flag = os.environ.get(name), getattr(constants, "ENABLE_RAY_CLUSTER", True)
    os.environ[name] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = flag
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """Keep Ray's own messages off the terminal unless KEIRYO_DEBUG is set: keiryo reports what went wrong
    itself, in one line, and Ray's session folder keeps its logs.

    Two channels: Ray's Python loggers (banners, warnings), and the driver thread that prints the errors the
    raylet publishes (a dead actor's "(raylet) A worker died..." paragraph) straight to stdout; that one has
    no switch, so its printer is swapped for a debug log line while keiryo runs.
    """
    if os.environ.get("KEIRYO_DEBUG"):
        yield
        return
    import ray._private.worker as ray_worker

    ray_logger = logging.getLogger("ray")
    level, propagate = ray_logger.level, ray_logger.propagate
    printer = getattr(ray_worker, "print_to_stdstream", None)
    ray_logger.setLevel(logging.CRITICAL + 1)
    ray_logger.propagate = False
    if printer is not None:
        ray_worker.print_to_stdstream = _to_debug_log
    try:
        yield
    finally:
        ray_logger.setLevel(level)
        ray_logger.propagate = propagate
        if printer is not None:
            ray_worker.print_to_stdstream = printer


def _to_debug_log(data: dict, ignore_prefix: bool = False) -> None:
    logging.getLogger("ray").debug("(%s) %s", data.get("pid"), " ".join(data.get("lines", [])))
