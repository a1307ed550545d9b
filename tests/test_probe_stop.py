"""A stop signal (SLURM's preemption: SIGTERM or SIGUSR1 to every process) ends a probe at
once, in its feature pass or inside a logistic-regression fit: exit 3, status "stopped",
and the same command then finishes. The probe ran every fit to the end and said
"finished" (exit 0), past a cluster's grace period on a large set."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from data_fixtures import make_shards
from support import PROBE_DEMO_RECIPE, cli
from test_trust_embed_reader import _keys, write_st

import cratemae.eval.features as features_mod
import cratemae.eval.logreg as logreg_mod


def _signal_self_once(real, sig=signal.SIGTERM):
    sent = []

    def wrapped(*args, **kwargs):
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)  # the run's handler only sets its flag
        return real(*args, **kwargs)

    return wrapped


def _stopped(run, out: Path, words: str) -> None:
    assert run.exit_code == 3, run.output
    errors = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], run.stderr
    assert json.loads((out / "status.json").read_text())["state"] == "stopped"
    assert not (out / "probe.json").exists()


def test_a_stop_signal_ends_the_fits_and_the_same_command_finishes(tmp_path, monkeypatch):
    train = write_st(tmp_path / "train.st", keys=_keys("t"), split="train")
    val = write_st(tmp_path / "val.st", keys=_keys("v"), split="val")
    out = tmp_path / "p"
    args = ("probe", PROBE_DEMO_RECIPE, "--features", train, val, "--out", out)
    with monkeypatch.context() as m:  # the signal arrives inside the first fit
        m.setattr(logreg_mod.F, "cross_entropy",
                  _signal_self_once(logreg_mod.F.cross_entropy, signal.SIGUSR1))
        _stopped(cli(*args), out, "stopped by SIGUSR1 during fit 1 of 6")
    run = cli(*args)
    assert run.exit_code == 0, run.output
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert json.loads((out / "probe.json").read_text())["top1"] >= 0


def test_a_stop_signal_ends_the_feature_pass(tmp_path, monkeypatch, demo_checkpoint):
    make_shards(tmp_path / "d", [4, 4], prefix="train")
    make_shards(tmp_path / "v", [4], prefix="val")
    out = tmp_path / "p"
    monkeypatch.setattr(features_mod, "eval_batches",
                        _signal_self_once(features_mod.eval_batches))
    run = cli("probe", PROBE_DEMO_RECIPE, "--checkpoint", demo_checkpoint, "--out", out,
              "--set", f'data.train="{tmp_path / "d"}"', "--set", f'data.val="{tmp_path / "v"}"',
              "--set", "data.num_workers=0", "--set", "data.batch_size=4",
              "--set", "probe.num_classes=8", "--set", f'probe.cache_dir="{tmp_path / "c"}"')
    _stopped(run, out, "stopped by SIGTERM while extracting the features of data.train")
    assert not any((tmp_path / "c").glob("*"))
