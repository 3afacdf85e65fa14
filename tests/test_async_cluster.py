"""Two Ray nodes on this machine (a head and a second node, on loopback addresses): one run uses both."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys

import psutil
import pytest

DRIVER = """
import json, sys, torch
from keiryo.data import load_data
from keiryo.loop import TrainConfig
from keiryo.models import build_model
from keiryo.parallel.async_ps import train_async
from keiryo.parallel.config import Async
torch.manual_seed(0)
model = build_model("mlp", in_features=64, hidden=[32], num_classes=10)
address = None if sys.argv[1] == "local" else sys.argv[1]
result = train_async(model, load_data("digits"), Async(workers=4, max_updates=60, ray_address=address),
                     TrainConfig(batch_size=32, progress=False))
print(json.dumps(result.stats))
"""


WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 90
while sum(n["Alive"] for n in ray.nodes()) < 2:
    if time.monotonic() > deadline:
        sys.exit("the second Ray node never joined")
    time.sleep(0.5)
"""


def _stop_cluster(addresses: tuple[str, ...]) -> None:
    """Stop this cluster's Ray processes only (their command lines name its addresses): `ray stop --force`
    would also kill the Ray that a test in another pytest worker started for itself, beside this one."""
    mine = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if process.pid != os.getpid() and any(address in line for address in addresses):
            mine.append(process)
    for process in mine:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_cluster():
    """`ray start` a head on 127.0.0.2 and a second node on 127.0.0.3 (both loopback), then stop them."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env["RAY_AUTH_MODE"] = "token"
    port = _free_port()
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    head = [
        "ray",
        "start",
        "--head",
        "--port",
        str(port),
        "--node-ip-address",
        "127.0.0.2",
        "--include-dashboard",
        "false",
        *common,
    ]
    second = ["ray", "start", "--address", f"127.0.0.2:{port}", "--node-ip-address", "127.0.0.3", *common]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(second, env=env, check=True, capture_output=True, timeout=120)
        # `ray start` returns before the second node has registered with the head (seconds on a loaded
        # machine): wait until both are alive, so that the run below meets a two-node cluster
        subprocess.run(
            [sys.executable, "-c", WAIT_FOR_NODES, f"127.0.0.2:{port}"], env=env, check=True, timeout=120
        )
        yield f"127.0.0.2:{port}", env
    finally:
        _stop_cluster(("127.0.0.2", "127.0.0.3"))


def test_async_run_spreads_over_two_nodes(two_node_cluster):
    address, env = two_node_cluster
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, address], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"note: joined the Ray cluster at {address}, token authentication on"
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["version"] == stats["accepted"] == 60
    assert len(stats["nodes"]) == 4
    nodes = stats["nodes"]  # the workers ran on both nodes, in turn (a zero-CPU actor with a soft affinity
    assert nodes["0"] == nodes["2"] != nodes["1"] == nodes["3"]  # went to a random node: 1 run in 8 used one)


def test_a_local_run_starts_its_own_ray_beside_a_running_cluster(two_node_cluster):
    """Without an address the run starts a Ray of its own: it neither joins the cluster running on this
    machine (Ray's default for ray.init()) nor fails trying to."""
    address, env = two_node_cluster
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, "local"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["version"] == 60
    assert len(set(stats["nodes"].values())) == 1  # its own single node, not the cluster's two
