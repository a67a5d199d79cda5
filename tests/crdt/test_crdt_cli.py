"""``gossamer run status`` against a daemon serving a run document."""

from __future__ import annotations

import json

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
