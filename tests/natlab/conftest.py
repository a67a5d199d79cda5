"""The NAT lab as pytest fixtures: real NATs in network namespaces, gossamer nodes inside.

The engine is :mod:`gossamer.bench._natlab` (shared with ``gossamer bench nat``):
everything runs inside one ``unshare -n -m`` namespace with its own tmpfs on
/run, so the host's network is never touched and nothing can leave the machine.
Helpers (settings, address pickers) are in natlab_helpers.py.

Fixtures:

* ``natlab``: an empty lab (module scope); skips with the reason when the lab
  cannot run here (not root, no iptables, ...).
* ``nat_world``: the standard world (module scope): relays ``pub1`` and
  ``pub2`` on the public internet, ``a`` and ``b`` each behind its own cone
  NAT, ``s`` behind a symmetric NAT, every node bootstrapped from ``pub1``
  and running the DHT (where private nodes publish their relayed addresses).

On a failure, the tail of every lab node's log is attached to the report.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gossamer.bench._natlab import NatLab, unavailable_reason
from natlab.natlab_helpers import LAB_SETTINGS, NatWorld, bootstrap_addr

_labs: list[NatLab] = []


@pytest.fixture(scope="module")
def natlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatLab]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    lab = NatLab(tmp_path_factory.mktemp("natlab"))
    _labs.append(lab)
    try:
        yield lab
    finally:
        lab.close()
        _labs.remove(lab)


@pytest.fixture(scope="module")
def nat_world(natlab: NatLab) -> NatWorld:
    natlab.add_public("pub1")
    natlab.add_public("pub2")
    natlab.add_nat("nata", "cone", private="a")
    natlab.add_nat("natb", "cone", private="b")
    natlab.add_nat("nats", "symmetric", private="s")
    with_dht = {**LAB_SETTINGS, "dht": True}
    pub1 = natlab.start_node("pub1", with_dht).wait_ready()
    settings = {**with_dht, "bootstrap": [bootstrap_addr(pub1)]}
    others = [natlab.start_node(name, settings) for name in ("pub2", "a", "b", "s")]
    pub2, a, b, s = (agent.wait_ready() for agent in others)
    return NatWorld(natlab, pub1, pub2, a, b, s)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _labs:
        for lab in _labs:
            for agent in lab.agents:
                report.sections.append((f"lab node {agent.name} (log tail)", agent.log_tail(30)))
