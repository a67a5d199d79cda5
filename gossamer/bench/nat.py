"""NAT traversal on real NATs: hole-punch success, relayed connect and upgrade times, throughput.

``gossamer bench nat --json`` (root: it builds a NAT lab in network namespaces,
see ``gossamer/bench/_natlab.py``; nothing leaves the machine).

The cone-NAT scenario, ``--trials`` times: a relay on the lab's internet and
two nodes, each behind its own NAT router.  Each trial restarts both private
nodes with a fresh identity on a fresh port (so no NAT mapping or conntrack
entry of an earlier trial helps), waits until both are classified private by
dial-back and the target holds a relay reservation, then the dialer connects
to the target's relayed address and the two run DCUtR.

Figures:

* ``holepunch_success_rate``: trials that ended with a direct connection
  within ``--upgrade-timeout`` s (all retries included);
* ``relay_connect_ms_p50``: dialing the relayed address until the connection
  through the relay is up (Noise + Yamux inside the circuit);
* ``direct_upgrade_ms_p50``: from the relayed connection to the direct one;
* ``relayed_mib_s`` vs ``direct_mib_s``: ``--mb`` MiB through the data plane
  on a relayed-only connection (hole punching off) and on a hole-punched one
  (the data plane's own socket is behind the NAT, so both ride libp2p
  streams), and their ratio ``direct_over_relayed``.

Reference in the same run: ``tcp_mib_s``, plain Python TCP (one socket,
1 MiB writes) from the dialer's namespace through its NAT to the relay's
host, so ``direct_over_tcp`` says what Noise + Yamux + the data plane cost
on these links.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from gossamer.bench._common import percentile
from gossamer.bench._natlab import FIREWALLS, NAT_KINDS, AgentError, NatLab, unavailable_reason

MIB = 1 << 20
BASE_PORT = 4100

# Lab timings for reachability and relays (the lab's links answer in µs); hole
# punching runs with the node's defaults (3 attempts, 5 s of dialing each).
LAB_SETTINGS: dict[str, Any] = {
    "autonat_delay": 0.2,
    "autonat_retry": 2.0,
    "autonat_timeout": 2.0,
    "relay_check_interval": 2.0,
    "relay_reservations": 1,
    "upnp": False,
    "dht": False,
    "log_level": "info",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=20, help="cone-NAT trials (default 20)")
    parser.add_argument(
        "--nat", choices=NAT_KINDS, default="cone", help="NAT kind of both routers (default cone)"
    )
    parser.add_argument(
        "--firewall",
        choices=FIREWALLS,
        default="drop",
        help="what the routers do with unsolicited packets: drop (home gateway, default) "
        "or reject (plain MASQUERADE: the router answers RST)",
    )
    parser.add_argument("--mb", type=int, default=16, help="MiB per throughput transfer")
    parser.add_argument(
        "--upgrade-timeout",
        type=float,
        default=30.0,
        help="seconds a trial may take to go direct (the node tries 3 times, 5 s each)",
    )
    parser.add_argument(
        "--dcutr",
        choices=("gossamer", "py-libp2p"),
        default="gossamer",
        help="hole puncher: gossamer's (default) or py-libp2p's DCUtRProtocol, for comparison",
    )
    parser.add_argument("--workdir", default=None, help="keep lab logs here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"gossamer bench nat: {reason}")
    with NatLab(args.workdir) as lab:
        return _run(lab, args)


def _wait(agent: Any, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
    return agent.wait_for(predicate, timeout, interval=0.05, what=what)


def _circuits(status: dict[str, Any]) -> list[str]:
    return [a for a in status["addrs"] if "/p2p-circuit/" in a]


def _verdict(status: dict[str, Any]) -> str:
    return status["reachability"]["status"]


def _run(lab: NatLab, args: argparse.Namespace) -> dict[str, Any]:
    relay_host = lab.add_public("relay")
    lab.add_nat("nata", args.nat, args.firewall, private="a")
    lab.add_nat("natb", args.nat, args.firewall, private="b")
    relay = lab.start_node("relay", LAB_SETTINGS).wait_ready()
    boot = f"/ip4/{relay_host.ip}/tcp/4001/p2p/{relay.peer_id}"
    base = {**LAB_SETTINGS, "bootstrap": [boot]}
    if args.dcutr == "py-libp2p":
        base["stock_dcutr"] = True
    a = lab.start_node("a", base, name="a").wait_ready()
    b = lab.start_node("b", base, name="b").wait_ready()

    connect_ms: list[float] = []
    upgrade_ms: list[float] = []
    failures: list[str] = []
    successes = 0
    for trial in range(args.trials):
        port = BASE_PORT + 2 * trial
        a.restart(lab.node_settings(f"a{trial}", base, port))
        b.restart(lab.node_settings(f"b{trial}", base, port))
        try:
            status_a = _wait(a, lambda s: _circuits(s), 30, "a relayed address")
            _wait(b, lambda s: _verdict(s) == "private", 30, "b classified")
            start = time.perf_counter()
            b.call("connect", addr=_circuits(status_a)[0], timeout=30)
            connect_ms.append((time.perf_counter() - start) * 1000)
            state = _outcome(b, a, args)
        except AgentError as exc:
            failures.append(f"trial {trial}: {exc}"[:300])
            continue
        if state.get("state") == "direct":
            successes += 1
            upgrade_ms.append(float(state["upgrade_ms"]))
        else:
            failures.append(f"trial {trial}: {state.get('state')}: {state.get('reason')}")

    throughput = _throughput(lab, a, b, base, args)
    result: dict[str, Any] = {
        "nat": args.nat,
        "router_firewall": args.firewall,
        "dcutr": args.dcutr,
        "trials": args.trials,
        "holepunch_successes": successes,
        "holepunch_success_rate": successes / args.trials if args.trials else float("nan"),
        "relay_connect_ms_p50": _round(percentile(connect_ms, 50)),
        "relay_connect_ms_p90": _round(percentile(connect_ms, 90)),
        "direct_upgrade_ms_p50": _round(percentile(upgrade_ms, 50)),
        "direct_upgrade_ms_p90": _round(percentile(upgrade_ms, 90)),
        "direct_upgrade_ms_mean": _round(statistics.fmean(upgrade_ms)) if upgrade_ms else None,
        **throughput,
        **_tcp_reference(lab, args.mb * MIB, throughput.get("direct_mib_s")),
        "failures": failures[:10],
    }
    return result


def _outcome(dialer: Any, target: Any, args: argparse.Namespace) -> dict[str, Any]:
    if args.dcutr == "py-libp2p":
        return _direct_outcome(dialer, target, args.upgrade_timeout)
    return _punch_outcome(dialer, target, args.upgrade_timeout)


def _direct_outcome(dialer: Any, target: Any, timeout: float) -> dict[str, Any]:
    """py-libp2p's DCUtR keeps no per-peer state we can read: watch the connections.

    ``upgrade_ms`` is counted from when the relayed connection was up.
    """
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kinds = [c["kind"] for c in dialer.call("status")["connections"].get(target.peer_id, [])]
        if "direct" in kinds:
            return {"state": "direct", "upgrade_ms": (time.perf_counter() - start) * 1000}
        time.sleep(0.05)
    return {"state": "failed", "reason": f"no direct connection after {timeout} s"}


def _punch_outcome(dialer: Any, target: Any, timeout: float) -> dict[str, Any]:
    """Wait until the dialer's hole punch with ``target`` is direct or given up for good."""
    key = target.peer_id[-8:]
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = dialer.call("status")["nat"]["holepunch"].get(key, {})
        if state.get("state") == "direct":
            return state
        target_state = target.call("status")["nat"]["holepunch"].get(dialer.peer_id[-8:], {})
        if target_state.get("state") == "direct":
            return target_state
        if target_state.get("state") == "failed" and target_state.get("role") == "initiator":
            return target_state  # the initiator gave up after all its attempts
        time.sleep(0.05)
    return state or {"state": "timeout", "reason": f"nothing after {timeout} s"}


def _transfer(sender: Any, receiver: Any, nbytes: int, tag: str) -> dict[str, Any]:
    receiving = receiver.start_call("recv", peer_id=sender.peer_id, tag=tag, timeout=300)
    sent = sender.call("send", peer_id=receiver.peer_id, nbytes=nbytes, tag=tag, timeout=300)
    received = receiving.result(300)
    if sent["sha256"] != received["sha256"]:
        raise AgentError("transfer corrupted")
    return {"seconds": sent["seconds"], "path": sent["path"]}


def _throughput(
    lab: NatLab, a: Any, b: Any, base: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    nbytes = args.mb * MIB
    out: dict[str, Any] = {"transfer_mib": args.mb}
    port = BASE_PORT + 2 * args.trials + 10
    try:
        # Relayed: hole punching off on both sides.
        no_punch = {**base, "holepunch": False}
        a.restart(lab.node_settings("a-relayed", no_punch, port))
        b.restart(lab.node_settings("b-relayed", no_punch, port))
        status_a = _wait(a, lambda s: _circuits(s), 30, "a relayed address")
        _wait(b, lambda s: _verdict(s) == "private", 30, "b classified")
        b.call("connect", addr=_circuits(status_a)[0], timeout=30)
        _transfer(b, a, MIB, "warm-relay")
        relayed = _transfer(b, a, nbytes, "relayed")
        out["relayed_mib_s"] = _round(args.mb / relayed["seconds"])
        out["relayed_path"] = relayed["path"]

        # Direct: a hole-punched pair.
        port += 2
        a.restart(lab.node_settings("a-direct", base, port))
        b.restart(lab.node_settings("b-direct", base, port))
        status_a = _wait(a, lambda s: _circuits(s), 30, "a relayed address")
        _wait(b, lambda s: _verdict(s) == "private", 30, "b classified")
        b.call("connect", addr=_circuits(status_a)[0], timeout=30)
        if _outcome(b, a, args).get("state") != "direct":
            out["direct_mib_s"] = None
            out["direct_note"] = "hole punch failed: no direct throughput"
            return out
        if args.dcutr == "gossamer":  # py-libp2p's keeps the relayed one 60 s
            _wait(
                b,
                lambda s: [c["kind"] for c in s["connections"].get(a.peer_id, [])] == ["direct"],
                15,
                "relayed connection closed",
            )
        _transfer(b, a, MIB, "warm-direct")
        direct = _transfer(b, a, nbytes, "direct")
        out["direct_mib_s"] = _round(args.mb / direct["seconds"])
        out["direct_path"] = direct["path"]
        out["direct_over_relayed"] = _round(out["direct_mib_s"] / out["relayed_mib_s"])
    except AgentError as exc:
        out["throughput_error"] = str(exc)[:300]
    return out


_SINK = """
import socket, sys
server = socket.create_server(("0.0.0.0", 5001)); print("ready", flush=True)
conn, _ = server.accept(); buffer = bytearray(1 << 20); total = 0
while True:
    n = conn.recv_into(buffer)
    if not n: break
    total += n
conn.sendall(b"k"); print(total, flush=True)
"""
_SOURCE = """
import socket, sys, time, json
nbytes = int(sys.argv[2]); block = bytes(1 << 20)
conn = socket.create_connection((sys.argv[1], 5001), timeout=30)
start = time.perf_counter(); sent = 0
while sent < nbytes:
    conn.sendall(block); sent += len(block)
conn.shutdown(socket.SHUT_WR); conn.recv(1)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _tcp_reference(lab: NatLab, nbytes: int, direct_mib_s: float | None) -> dict[str, Any]:
    """Plain TCP from b (through its NAT) to the relay's host: the links' capacity."""
    relay_ip = lab.hosts["relay"].ip
    sink = subprocess.Popen(
        lab.command("relay", [sys.executable, "-c", _SINK]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        sink.stdout.readline()
        done = subprocess.run(
            lab.command("b", [sys.executable, "-c", _SOURCE, relay_ip, str(nbytes)]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = json.loads(done.stdout)["seconds"]
    except (ValueError, subprocess.SubprocessError, KeyError) as exc:
        return {"tcp_error": str(exc)[:200]}
    finally:
        sink.kill()
        sink.wait()
    tcp = nbytes / MIB / seconds
    ratio = _round(direct_mib_s / tcp) if direct_mib_s else None
    return {"tcp_mib_s": _round(tcp), "direct_over_tcp": ratio}


def _round(value: float | None) -> float | None:
    if value is None or value != value:  # NaN: no samples
        return None
    return round(value, 2)
