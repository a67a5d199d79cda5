import os
import stat

import pytest

from gossamer.node import (
    ConfigError,
    Identity,
    Node,
    load_config,
    load_or_create,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)


def test_identity_created_0600_and_stable(tmp_path):
    first = load_or_create(tmp_path)
    key_file = tmp_path / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = load_or_create(tmp_path)
    assert first.peer_id == second.peer_id
    assert first.seed == second.seed


def test_identity_refuses_world_readable_key(tmp_path):
    load_or_create(tmp_path)
    os.chmod(tmp_path / "identity.key", 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create(tmp_path)


def test_identity_refuses_garbage_key(tmp_path):
    path = tmp_path / "identity.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not hex\n")
    os.close(fd)
    with pytest.raises(ConfigError):
        load_or_create(tmp_path)


def test_peer_id_matches_libp2p_and_roundtrips():
    from libp2p.peer.id import ID

    from gossamer.node._libp2p_compat import libp2p_keypair

    identity = Identity.generate()
    libp2p_id = ID.from_pubkey(libp2p_keypair(identity).public_key).to_base58()
    assert identity.peer_id == libp2p_id
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key_bytes
    assert peer_id_from_public_key(identity.public_key_bytes) == identity.peer_id
    signature = identity.sign(b"payload")
    assert verify_signature(identity.public_key_bytes, signature, b"payload")
    assert not verify_signature(identity.public_key_bytes, signature, b"payloaD")


async def test_same_peer_id_after_restart(node_config):
    config = node_config("persistent")
    async with Node(config) as node:
        first = node.peer_id
        first_addr = node.addrs()[0]
    async with Node(config) as node:
        assert node.peer_id == first
        assert node.addrs()[0].endswith(f"/p2p/{first}")
    assert first_addr.endswith(first)


def test_config_precedence(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text("max_connections = 10\n[node]\nrpc_default_timeout = 3.5\nmdns = false\n")
    config = load_config(toml, env={"GOSSAMER_MAX_CONNECTIONS": "20"}, overrides={})
    assert config.max_connections == 20
    assert config.rpc_default_timeout == 3.5
    config = load_config(
        toml, env={"GOSSAMER_MAX_CONNECTIONS": "20"}, overrides={"max_connections": 30}
    )
    assert config.max_connections == 30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_conections = 3\n", "unknown config key 'max_conections'"),
        ("max_connections = 'many'\n", "expects an integer"),
        ("listen = ['not-a-multiaddr']\n", "not a multiaddr"),
        ("bootstrap = ['/ip4/127.0.0.1/tcp/1']\n", "must end in /p2p/"),
        ("max_connections = [\n", "not valid TOML"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(tmp_path, text, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        load_config(toml, env={})
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
