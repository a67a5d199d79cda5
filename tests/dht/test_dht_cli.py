"""``gossamer dht …`` against two real daemons (``gossamer node start``) on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import wait_until
from dht_helpers import clean_env, cli, daemon


async def test_put_on_one_daemon_get_and_providers_on_another(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    async with daemon(tmp_path, "a", env) as a:
        status = json.loads(
            (await cli("node", "status", "--data-dir", a["data_dir"], "--json", env=env)).stdout
        )
        async with daemon(tmp_path, "b", env, "--bootstrap", status["addrs"][0]) as b:

            async def b_knows_a() -> bool:
                done = await cli("dht", "status", "--data-dir", b["data_dir"], "--json", env=env)
                assert done.returncode == 0, done.stderr.decode()
                return json.loads(done.stdout)["routing_table"] >= 1

            await wait_until(
                b_knows_a, 30, interval=0.2, what="a routing table entry for a in b's DHT"
            )
            done = await cli(
                "dht",
                "put",
                "/gossamer/test/cli",
                "hello there",
                "--ttl",
                "60",
                "--data-dir",
                a["data_dir"],
                env=env,
            )
            assert done.returncode == 0, done.stderr.decode()
            assert b"stored /gossamer/test/cli on 2 node(s)" in done.stdout
            done = await cli(
                "dht", "get", "/gossamer/test/cli", "--data-dir", b["data_dir"], "--json", env=env
            )
            record = json.loads(done.stdout)
            assert record["value"] == "hello there" and record["expires_at"] > 0
            done = await cli("dht", "provide", "sha256-abc", "--data-dir", a["data_dir"], env=env)
            assert done.returncode == 0, done.stderr.decode()
            done = await cli(
                "dht", "providers", "sha256-abc", "--data-dir", b["data_dir"], "--json", env=env
            )
            providers = json.loads(done.stdout)
            assert [p["peer_id"] for p in providers] == [a["peer_id"]]
            assert providers[0]["addrs"]
            # A user mistake is one line and exit status 2, caught before any daemon call.
            done = await cli(
                "dht", "put", "no-namespace", "x", "--data-dir", a["data_dir"], env=env
            )
            assert done.returncode == 2
            assert len(done.stderr.decode().strip().splitlines()) == 1
            assert "/gossamer/<kind>/<name>" in done.stderr.decode()
            done = await cli(
                "dht", "get", "/gossamer/test/missing", "--data-dir", b["data_dir"], env=env
            )
            assert done.returncode == 1 and b"not found" in done.stdout
