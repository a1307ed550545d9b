"""CIFAR-10/100 as downloaded, binary and Python versions: miniatures written byte for byte
as the originals (records of label byte(s) + 3,072 planar pixel bytes; protocol-2 pickles
holding NumPy arrays), sharded in-process, every sample's label and pixels checked. A
pickle carrying a callable is refused without running it. Also the helpers the other
`test_transfer_*` modules read shards with."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from cratemae.data.writer import write_shards
from cratemae.errors import BadInputError

# --- shared helpers --------------------------------------------------------------------------


def read_shards(out: Path) -> dict[str, dict[str, tuple[np.ndarray, int]]]:
    """{split: {key: (pixels (H, W, 3), label)}} of everything `cratemae shard` wrote."""
    index = json.loads((out / "shards.json").read_text())
    found: dict[str, dict[str, tuple[np.ndarray, int]]] = {}
    for split, shards in index["splits"].items():
        images, labels = {}, {}
        for entry in shards:
            with tarfile.open(out / entry["name"]) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    data = tf.extractfile(m).read()
                    if ext == "cls":
                        labels[key] = int(data)
                    else:
                        images[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert images.keys() == labels.keys()
        found[split] = {k: (images[k], labels[k]) for k in images}
    return found


def pixels(n: int, seed: int) -> np.ndarray:
    """n random 32x32 RGB images, (n, 32, 32, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def planar(images: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) -> CIFAR's rows: (n, 3072), all red values, then green, then blue."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


# --- miniatures ------------------------------------------------------------------------------

NAMES10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
FINE = tuple(f"fine{i}" for i in range(100))
COARSE = tuple(f"coarse{i}" for i in range(20))


def cifar10_batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """file stem -> (images, labels): five train batches of 3 and a test batch of 4."""
    out = {}
    for b, stem in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        n = 4 if stem == "test_batch" else 3
        out[stem] = pixels(n, b), np.array([(b * 3 + i) % 10 for i in range(n)])
    return out


def cifar100_batches() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """file stem -> (images, fine, coarse)."""
    return {"train": (pixels(6, 10), np.array([0, 99, 5, 37, 5, 64]),
                      np.array([19, 0, 3, 3, 7, 1])),
            "test": (pixels(3, 11), np.array([98, 1, 50]), np.array([2, 11, 19]))}


def write_cifar10_binary(root: Path, batches=None) -> Path:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for stem, (images, labels) in (batches or cifar10_batches()).items():
        rows = np.concatenate([labels[:, None].astype(np.uint8), planar(images)], axis=1)
        (folder / f"{stem}.bin").write_bytes(rows.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(NAMES10) + "\n\n")  # as shipped
    return folder


def write_cifar100_binary(root: Path) -> Path:
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    for stem, (images, fine, coarse) in cifar100_batches().items():
        rows = np.concatenate([coarse[:, None], fine[:, None], planar(images)], axis=1)
        (folder / f"{stem}.bin").write_bytes(rows.astype(np.uint8).tobytes())
    (folder / "fine_label_names.txt").write_text("\n".join(FINE) + "\n")
    (folder / "coarse_label_names.txt").write_text("\n".join(COARSE) + "\n")
    return folder


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2's str (BINSTRING), as the original CIFAR pickles hold them."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump(obj, path: Path, py2: bool = False) -> None:
    buf = io.BytesIO()
    (_Py2Pickler(buf, protocol=2) if py2 else pickle.Pickler(buf, protocol=2)).dump(obj)
    data = buf.getvalue()
    if py2:  # NumPy 1's module name, which the original files hold (a GLOBAL opcode's text)
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"numpy.core.multiarray" in data or b"numpy" not in data
    path.write_bytes(data)


def write_cifar10_python(root: Path, py2: bool = False) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for stem, (images, labels) in cifar10_batches().items():
        dump({"batch_label": f"{stem} of 5", "labels": [int(y) for y in labels],
              "data": planar(images), "filenames": [b"x_%d.png" % i for i in range(len(labels))]},
             folder / stem, py2)
    dump({"label_names": list(NAMES10), "num_cases_per_batch": 3, "num_vis": 3072},
         folder / "batches.meta", py2)
    return folder


def write_cifar100_python(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for stem, (images, fine, coarse) in cifar100_batches().items():
        dump({"filenames": [], "batch_label": stem, "fine_labels": [int(y) for y in fine],
              "coarse_labels": [int(y) for y in coarse], "data": planar(images)}, folder / stem)
    dump({"fine_label_names": list(FINE), "coarse_label_names": list(COARSE)}, folder / "meta")
    return folder


def expected10() -> dict[str, dict[str, tuple[np.ndarray, int]]]:
    want: dict[str, dict[str, tuple[np.ndarray, int]]] = {"train": {}, "test": {}}
    for stem, (images, labels) in cifar10_batches().items():
        split = "test" if stem == "test_batch" else "train"
        want[split].update({f"{stem}/{i:05d}": (images[i], int(labels[i]))
                            for i in range(len(labels))})
    return want


def expected100(kind: str = "fine") -> dict[str, dict[str, tuple[np.ndarray, int]]]:
    return {stem: {f"{stem}/{i:05d}": (images[i], int((fine if kind == "fine" else coarse)[i]))
                   for i in range(len(images))}
            for stem, (images, fine, coarse) in cifar100_batches().items()}


def assert_same(got, want) -> None:
    assert got.keys() == want.keys()
    for split in want:
        assert got[split].keys() == want[split].keys(), split
        for key, (img, label) in want[split].items():
            assert got[split][key][1] == label, (split, key)
            np.testing.assert_array_equal(got[split][key][0], img, err_msg=f"{split} {key}")


# --- sharding --------------------------------------------------------------------------------


@pytest.mark.parametrize("write", [write_cifar10_binary, write_cifar10_python,
                                   lambda r: write_cifar10_python(r, py2=True)],
                         ids=["binary", "python", "python2-strings"])
def test_cifar10_shards_hold_every_label_and_pixel(tmp_path: Path, write) -> None:
    write(tmp_path / "dl")
    summary = write_shards(tmp_path / "dl", tmp_path / "out", max_per_shard=7)
    assert summary.layout.startswith("CIFAR-10, ")
    assert_same(read_shards(tmp_path / "out"), expected10())
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["classes"] == list(NAMES10)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert summary.split_classes == {"train": 10, "test": 4}


@pytest.mark.parametrize("write", [write_cifar100_binary, write_cifar100_python],
                         ids=["binary", "python"])
@pytest.mark.parametrize("kind", ["fine", "coarse"])
def test_cifar100_fine_labels_by_default_coarse_when_asked(tmp_path: Path, write,
                                                           kind: str) -> None:
    from cratemae.data.layouts import DownloadOptions

    folder = write(tmp_path)  # the download's own folder, given directly
    write_shards(folder, tmp_path / "out",
                 options=DownloadOptions(cifar100_labels=None if kind == "fine" else kind))
    assert_same(read_shards(tmp_path / "out"), expected100(kind))
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["classes"] == list(FINE if kind == "fine" else COARSE)


# --- hostile input ---------------------------------------------------------------------------


def refused(src: Path, out: Path, match: str, **kw) -> None:
    with pytest.raises(BadInputError, match=match):
        write_shards(src, out, **kw)
    assert not out.exists()


def test_a_truncated_binary_batch_is_refused(tmp_path: Path) -> None:
    folder = write_cifar10_binary(tmp_path)
    data = (folder / "data_batch_3.bin").read_bytes()
    (folder / "data_batch_3.bin").write_bytes(data[:-100])
    refused(folder, tmp_path / "out", r"data_batch_3\.bin: 9119 bytes, not a whole number of "
            r"3073-byte records")


def test_a_label_byte_out_of_range_is_refused(tmp_path: Path) -> None:
    batches = cifar10_batches()
    batches["test_batch"][1][2] = 10
    folder = write_cifar10_binary(tmp_path, batches)
    refused(folder, tmp_path / "out", r"test_batch\.bin: record 2 has label 10, outside 0\.\.9")


def test_a_missing_train_batch_is_refused_not_skipped(tmp_path: Path) -> None:
    folder = write_cifar10_binary(tmp_path)
    (folder / "data_batch_5.bin").unlink()
    refused(folder, tmp_path / "out", r"without its data_batch_5\.bin")


class _Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_pickle_carrying_a_callable_is_refused_and_never_run(tmp_path: Path) -> None:
    from support import cli

    folder = write_cifar10_python(tmp_path / "dl")
    marker = tmp_path / "ran"
    batch = {"labels": [1, 2, 3], "data": _Payload(f"touch {marker}"), "filenames": []}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    res = cli("shard", tmp_path / "dl", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output
    assert "data_batch_2: its pickle names the global posix.system" in res.output.replace("\n", "")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_the_unpickler_admits_uint8_arrays_only(tmp_path: Path) -> None:
    from cratemae.data.unpickle import load_pickle

    dump({"data": np.zeros((2, 3), np.float64)}, tmp_path / "f")
    with pytest.raises(BadInputError, match="an array of 'f8', not of uint8"):
        load_pickle(tmp_path / "f", "a batch")
    dump({"x": {1, 2}}, tmp_path / "s")  # a set pickles as a call of __builtin__.set
    with pytest.raises(BadInputError, match=r"names the global __builtin__\.set"):
        load_pickle(tmp_path / "s", "a batch")
    dump({"data": np.arange(6, dtype=np.uint8)}, tmp_path / "ok")
    np.testing.assert_array_equal(load_pickle(tmp_path / "ok", "a batch")["data"], np.arange(6))


def test_a_folder_holding_two_cifar_downloads_asks_for_one(tmp_path: Path) -> None:
    write_cifar10_binary(tmp_path / "data")
    write_cifar10_python(tmp_path / "data")
    refused(tmp_path / "data", tmp_path / "out", r"holds several CIFAR downloads \(.*"
            r"cifar-10-batches-bin, .*cifar-10-batches-py\); give one of them")
    write_shards(tmp_path / "data" / "cifar-10-batches-py", tmp_path / "out")


@pytest.mark.parametrize(("text", "match"), [
    ("airplane\n\n" + "\n".join(NAMES10[2:]) + "\nextra\n\n", r"line 2 is blank, among the "
     "class names"),  # ten names, but shifted from the second on
    ("\n".join(NAMES10[:9]) + "\nairplane\n", r"names two classes 'airplane'"),
], ids=["blank-line", "a-name-twice"])
def test_class_names_blank_or_twice_are_refused(tmp_path: Path, text: str, match: str) -> None:
    folder = write_cifar10_binary(tmp_path)
    (folder / "batches.meta.txt").write_text(text)
    refused(folder, tmp_path / "out", match)


# A pickle is written opcode by opcode, as a hostile file would be.
def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _text(s: str) -> bytes:
    return pickle.BINUNICODE + len(s).to_bytes(4, "little") + s.encode()


def _int(n: int) -> bytes:
    return pickle.BININT + n.to_bytes(4, "little", signed=True)


_U1 = (_global("numpy", "dtype") + _text("u1") + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3
       + pickle.REDUCE)


def _array(dtype_state: tuple[int, int, int]) -> bytes:
    """A uint8 array of 8 bytes as NumPy pickles one, its dtype's state (elsize, alignment,
    flags) given: NumPy's own is (-1, -1, 0)."""
    dtype = (_U1 + pickle.MARK + _int(3) + _text("|") + pickle.NONE * 3
             + b"".join(_int(n) for n in dtype_state) + pickle.TUPLE + pickle.BUILD)
    return (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
            + _int(0) + pickle.TUPLE1 + _text("b") + pickle.TUPLE3 + pickle.REDUCE
            + pickle.MARK + _int(1) + _int(8) + pickle.TUPLE1 + dtype + pickle.NEWFALSE
            + pickle.SHORT_BINBYTES + b"\x08" + bytes(range(8)) + pickle.TUPLE + pickle.BUILD)


@pytest.mark.parametrize(("stream", "match"), [
    # uint8 flagged as holding objects: NumPy would read the bytes as pointers
    (_array((8, 1, 0x3F)), r"a uint8 dtype with the state \(3, '\|', None, None, None, 8, 1"),
    # a state BUILT into an admitted global (its defaults, its attributes)
    (_global("_codecs", "encode") + pickle.NONE + pickle.EMPTY_DICT + _text("__defaults__")
     + _int(1) + pickle.TUPLE1 + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD,
     "a state given to a global"),
    (pickle.MARK + _global("numpy", "ndarray") + pickle.OBJ,  # ndarray called by OBJ
     "numpy.ndarray called, not handed to _reconstruct"),
], ids=["dtype-with-object-flags", "state-built-into-a-global", "ndarray-called-by-OBJ"])
def test_the_unpickler_gives_numpy_no_state_it_did_not_check(tmp_path: Path, stream: bytes,
                                                             match: str) -> None:
    from cratemae.data.unpickle import load_pickle

    (tmp_path / "ok").write_bytes(b"\x80\x02" + _array((-1, -1, 0)) + b".")
    np.testing.assert_array_equal(load_pickle(tmp_path / "ok", "a batch"), np.arange(8))
    assert type(load_pickle(tmp_path / "ok", "a batch")) is np.ndarray
    (tmp_path / "f").write_bytes(b"\x80\x02" + stream + b".")
    with pytest.raises(BadInputError, match=match):
        load_pickle(tmp_path / "f", "a batch")


def test_a_batch_copied_over_another_is_refused(tmp_path: Path) -> None:
    folder = write_cifar10_binary(tmp_path)  # the test batch as a train batch: a leak
    (folder / "data_batch_5.bin").write_bytes((folder / "test_batch.bin").read_bytes())
    refused(folder, tmp_path / "out", r"test_batch\.bin: holds the images of data_batch_5\.bin")
