"""The built-in demo data set: counts, classes, determinism, atomic build, usefulness."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cratemae.data import build_loader
from cratemae.data.demo import CLASSES, DEMO_VERSION, build_demo, ensure_demo
from cratemae.recipe.schema import DataSection


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo, built once in the cache directory that `isolated_cache` points at."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CRATEMAE_CACHE", str(tmp_path_factory.getbasetemp() / "cratemae-cache"))
    yield ensure_demo()
    mp.undo()


def test_demo_counts_and_classes(demo):
    index = json.loads((demo / "shards.json").read_text())
    assert index["classes"] == list(CLASSES) and len(CLASSES) == 10
    counts = {s: sum(e["samples"] for e in v) for s, v in index["splits"].items()}
    assert counts == {"train": 5000, "val": 1000}
    assert len(list(demo.glob("train-*.tar"))) == 500 and len(list(demo.glob("val-*.tar"))) == 100
    assert not [p for p in demo.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


@pytest.mark.slow  # builds the whole set a second time, ~6 s: CI runs it
def test_demo_is_deterministic(demo, tmp_path):
    build_demo(tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(demo)


def test_demo_resolves_and_is_balanced_and_colour_blind(demo):
    data = DataSection(train="demo:train", val="demo:val", batch_size=500, num_workers=0)
    kw = dict(augment="none", img_size=32, seed=0, epoch=0)
    batches = list(build_loader(data, split="train", **kw))
    x = np.concatenate([b.images.numpy() for b in batches])  # (5000, 3, 32, 32)
    y = np.concatenate([b.labels.numpy() for b in batches])
    assert x.shape == (5000, 3, 32, 32) and np.bincount(y).tolist() == [500] * 10
    assert len(build_loader(data, split="val", **kw)) == 2
    # a linear classifier on mean colour is near chance (10%): the class is the shape
    feats = np.concatenate([x.mean(axis=(2, 3)), np.ones((len(x), 1))], axis=1)
    w, *_ = np.linalg.lstsq(feats[:4000], np.eye(10)[y[:4000]], rcond=None)
    acc = float((np.argmax(feats[4000:] @ w, 1) == y[4000:]).mean())
    assert acc < 0.2


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import cratemae.data.demo as demo_mod

    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path))

    def boom(out_dir: Path):
        (out_dir / "train-000000.tar").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_mod, "build_demo", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo()
    assert list(tmp_path.iterdir()) == []


def test_racing_builds_both_get_the_finished_data_set(tmp_path, monkeypatch):
    import threading
    import time

    import cratemae.data.demo as demo_mod

    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path))

    def fake_build(out_dir: Path):
        time.sleep(0.2)  # both builders are in flight at once
        (out_dir / "shards.json").write_text(json.dumps({"splits": {}, "who": out_dir.name}))

    monkeypatch.setattr(demo_mod, "build_demo", fake_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] == tmp_path / f"demo-v{DEMO_VERSION}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"demo-v{DEMO_VERSION}"]
    assert sorted(p.name for p in results[0].iterdir()) == ["shards.json"]
