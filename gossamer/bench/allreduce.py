"""``gossamer bench allreduce``: the DiLoCo all-reduce among 4 processes vs raw TCP.

Four member processes on 127.0.0.1, each a gossamer node holding 50M float32 (200 MB). Each
trial starts right after a barrier (a tiny all-reduce) and times one all-reduce of the whole
vector (direct reduce-scatter + all-gather over the encrypted data plane, see
:mod:`gossamer.training.collective`); a trial's time is the slowest member's. Codecs: ``none``
(fp32) and ``int8`` (blockwise, fp16 scales).

Reference, measured in the same run between the same four processes: plain Python TCP sockets
(``sendall``/``recv_into``, one thread per link) exchanging exactly the bytes an fp32
all-reduce sends — each member sends 2·(n−1)/n of its vector, split evenly over the others, all
links at once — unencrypted, with no reduction. ``ratio_fp32_vs_raw`` = all-reduce time / that.
For context (not measured here): hivemind 1.1.12's averager took 7.7 s for the same job on this
machine class (DESIGN.md).

These machines are shared: besides wall times, each trial records the CPU seconds every member
process spent (all threads) — ``cpu_seconds_<codec>``, summed over members — which other
people's load does not inflate; ``seconds_<codec>_if_cpus_idle`` = that / the machine's cores is
what the all-reduce would take with the cores to itself, if it kept them all busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from gossamer.bench._common import stop_processes

GOAL_SECONDS_FP32 = 1.5
HIVEMIND_SECONDS = 7.7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--floats", type=int, default=50_000_000, help="per worker")
    parser.add_argument("--repeats", type=int, default=3, help="trials per method (median)")
    parser.add_argument("--codecs", default="none,int8")


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.workers
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gossamer.bench._allreduce_peer",
                str(i),
                str(n),
                str(args.floats),
                str(args.repeats),
                ",".join(codecs),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for i in range(n)
    ]
    try:
        ready = [_expect(p, "ready") for p in procs]
        peers = {
            "addrs": [r["addr"] for r in ready],
            "ids": [r["peer_id"] for r in ready],
            "raw_ports": [r["raw_port"] for r in ready],
        }
        for p in procs:
            _send(p, peers)
        for p in procs:
            _expect(p, "connected")
        for p in procs:
            _send(p, {"go": True})
        trials: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for p in procs:
            while True:
                event = _expect(p, None)
                if event["event"] == "done":
                    break
                trials.setdefault((event["method"], event["rep"]), []).append(event)
    finally:
        stop_processes(procs, 30)
    per_method: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    sent: dict[str, float] = {}
    for (method, _), events in sorted(trials.items()):
        per_method.setdefault(method, []).append(max(e["seconds"] for e in events))
        cpu.setdefault(method, []).append(sum(e["cpu"] for e in events))
        sent[method] = statistics.mean(e["sent"] for e in events)
    cores = os.cpu_count() or 1
    raw = statistics.median(per_method["raw"])
    out: dict[str, Any] = {
        "bench": "allreduce",
        "workers": n,
        "floats_per_worker": args.floats,
        "mb_per_worker": round(args.floats * 4 / 1e6, 1),
        "repeats": args.repeats,
    }
    names = {"none": "fp32"}
    for codec in codecs:
        key = names.get(codec, codec)
        seconds = statistics.median(per_method[codec])
        out[f"seconds_{key}"] = round(seconds, 3)
        out[f"all_seconds_{key}"] = [round(s, 3) for s in per_method[codec]]
        out[f"mb_sent_per_worker_{key}"] = round(sent[codec] / 1e6, 1)
        out[f"ratio_{key}_vs_raw"] = round(seconds / raw, 2)
        # CPU seconds all members spent (every thread): what the machine's load does not change
        out[f"cpu_seconds_{key}"] = round(statistics.median(cpu[codec]), 3)
        out[f"seconds_{key}_if_cpus_idle"] = round(statistics.median(cpu[codec]) / cores, 3)
    out["raw_tcp_seconds"] = round(raw, 3)
    out["all_raw_tcp_seconds"] = [round(s, 3) for s in per_method["raw"]]
    out["raw_tcp_mb_sent_per_worker"] = round(sent["raw"] / 1e6, 1)
    out["raw_tcp_cpu_seconds"] = round(statistics.median(cpu["raw"]), 3)
    out["cpu_cores"] = cores
    out["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    out["reference"] = (
        "raw TCP, same processes, same bytes as the fp32 all-reduce sends, all links at once, "
        "no encryption, no reduction"
    )
    if "seconds_fp32" in out:
        out["goal_seconds_fp32"] = GOAL_SECONDS_FP32
        out["hivemind_seconds_same_job_not_measured_here"] = HIVEMIND_SECONDS
    return out


def _send(proc: subprocess.Popen, message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()


def _expect(proc: subprocess.Popen, kind: str | None) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"an all-reduce member exited (status {proc.poll()})")
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if kind is None or event.get("event") == kind:
            return event
