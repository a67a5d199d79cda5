"""``gossamer run status`` against a daemon serving a run document."""

from __future__ import annotations

import json

import pytest
import trio

from gossamer.cli.main import main
from gossamer.crdt import CrdtService
from gossamer.node import daemon


async def test_run_status_shows_members_round_and_metrics(node_config, capsys):
    config = node_config("daemon")
    stop = trio.Event()
    ready = trio.Event()
    hosted: dict[str, str] = {}

    async def extension(node):
        service = await CrdtService.start(node)
        run = await service.host_run("demo", config={"model": {"layers": 2}})
        run.doc.enter_round(3, "training")
        run.doc.report_metrics(step=3, loss=1.25, tokens=4096, bytes_sent=10)
        hosted["run_id"] = run.run_id
        hosted["peer_id"] = node.peer_id

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: daemon.serve(
                config, stop, extensions=[extension], ready=lambda n, s: ready.set()
            )
        )
        await ready.wait()
        base = ["run", "status", "--data-dir", str(config.data_dir)]
        code = await trio.to_thread.run_sync(
            main, [*base[:2], hosted["run_id"], *base[2:], "--json"]
        )
        out = capsys.readouterr().out
        assert code == 0
        status = json.loads(out)
        assert status["round"]["step"] == 3
        assert status["metrics"][hosted["peer_id"]]["tokens"] == 4096
        assert [m["peer_id"] for m in status["members"]] == [hosted["peer_id"]]
        # Human tables, by a unique prefix of the run id.
        code = await trio.to_thread.run_sync(main, [*base[:2], "demo-", *base[2:]])
        out = capsys.readouterr().out
        assert code == 0 and "members" in out and "metrics" in out and "4096" in out
        # An unknown run is one line on stderr, not a traceback.
        code = await trio.to_thread.run_sync(main, [*base[:2], "nope-aaaaaaaaaaaaaaaa", *base[2:]])
        captured = capsys.readouterr()
        assert code != 0 and "does not replicate" in captured.err
        assert "Traceback" not in captured.err
        stop.set()


async def test_run_invite_admit_revoke_from_the_cli(node_config, capsys):
    """``gossamer run invite|admit|revoke`` against the creator's running node, then on disk."""
    from crdt_helpers import crdt_nodes

    from gossamer.crdt import RunAccessError

    config = node_config("creator")
    stop = trio.Event()
    ready = trio.Event()
    hosted: dict[str, object] = {}

    async def extension(node):
        service = await CrdtService.start(node)
        run = await service.host_run("closed", access="restricted")
        hosted.update(run=run, service=service, addr=node.addrs()[0])

    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await trio.to_thread.run_sync(main, list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    data = ["--data-dir", str(config.data_dir)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: daemon.serve(
                config, stop, extensions=[extension], ready=lambda n, s: ready.set()
            )
        )
        await ready.wait()
        run = hosted["run"]
        async with crdt_nodes([node_config(), node_config()]) as (guest_s, outsider_s):
            with pytest.raises(RunAccessError):
                await outsider_s.join_run(run.run_id, bootstrap=[hosted["addr"]], timeout=5)
            code, out, _ = await cli("run", "invite", "closed-", "--ttl", "10m", *data)
            assert code == 0 and out.startswith("gsi1.")
            guest = await guest_s.join_run(
                run.run_id, bootstrap=[hosted["addr"]], invite=out.strip(), timeout=5
            )
            guest_id = guest_s.node.peer_id
            code, out, _ = await cli("run", "revoke", run.run_id, guest_id, *data)
            assert code == 0 and "revoked" in out and "running node" in out
            await guest.wait_for(lambda doc: not doc.charter.may_join(guest_id), timeout=5)
            code, out, _ = await cli("run", "admit", run.run_id, outsider_s.node.peer_id, *data)
            assert code == 0 and run.charter.may_join(outsider_s.node.peer_id)
            # mistakes: one line, non-zero
            code, _, err = await cli("run", "admit", run.run_id, "not-a-peer", *data)
            assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
            code, _, err = await cli("run", "invite", run.run_id, "--ttl", "soon", *data)
            assert code != 0
        stop.set()
    # no node running: admit amends the stored charter, invite signs offline
    code, out, _ = await cli("run", "admit", run.run_id, guest_id, *data, "--json")
    answer = json.loads(out)
    assert code == 0 and answer["live"] is False and answer["version"] == run.charter.version + 1
    code, out, _ = await cli("run", "invite", run.run_id, *data)
    assert code == 0 and out.startswith("gsi1.")
    code, _, err = await cli("run", "invite", "nope-aaaaaaaaaaaaaaaa", *data)
    assert code != 0 and "holds no run" in err
