"""The README's "The paper's transfer sets, from the download", run as written on miniatures
of the downloads: its archive commands by bash, its `cratemae` commands in this process. Only
where the data go changes (`/data/NAME` under the test's folder, given to the recipes with
`--set`, as the README says to do for shards written elsewhere); `huggingface-cli download`,
which needs the network, is replaced by the files it would leave."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from support import REPO, cli
from test_transfer_cifar import NAMES10, write_cifar10_python, write_cifar100_python
from test_transfer_oxford import write_flowers, write_pets

from cratemae.recipe import load_recipe


def readme_block() -> list[str]:
    """The commands of the README's transfer section, one per line, comments removed."""
    text = (REPO / "README.md").read_text()
    section = text.split("### The paper's transfer sets, from the download", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines()
            if line.strip() and not line.startswith("#")]


def _tar(archive: Path, folder: Path, *, drop: bool = True) -> None:
    """`archive` holding `folder` under its name, as the download does; the folder is gone."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    if drop:
        shutil.rmtree(folder)


def _downloads(where: Path) -> None:
    """What a user has downloaded, in `where`, before the README's first command."""
    _tar(where / "cifar-10-python.tar.gz", write_cifar10_python(where))
    _tar(where / "cifar-100-python.tar.gz", write_cifar100_python(where))
    write_flowers(where / "f")
    _tar(where / "102flowers.tgz", where / "f" / "jpg")
    for mat in ("imagelabels.mat", "setid.mat"):
        (where / "f" / mat).rename(where / mat)
    write_pets(where / "p")
    for part in ("images", "annotations"):
        _tar(where / f"{part}.tar.gz", where / "p" / part)


@pytest.mark.slow  # five shards and five probes in this process: about 20 s
def test_the_readme_goes_from_each_download_to_a_probe_score(tmp_path: Path, demo_checkpoint,
                                                             monkeypatch) -> None:
    lines = readme_block()
    assert sum(line.startswith("cratemae probe") for line in lines) == 5
    monkeypatch.chdir(tmp_path)
    _downloads(tmp_path)
    shutil.copytree(demo_checkpoint.parent.parent, tmp_path / "runs" / "base")
    data = str(tmp_path / "data")
    scored = []
    for line in lines:
        if line.startswith("huggingface-cli download"):
            pytest.importorskip("pyarrow", reason="pyarrow (cratemae[parquet]) is absent")
            import test_transfer_parquet as hf

            monkeypatch.setattr(hf, "NAMES", NAMES10)  # CIFAR-10's, as the Hub's copy has
            hf.write_hf(tmp_path / line.split("--local-dir ")[1].split()[0])
            continue
        if not line.startswith("cratemae "):
            done = subprocess.run(["bash", "-euc", line], capture_output=True, text=True)
            assert done.returncode == 0, (line, done.stderr)
            continue
        args = shlex.split(line.replace("/data/", f"{data}/"))[1:]
        if args[0] == "probe":
            file = load_recipe(args[1])  # where the shipped recipe reads, moved likewise
            for split in ("train", "val"):
                value = getattr(file.data, split).replace("/data/", f"{data}/")
                args += ["--set", f"data.{split}={json.dumps(value)}"]
            args.append("--json")
        res = cli(*args)
        assert res.exit_code == 0, (line, res.output)
        if args[0] == "shard":
            assert re.search(r"train: \d+ samples in 1 shards", res.output), res.output
        else:
            result = json.loads(res.stdout)
            assert 0.0 <= result["top1"] <= 100.0 and result["val_images"] > 0
            scored.append((args[1], result["num_classes"], result["checkpoint"]))
    assert [(name, n) for name, n, _ in scored] == [
        ("probe/cifar10", 10), ("probe/cifar100", 100), ("probe/flowers102", 102),
        ("probe/pets", 37), ("probe/cifar10", 10)]
