"""Helpers shared by the benchmarks: child processes, percentiles, temp nodes."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gossamer.node import NodeConfig


@contextlib.contextmanager
def peer_process(
    *args: str, module: str = "gossamer.bench._peer", timeout: float = 60.0, stderr: Any = None
) -> Iterator[dict[str, Any]]:
    """Start ``python -m MODULE ARGS``; yield its ready line (parsed JSON), with the child's
    pid (``_pid``) and process handle (``_process``) added.  ``stderr``: where the child's
    log goes (a file object; None: ours).

    The child exits when its stdin closes, so leaving the block always ends it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise RuntimeError(
                f"benchmark peer {module} {' '.join(args)} exited before it was ready"
            )
        ready = json.loads(line)
        ready["_pid"] = proc.pid
        ready["_process"] = proc
        yield ready
    finally:
        stop_processes([proc], timeout)


def stop_processes(procs: list[subprocess.Popen[Any]], timeout: float) -> None:
    """End children that exit when their stdin closes: close every stdin first (so they wind
    down together), then wait up to ``timeout`` for each and kill the ones still running."""
    for proc in procs:
        if proc.stdin:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a (child) process has used so far, from /proc."""
    import os

    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # fields after the command: state is [0]; utime and stime are [11] and [12]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return percentile(values, 50)


def temp_node_config(**overrides: Any) -> NodeConfig:
    """A loopback-only node in a fresh temporary data dir."""
    config = NodeConfig(
        data_dir=Path(tempfile.mkdtemp(prefix="gossamer-bench-")),
        listen=["/ip4/127.0.0.1/tcp/0"],
        dataplane_listen="127.0.0.1:0",
        log_level="warning",
    )
    return config.replace(**overrides)


async def loopback_run(
    stack: contextlib.AsyncExitStack,
    root: Path,
    n: int,
    name: str,
    run_config: dict[str, Any],
    options: Any,
    log_level: str = "warning",
) -> tuple[list[Any], list[Any]]:
    """``n`` loopback nodes with run documents under ``root`` (closed with ``stack``); node 0
    hosts run ``name`` with ``run_config`` and the others join it. Returns (nodes, runs)."""
    from gossamer.crdt import CrdtService, open_stack

    nodes = []
    for i in range(n):
        config = NodeConfig(
            data_dir=root / f"w{i}",
            listen=["/ip4/127.0.0.1/tcp/0"],
            dataplane_listen="127.0.0.1:0",
            log_level=log_level,
        )
        nodes.append(
            await stack.enter_async_context(open_stack(config, dht=False, options=options))
        )
    services = [node.service(CrdtService) for node in nodes]
    runs = [await services[0].host_run(name, config=run_config)]
    boot = [nodes[0].addrs()[0]]
    for service in services[1:]:
        runs.append(await service.join_run(runs[0].run_id, bootstrap=boot))
    return nodes, runs
