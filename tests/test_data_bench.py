"""The data benchmark: library function and command."""

from __future__ import annotations

import json
import math

import pytest
import typer
from data_fixtures import (
    make_shards,
)
from support import DEMO_RECIPE, cli
from typer.testing import CliRunner

from cratemae.bench.data import bench_data
from cratemae.commands.bench_data import bench_data as bench_command
from cratemae.recipe.schema import DataSection


def test_bench_data_reports_throughput(tmp_path):
    make_shards(tmp_path / "d", [16] * 4, size=48)
    data = DataSection(train=str(tmp_path / "d"), batch_size=8)
    result = bench_data(data, img_size=32, num_workers=2, batches=6)
    assert result["batches"] == 6 and result["num_workers"] == 2
    assert result["images_per_s"] > 0 and result["cpu_cores_used"] > 0
    assert result["per_worker_images_per_s"] == pytest.approx(result["images_per_s"] / 2)
    assert result["bad"] == 0


def test_bench_data_command(tmp_path):
    make_shards(tmp_path / "d", [16] * 4)
    app = typer.Typer()
    app.command()(bench_command)
    res = CliRunner().invoke(
        app,
        [
            "--data",
            str(tmp_path / "d"),
            "--img-size",
            "16",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--batches",
            "5",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["batches"] == 5 and result["batch_size"] == 4 and result["images_per_s"] > 0


@pytest.mark.slow  # ~6 s; quick: test_bench_data_reports_throughput and _command
def test_bench_data_measures_at_the_recipe_image_size() -> None:
    run = cli("bench-data", DEMO_RECIPE, "--batches", 2, "--num-workers", 0, "--json")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.strip().splitlines()[-1])["img_size"] == 32  # demo: 32 px
    run = cli("bench-data", DEMO_RECIPE, "--batches", 2, "--num-workers", 0, "--json",
              "--img-size", 16)
    assert json.loads(run.stdout.strip().splitlines()[-1])["img_size"] == 16


def test_bench_data_says_the_workers_a_target_rate_needs_and_records_its_figure(
        tmp_path, monkeypatch):
    from cratemae.bench.data import data_key, model_key, record_rate, recorded_rate

    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path / "cache"))
    make_shards(tmp_path / "d", [16] * 2)
    args = ["bench-data", "--data", tmp_path / "d", "--img-size", 16, "--batch-size", 4,
            "--num-workers", 0, "--batches", 2, "--json"]
    run = cli(*args, "--target-rate", 1e9)
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout.strip().splitlines()[-1])
    per_worker = result["per_worker_images_per_s"]
    assert per_worker == result["images_per_s"] > 0  # 0 workers: the main process is one
    assert result["target_rate"] == 1e9
    assert result["workers_needed"] == math.ceil(1e9 / per_worker)
    key = data_key(DataSection(train=str(tmp_path / "d")), 16, "pretrain")
    assert recorded_rate(key) == pytest.approx(per_worker)
    # With a recipe and no --target-rate: the rate `cratemae bench` recorded for its model.
    record_rate(model_key("crate_mae_tiny", 16), 2.0)
    run = cli(*args[:1], DEMO_RECIPE, *args[1:])
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["target_rate"] == 2.0 and result["workers_needed"] == 1


@pytest.mark.parametrize("rate", ["0", "nan", "-1", "inf", "1e-320", "1e308"])
def test_bench_data_refuses_a_target_rate_that_is_no_rate(rate):
    run = cli("bench-data", "--target-rate", rate)
    assert run.exit_code == 2, run.output
    assert f"--target-rate {float(rate):g}: must be from 0.001 to 1e+09" in run.output


def test_recorded_figures_in_a_fifo_or_a_folder_are_none_and_never_block(
        tmp_path, monkeypatch) -> None:
    """The records file is a cache: a FIFO in its place is never opened (it would block the
    dry run), a folder or junk there means no figures, and recording replaces neither."""
    import os

    from cratemae.bench.data import RECORDS_NAME, record_rate, recorded_rate

    monkeypatch.setenv("CRATEMAE_CACHE", str(tmp_path))
    os.mkfifo(tmp_path / RECORDS_NAME)
    assert recorded_rate("k") is None
    assert not record_rate("k", 5.0) and (tmp_path / RECORDS_NAME).is_fifo()
    (tmp_path / RECORDS_NAME).unlink()
    (tmp_path / RECORDS_NAME).mkdir()
    assert recorded_rate("k") is None
    (tmp_path / RECORDS_NAME).rmdir()
    for junk in ("[1, 2]", "{not json", '{"k": {"images_per_s": NaN}}',
                 '{"k": {"images_per_s": true}}', '{"k": {"images_per_s": -3}}',
                 '{"k": {"images_per_s": Infinity}}', '{"k": {"images_per_s": 1e-320}}',
                 '{"k": {"images_per_s": 1%s}}' % ("0" * 400)):
        (tmp_path / RECORDS_NAME).write_text(junk)
        assert recorded_rate("k") is None, junk
    assert record_rate("k", 5.0) and recorded_rate("k") == 5.0
