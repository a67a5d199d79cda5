"""Checkpoints: exact round trip, digest verification, no pickle, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gossamer.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gossamer.training.model import GPT, GPTConfig
from gossamer.training.outer import apply_outer_step, init_outer_state, state_digest

torch.set_num_threads(1)


def _state():
    model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, context=16), seed=3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grad = {k: torch.full_like(v, 0.01) for k, v in params.items()}
    return apply_outer_step(params, grad, init_outer_state(params, lr=0.5))


def test_roundtrip_is_exact(tmp_path: Path) -> None:
    params, state = _state()
    path = tmp_path / "ckpt.safetensors"
    digest = save_checkpoint(path, params, state, round=17, metadata={"run": "r1"})
    ck = load_checkpoint(path)
    assert ck.digest == digest == state_digest(params, state)
    assert state_digest(ck.params, ck.outer_state) == digest
    assert ck.round == 17 and ck.metadata == {"run": "r1"}
    assert (ck.outer_state.lr, ck.outer_state.step, ck.outer_state.nesterov) == (0.5, 1, True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp files left
    # the file is plain safetensors: another tool can read it without gossamer (or pickle)
    raw = load_file(path)
    assert torch.equal(raw["param/tok_emb.weight"], params["tok_emb.weight"])


def test_tied_weights_from_a_state_dict_can_be_saved(tmp_path: Path) -> None:
    model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, context=16), seed=0)
    sd = model.state_dict()  # head.weight and tok_emb.weight share memory
    state = init_outer_state(sd)
    save_checkpoint(tmp_path / "t.safetensors", sd, state, round=0)
    ck = load_checkpoint(tmp_path / "t.safetensors")
    assert torch.equal(ck.params["head.weight"], ck.params["tok_emb.weight"])


def _rewrite(path: Path, mutate) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    mutate(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def test_tampering_is_detected(tmp_path: Path) -> None:
    params, state = _state()
    path = tmp_path / "c.safetensors"

    def flip_one_bit(tensors, meta):
        t = tensors["param/ln_f.weight"]
        t.view(torch.int32)[3] ^= 1

    def bump_step(tensors, meta):
        outer = json.loads(meta["outer"])
        outer["step"] += 1
        meta["outer"] = json.dumps(outer)

    def drop_buffer(tensors, meta):
        del tensors["momentum/ln_f.weight"]

    def bad_format(tensors, meta):
        meta["format"] = "something-else"

    def bad_json(tensors, meta):
        meta["outer"] = "{"

    for mutate, why in (
        (flip_one_bit, "digest"),
        (bump_step, "digest"),
        (drop_buffer, "pair"),
        (bad_format, "format"),
        (bad_json, "malformed"),
    ):
        save_checkpoint(path, params, state, round=1)
        _rewrite(path, mutate)
        with pytest.raises(CheckpointError, match=why):
            load_checkpoint(path)


def test_garbage_and_truncated_files_are_refused(tmp_path: Path) -> None:
    params, state = _state()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params, state, round=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    path.write_bytes(b"\x80\x04\x95 definitely a pickle")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_save_validates_arguments(tmp_path: Path) -> None:
    params, state = _state()
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x", params, state, round=-1)
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x", params, state, round=0, metadata={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "x", {"only": torch.zeros(1)}, state, round=0)
