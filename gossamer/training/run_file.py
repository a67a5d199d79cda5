"""The run file (TOML) that ``gossamer run host --config`` reads: the run's name, model, data
recipe and DiLoCo settings, checked key by key.

    name = "tiny-gpt"      # the run id is derived from it and the host's key

    [model]                # the built-in byte-level GPT (defaults: 4 layers, d=128, context 128)
    n_layer = 4
    d_model = 128

    [data]                 # the stdlib corpus: per-worker batch, inner AdamW, shards
    batch_size = 4
    lr = 1e-3
    shards = 4

    [diloco]               # DiLoCoConfig
    inner_steps = 50
    rounds = 20
    codec = "int8"
    min_workers = 2

Every mistake is a :class:`ConfigError` naming the file and the key.  Torch-free until the
recipe's model shape is checked.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossamer.node import ConfigError, typed_fields
from gossamer.training.diloco_config import DiLoCoConfig
from gossamer.training.recipe import MODEL_KEYS, Recipe

SECTIONS = ("model", "data", "diloco")


@dataclass(frozen=True)
class RunFile:
    name: str
    recipe: Recipe
    diloco: DiLoCoConfig


def load_run_file(path: str | Path) -> RunFile:
    """Read and check a run file; ConfigError (one line) on any mistake."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_run_file(raw, str(path))


def parse_run_file(raw: dict[str, Any], where: str) -> RunFile:
    unknown = sorted(set(raw) - {"name", *SECTIONS})
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (name, {', '.join(SECTIONS)})"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f'{where}: set name = "…" (the run\'s name)')
    from gossamer.crdt import NAME_RE

    if not NAME_RE.match(name):
        raise ConfigError(
            f"{where}: run name {name!r}: use 1-48 lowercase letters, digits, '_' or '.', "
            "starting with a letter or digit"
        )
    sections = {}
    for section in SECTIONS:
        value = raw.get(section, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        sections[section] = dict(value)
    bad_model = sorted(set(sections["model"]) - set(MODEL_KEYS))
    if bad_model:
        raise ConfigError(f"{where}: unknown [model] key(s) {', '.join(bad_model)}")
    recipe_fields = typed_fields(Recipe, {**sections["model"], **sections["data"]}, where)
    try:
        diloco = DiLoCoConfig.from_dict(sections["diloco"], f"{where} [diloco]")
        if "schedule_steps" not in recipe_fields and diloco.rounds is not None:
            recipe_fields["schedule_steps"] = diloco.rounds * diloco.inner_steps
        recipe = Recipe(**recipe_fields)
        recipe.gpt  # noqa: B018 - validates the model shape
        if diloco.max_round_tokens is None:
            # the most tokens one member can honestly count in a round of the built-in model
            bound = diloco.inner_steps * recipe.batch_size * recipe.context
            diloco = dataclasses.replace(diloco, max_round_tokens=bound)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from None
    return RunFile(name, recipe, diloco)


__all__ = ["RunFile", "load_run_file", "parse_run_file"]
