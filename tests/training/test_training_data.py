"""The stdlib byte corpus: deterministic split, disjoint shards, reproducible batches."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from gossamer.training import load_corpus
from gossamer.training.data import batches, eval_batches, eval_loss, worker_shard
from gossamer.training.model import GPT, GPTConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_stdlib_corpus_split_by_file(corpus) -> None:
    assert corpus.root == str(Path(sysconfig.get_paths()["stdlib"]).resolve()) or Path(
        corpus.root
    ) == Path(sysconfig.get_paths()["stdlib"])
    n_train, n_eval = len(corpus.train_files), len(corpus.eval_files)
    assert n_train > 500
    assert 0.02 < n_eval / (n_train + n_eval) < 0.08  # ~5%
    assert not set(corpus.train_files) & set(corpus.eval_files)
    assert not any("site-packages" in f for f in corpus.train_files + corpus.eval_files)
    assert all(f.endswith(".py") and "\\" not in f for f in corpus.train_files)
    assert corpus.train.dtype == torch.uint8 and corpus.train.numel() > 5_000_000
    assert load_corpus() is corpus  # cached


def test_stdlib_files_are_in_the_streams(corpus) -> None:
    root = Path(corpus.root)
    first_eval = (root / corpus.eval_files[0]).read_bytes()
    assert bytes(corpus.eval[: len(first_eval)].tolist()) == first_eval
    sizes = sum((root / f).stat().st_size for f in corpus.train_files)
    assert sizes == corpus.train.numel()


def _fake_stdlib(tmp_path: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"# file {i}\n".encode() * 40)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third_party.py").write_text("x = 1\n")
    return tmp_path


def test_split_depends_on_each_files_name_only(tmp_path: Path) -> None:
    names = [f"pkg{i % 7}/mod{i}.py" for i in range(200)]
    a = load_corpus(str(_fake_stdlib(tmp_path / "a", names)), 0.2)
    b = load_corpus(str(_fake_stdlib(tmp_path / "b", names[:150])), 0.2)  # a smaller install
    assert "site-packages/third_party.py" not in a.train_files + a.eval_files
    assert set(b.eval_files) == set(a.eval_files) & set(names[:150])
    assert a.fingerprint != b.fingerprint
    again = load_corpus.__wrapped__(str(tmp_path / "a"), 0.2)
    assert again.fingerprint == a.fingerprint and again.eval_files == a.eval_files


def test_worker_shards_are_disjoint_and_cover_the_stream(corpus) -> None:
    n = 4
    shards = [worker_shard(corpus, i, n) for i in range(n)]
    assert sum(s.numel() for s in shards) == corpus.train.numel()
    starts = [s.data_ptr() - corpus.train.data_ptr() for s in shards]
    assert starts == sorted(starts) and starts[0] == 0
    for s, nxt in zip(shards, starts[1:], strict=False):
        assert s.data_ptr() - corpus.train.data_ptr() + s.numel() == nxt
    with pytest.raises(ValueError):
        worker_shard(corpus, 4, 4)


def test_batches_are_reproducible_and_stay_inside_the_shard() -> None:
    stream = torch.arange(1000, dtype=torch.int64).to(torch.uint8)  # byte = position mod 256
    a = batches(stream[:500], 8, 16, seed=1, worker=2)
    b = batches(stream[:500], 8, 16, seed=1, worker=2)
    c = batches(stream[:500], 8, 16, seed=1, worker=3)
    xa, ya = next(a)
    xb, _ = next(b)
    xc, _ = next(c)
    assert xa.shape == ya.shape == (8, 16) and xa.dtype == torch.int64
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert torch.equal(ya[:, :-1], xa[:, 1:])  # y is x shifted by one byte
    for _ in range(50):
        x, y = next(a)
        assert bool(
            ((y - x) % 256 == 1).all()
        )  # consecutive positions: never a wrap to another shard
        assert int(x.max()) < 256


def test_eval_batches_are_fixed_and_cover_the_eval_stream(corpus) -> None:
    one = eval_batches(corpus, 4, 8, 64)
    two = eval_batches(corpus, 4, 8, 64)
    assert len(one) == 4 and one[0][0].shape == (8, 64)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, two, strict=True))


def test_eval_loss_is_deterministic_and_drops_with_training(corpus) -> None:
    model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, context=32), seed=0)
    before = eval_loss(model, corpus, 4)
    assert before == eval_loss(model, corpus, 4)
    assert model.training  # restored
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    it = batches(worker_shard(corpus, 0, 1), 8, 32, seed=0)
    for _ in range(30):
        x, y = next(it)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss(model, corpus, 4) < before - 0.5
