"""A NAT lab on one machine: network namespaces, veth links, iptables NAT, nodes inside.

Everything lives inside one private network *and* mount namespace made with
``unshare -n -m`` (the "lab"), so nothing here can touch the host's network or
leave a file behind: the lab mounts its own tmpfs on ``/run`` (where
``ip netns`` keeps its names) and everything disappears when the lab's holder
process and the nodes in it exit.  Nothing in the lab can reach outside the
machine.

Topology (documentation address ranges for the "internet")::

    core namespace (the lab itself): the internet's router
      ├─ public host P   203.0.113.(16k+2)/28  gw 203.0.113.(16k+1)
      └─ NAT router R    wan 198.51.100.(16k+2)/28 gw 198.51.100.(16k+1)
           └─ private host 10.<n>.0.2/24 gw 10.<n>.0.1   (MASQUERADE on wan)

Each host sits on its own /28 link to the core, so traffic between two NATs is
routed (one hop), as on the internet.  NAT kinds:

* ``cone``: ``MASQUERADE`` (Linux keeps the source port when it can, so the
  mapping is endpoint-independent);
* ``symmetric``: ``MASQUERADE --random-fully`` (a fresh port per destination).

Router firewalls (what the router does with an unsolicited packet on its WAN):

* ``drop`` (default): a stateful firewall drops it, as most home gateways do;
* ``reject``: no firewall: the router's own TCP stack answers RST (plain
  MASQUERADE).  With zero-latency lab links this makes TCP hole punching
  need sub-100 µs simultaneity, which no process scheduler gives; see the
  holepunch module docs.

Node processes run ``python -m gossamer.bench._natlab_agent`` inside a host's
namespace and are driven over their stdin/stdout (JSON lines): see
:class:`Agent`.  Needs root, ``unshare``, ``nsenter``, ``ip`` and ``iptables``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PUBLIC_NET = "203.0.113"  # TEST-NET-3: public hosts
WAN_NET = "198.51.100"  # TEST-NET-2: NAT routers' WAN side
NAT_KINDS = ("cone", "symmetric")
FIREWALLS = ("drop", "reject")


class LabError(RuntimeError):
    """The lab could not be built or a command inside it failed."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (None when it can)."""
    if sys.platform != "linux":
        return "the NAT lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, veth, iptables)"
    for tool in ("unshare", "nsenter", "ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}` (scripts/install.sh --dev installs it)"
    return None


@dataclass
class Host:
    """A namespace with one address: a public host, a NAT router or a private host."""

    name: str
    ip: str
    kind: str  # "public", "router", "private"
    wan_ip: str = ""  # routers: their public address; private hosts: their router's
    nat: str = ""  # private hosts: the NAT kind of their router
    router: str = ""  # private hosts: their router's name


@dataclass
class _Counters:
    public: int = 0
    router: int = 0


class NatLab:
    """Build a topology inside a private network namespace and run nodes in it.

    Use as a context manager; :meth:`close` kills every process and the lab.
    """

    def __init__(self, workdir: str | Path | None = None) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise LabError(reason)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gossamer-natlab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts: dict[str, Host] = {}
        self.agents: list[Agent] = []
        self._counters = _Counters()
        self._holder: subprocess.Popen[bytes] | None = None
        self._children: list[subprocess.Popen[bytes]] = []
        self._start()

    # ------------------------------------------------------------- lifecycle

    def _start(self) -> None:
        # The holder owns the lab's namespaces; it exits when its stdin closes
        # (our end of the pipe), so a crashed test cannot leave it behind.
        script = (
            "set -e; mount -t tmpfs gossamer-natlab /run; ip link set lo up; "
            "sysctl -qw net.ipv4.ip_forward=1; echo ready; exec cat >/dev/null"
        )
        self._holder = subprocess.Popen(
            ["unshare", "-n", "-m", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline()
        if line.strip() != b"ready":
            err = self._holder.stderr.read().decode() if self._holder.stderr else ""
            raise LabError(f"could not create the lab namespace: {err.strip() or line!r}")

    def close(self) -> None:
        for agent in list(self.agents):
            agent.kill()
        for child in self._children:
            with contextlib.suppress(OSError):
                assert child.stdin is not None
                child.stdin.close()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if self._holder is not None:
            with contextlib.suppress(OSError):
                assert self._holder.stdin is not None
                self._holder.stdin.close()
            try:
                self._holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._holder.kill()
                self._holder.wait()
            self._holder = None

    def __enter__(self) -> NatLab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------- commands

    def _enter(self) -> list[str]:
        assert self._holder is not None
        return ["nsenter", "-t", str(self._holder.pid), "-n", "-m", "--"]

    def sh(self, script: str, ns: str | None = None, check: bool = True) -> str:
        """Run a shell script in the lab (its core namespace, or host ``ns``)."""
        argv = [*self._enter()]
        if ns is not None:
            argv += ["ip", "netns", "exec", ns]
        argv += ["sh", "-ec", script]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise LabError(f"lab command failed ({proc.returncode}): {script}\n{proc.stderr}")
        return proc.stdout

    def command(self, ns: str, argv: list[str]) -> list[str]:
        """The argv that runs ``argv`` inside host ``ns``."""
        return [*self._enter(), "ip", "netns", "exec", ns, *argv]

    # ----------------------------------------------------------- topology

    def _link(self, name: str, net: str, index: int, dev: str) -> tuple[str, str]:
        """A /28 point-to-point link between the core and namespace ``name``."""
        gw, ip = f"{net}.{16 * index + 1}", f"{net}.{16 * index + 2}"
        core_dev = f"c-{name}"[:15]
        self.sh(
            f"ip netns add {name}; ip -n {name} link set lo up; "
            f"ip link add {core_dev} type veth peer name {dev} netns {name}; "
            f"ip addr add {gw}/28 dev {core_dev}; ip link set {core_dev} up; "
            f"ip -n {name} addr add {ip}/28 dev {dev}; ip -n {name} link set {dev} up; "
            f"ip -n {name} route add default via {gw}"
        )
        return gw, ip

    def add_public(self, name: str) -> Host:
        """A host with a public address on the lab's internet."""
        self._check_name(name)
        self._counters.public += 1
        _, ip = self._link(name, PUBLIC_NET, self._counters.public, "eth0")
        host = Host(name, ip, "public", wan_ip=ip)
        self.hosts[name] = host
        return host

    def add_nat(
        self, name: str, kind: str = "cone", firewall: str = "drop", private: str | None = None
    ) -> Host:
        """A NAT router and one private host behind it (named ``private`` or ``<name>-h``).

        Returns the private host; the router is ``lab.hosts[name]``.
        """
        if kind not in NAT_KINDS:
            raise LabError(f"unknown NAT kind {kind!r} (one of {NAT_KINDS})")
        if firewall not in FIREWALLS:
            raise LabError(f"unknown router firewall {firewall!r} (one of {FIREWALLS})")
        private = private or f"{name}-h"
        self._check_name(name)
        self._check_name(private)
        self._counters.router += 1
        n = self._counters.router
        _, wan = self._link(name, WAN_NET, n, "wan")
        lan_gw, lan_ip = f"10.{n}.0.1", f"10.{n}.0.2"
        masquerade = "MASQUERADE --random-fully" if kind == "symmetric" else "MASQUERADE"
        rules = [
            f"iptables -t nat -A POSTROUTING -o wan -j {masquerade}",
        ]
        if firewall == "drop":
            rules += [
                "iptables -A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "iptables -A INPUT -i wan -j DROP",
                "iptables -A FORWARD -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "iptables -A FORWARD -i wan -j DROP",
            ]
        self.sh(
            f"ip netns add {private}; ip -n {private} link set lo up; "
            f"ip -n {name} link add lan type veth peer name eth0 netns {private}; "
            f"ip -n {name} addr add {lan_gw}/24 dev lan; ip -n {name} link set lan up; "
            f"ip -n {private} addr add {lan_ip}/24 dev eth0; ip -n {private} link set eth0 up; "
            f"ip -n {private} route add default via {lan_gw}; "
            f"ip netns exec {name} sysctl -qw net.ipv4.ip_forward=1"
        )
        self.sh("; ".join(rules), ns=name)
        self.hosts[name] = Host(name, wan, "router", wan_ip=wan, nat=kind)
        host = Host(private, lan_ip, "private", wan_ip=wan, nat=kind, router=name)
        self.hosts[private] = host
        return host

    def _check_name(self, name: str) -> None:
        if name in self.hosts or not name.replace("-", "").isalnum() or len(name) > 12:
            raise LabError(f"bad or duplicate lab host name {name!r}")

    def start_igd(self, router: str) -> subprocess.Popen[bytes]:
        """Run the lab's UPnP gateway (``_natlab_igd``) on NAT router ``router``."""
        host = self.hosts.get(router)
        if host is None or host.kind != "router":
            raise LabError(f"{router!r} is not a lab NAT router")
        lan_ip = next(h.ip for h in self.hosts.values() if h.router == router).rsplit(".", 1)[0]
        argv = [
            sys.executable,
            "-m",
            "gossamer.bench._natlab_igd",
            "--lan-ip",
            f"{lan_ip}.1",
            "--wan-ip",
            host.wan_ip,
        ]
        log = open(self.workdir / f"{router}-igd.log", "ab")  # noqa: SIM115  -- child keeps it
        proc = subprocess.Popen(
            self.command(router, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            preexec_fn=_die_with_parent,
        )
        log.close()
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.kill()
            raise LabError(f"the UPnP gateway on {router} did not start")
        self._children.append(proc)
        return proc

    # -------------------------------------------------------------- nodes

    def start_node(
        self, host: str, config: dict[str, Any] | None = None, *, name: str | None = None
    ) -> Agent:
        """Start a gossamer node in ``host``'s namespace; return its :class:`Agent`."""
        if host not in self.hosts:
            raise LabError(f"no lab host {host!r}")
        name = name or host
        settings = self.node_settings(name, config)
        argv = self.command(
            host, [sys.executable, "-m", "gossamer.bench._natlab_agent", json.dumps(settings)]
        )
        agent = Agent(name, self.hosts[host], argv, self.workdir / f"{name}.log")
        self.agents.append(agent)
        return agent

    def node_settings(
        self, name: str, config: dict[str, Any] | None = None, port: int = 4001
    ) -> dict[str, Any]:
        """A lab node's settings: its own data dir, listening on ``port`` (data plane: +1)."""
        data_dir = self.workdir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "data_dir": str(data_dir),
            "listen": [f"/ip4/0.0.0.0/tcp/{port}"],
            "dataplane_listen": f"0.0.0.0:{port + 1}",
            "log_level": "info",
        }
        settings.update(config or {})
        return settings


class AgentError(RuntimeError):
    """A command sent to a lab node failed (the node's error message)."""


@dataclass
class Agent:
    """A gossamer node process in the lab, driven by JSON-line commands.

    ``agent.call("status")`` sends ``{"id", "cmd": "status", ...}`` and waits
    for the reply; ``agent.start_call(...)`` returns a future so several
    commands (on several agents) can run at once.
    """

    name: str
    host: Host
    argv: list[str]
    log_path: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115  -- closed in kill()
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=_die_with_parent,
        )
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._ready: Future[Any] = Future()
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    def wait_ready(self, timeout: float = 60.0) -> Agent:
        try:
            ready = self._ready.result(timeout)
        except TimeoutError:
            raise AgentError(
                f"{self.name} did not start in {timeout} s; see {self.log_path}"
            ) from None
        self.peer_id = ready["peer_id"]
        self.addrs = ready["addrs"]
        return self

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _read_loop(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if "ready" in message:
                self._ready.set_result(message["ready"])
                continue
            with self._lock:
                future = self._pending.pop(message.get("id", -1), None)
            if future is None:
                continue
            if message.get("ok"):
                future.set_result(message.get("result"))
            else:
                future.set_exception(AgentError(f"{self.name}: {message.get('error')}"))
        error = AgentError(f"{self.name} exited (rc={self._proc.poll()}); see {self.log_path}")
        if not self._ready.done():
            self._ready.set_exception(error)
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(error)

    def start_call(self, cmd: str, **params: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            self._pending[request_id] = future
        line = json.dumps({"id": request_id, "cmd": cmd, **params}) + "\n"
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            with self._lock:
                self._pending.pop(request_id, None)
            future.set_exception(AgentError(f"{self.name} is gone: {exc}"))
        return future

    def call(self, cmd: str, timeout: float = 30.0, **params: Any) -> Any:
        try:
            return self.start_call(cmd, **params).result(timeout)
        except TimeoutError:
            raise AgentError(f"{self.name}: {cmd} took longer than {timeout} s") from None

    def wait_for(
        self, predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition"
    ) -> dict[str, Any]:
        """Poll ``status`` until ``predicate(status)`` holds; return that status."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.call("status")
            if predicate(status):
                return status
            time.sleep(interval)
        raise AgentError(f"{self.name}: {what} not reached in {timeout} s; last status {status}")

    def restart(self, settings: dict[str, Any], timeout: float = 30.0) -> Agent:
        """Replace the node in this process by a fresh one (``settings`` as for start)."""
        ready = self.call("restart", timeout=timeout, settings=settings)
        self.peer_id, self.addrs = ready["peer_id"], ready["addrs"]
        return self

    def kill(self) -> None:
        """Stop the node at once (SIGKILL: no goodbye to its peers)."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            if self._proc.stdin:
                self._proc.stdin.close()
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the parent (the test or bench) dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass
