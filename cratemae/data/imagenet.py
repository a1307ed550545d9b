"""ImageNet (ILSVRC-2012) as it is downloaded, turned into labelled file lists for the writer.

Two layouts besides plain class folders (which `list_images` reads):
- image-net.org's: `train/` with one folder per synset, a flat `val/` of
  `ILSVRC2012_val_NNNNNNNN.JPEG`, and the devkit: `ILSVRC2012_validation_ground_truth.txt`
  (line i: the ILSVRC2012_ID of val image i) and `meta.mat` (its `synsets` struct:
  ILSVRC2012_ID, WNID, words, num_children; the 1000 rows with num_children == 0 are the
  classes), each at the devkit folder's top or in its `data/`;
- Kaggle's: ROOT/`ILSVRC/Data/CLS-LOC/{train,val}`, ROOT/`LOC_val_solution.csv`
  (ImageId,PredictionString; the first token of PredictionString is the synset) and
  ROOT/`LOC_synset_mapping.txt` ("n01440764 tench, Tinca tinca").

Label i is the i-th synset id in sorted order, as class folders give it and as torchvision's
`ImageNet` and timm number them, so shards of either layout and of a `train/` folder agree.
Anything that does not fit (a devkit for another folder, val classes that train lacks) is
bad input, found before a byte is written.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cratemae.data.folders import INDEX_NAME, list_images, read_index
from cratemae.errors import BadInputError
from cratemae.guard import regular_file

__all__ = [
    "Devkit",
    "Labelled",
    "devkit_dataset",
    "devkit_val",
    "is_kaggle_root",
    "kaggle_dataset",
    "read_devkit",
    "reference_classes",
    "relabel",
    "unlabelled_val_reason",
]

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
KAGGLE_SPLITS = Path("ILSVRC", "Data", "CLS-LOC")
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_MAPPING = "LOC_synset_mapping.txt"
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
_SHOWN = 3  # names quoted in a message
ILSVRC_CLASSES = 1000  # the leaf synsets of meta.mat


@dataclass(frozen=True)
class Labelled:
    """Labelled files, split by split, ready to shard: split -> [(path, label)], each split's
    files lying under `roots[split]` (their keys are paths relative to it)."""

    splits: dict[str, list[tuple[str, int]]]
    roots: dict[str, Path]
    classes: tuple[str, ...]  # label i is classes[i] (synset ids)
    class_names: tuple[str, ...] | None = None  # human-readable, same order


@dataclass(frozen=True)
class Devkit:
    """What the ILSVRC-2012 devkit says about the val images."""

    wnids: dict[int, str]  # ILSVRC2012_ID -> WNID, the leaf synsets (the classes) only
    words: dict[str, str]  # WNID -> "tench, Tinca tinca"
    ground_truth: tuple[int, ...]  # [i - 1]: the ILSVRC2012_ID of ILSVRC2012_val_{i:08d}.JPEG

    @property
    def classes(self) -> tuple[str, ...]:
        """The synset ids in label order (sorted, as class folders give them)."""
        return tuple(sorted(self.wnids.values()))


def _devkit_file(devkit: Path, name: str) -> Path:
    for p in (devkit / name, devkit / "data" / name):
        if regular_file(p).is_file():  # a FIFO, socket or device: refused, never opened
            return p
    raise BadInputError(f"--devkit {devkit}: has no {name} (looked in it and in its data/)")


def read_devkit(devkit: Path) -> Devkit:
    """Parse the devkit folder (`ILSVRC2012_devkit_t12`, unpacked) as torchvision does:
    meta.mat's leaf synsets give ID -> WNID, the ground truth one ID per val image."""
    if not devkit.is_dir():
        raise BadInputError(f"--devkit {devkit}: not a directory (unpack the devkit archive)")
    gt_path, meta_path = _devkit_file(devkit, GROUND_TRUTH), _devkit_file(devkit, META_MAT)
    wnids, words = _read_meta_mat(meta_path)
    return Devkit(wnids, words, _read_ground_truth(gt_path, len(wnids)))


def _read_ground_truth(path: Path, classes: int) -> tuple[int, ...]:
    """One class id (1..classes) per line, line i for val image i; blank lines only at
    the end. Bad input names the line and the value."""
    try:  # undecodable bytes are a bad value of their line, not of the whole file
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise BadInputError(f"{path}: unreadable as a list of class ids "
                            f"({type(err).__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    truth = []
    for n, line in enumerate(lines, start=1):
        value = line.strip()
        if not (value.isascii() and value.isdigit() and 1 <= int(value) <= classes):
            raise BadInputError(f'{path}: line {n}: "{value[:20]}" is not a class id '
                                f"1..{classes}")
        truth.append(int(value))
    if not truth:
        raise BadInputError(f"{path}: empty")
    return tuple(truth)


def _read_meta_mat(path: Path) -> tuple[dict[int, str], dict[str, str]]:
    try:
        import scipy.io
    except ImportError:
        raise BadInputError(f"{path}: reading meta.mat needs scipy: pip install scipy") from None
    try:
        synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
        rows = [(int(r["ILSVRC2012_ID"]), str(r["WNID"]), str(r["words"]),
                 int(r["num_children"])) for r in synsets.ravel()]
    except Exception as err:  # scipy raises many kinds for a file that is not a .mat
        raise BadInputError(f"{path}: not the devkit's meta.mat, with a synsets table "
                            f"({type(err).__name__}: {err})".replace("\n", " ")) from None
    leaves = [r for r in rows if r[3] == 0]
    _check_leaves(path, [i for i, *_ in leaves], [w for _, w, *_ in leaves])
    return {i: w for i, w, _, _ in leaves}, {w: words for _, w, words, _ in leaves}


def _check_leaves(path: Path, ids: list[int], wnids: list[str]) -> None:
    """ILSVRC-2012's classes are exactly its 1000 leaf synsets, ids 1..1000, each once: any
    other table would number the val labels wrongly (one id twice shifts every label)."""
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    twice_w = sorted(w for w, n in Counter(wnids).items() if n > 1)
    absent = sorted(set(range(1, ILSVRC_CLASSES + 1)) - set(ids))
    beyond = sorted(i for i in set(ids) if not 1 <= i <= ILSVRC_CLASSES)
    problems = [f"{what} {', '.join(map(str, found[:_SHOWN]))}" for what, found in (
        ("ids listed twice:", twice), ("WNIDs listed twice:", twice_w),
        ("ids missing:", absent), ("ids beyond 1..1000:", beyond)) if found]
    if problems or len(ids) != ILSVRC_CLASSES:
        raise BadInputError(f"{path}: its synsets table has {len(ids)} leaf synsets (classes), "
                            f"not ILSVRC-2012's {ILSVRC_CLASSES} with ids 1..{ILSVRC_CLASSES}"
                            + (f" ({'; '.join(problems)})" if problems else ""))


def reference_classes(ref: Path) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(class ids, readable names or None) of the train data to label against: a folder
    written by `cratemae shard` (its shards.json) or an image folder with class folders."""
    if (ref / INDEX_NAME).is_file():
        index = read_index(ref)
        classes, names = index.get("classes"), index.get("class_names")
        if not classes:
            raise BadInputError(f"--classes-from {ref}: its {INDEX_NAME} names no classes")
        return tuple(classes), tuple(names) if names else None
    if not ref.is_dir():
        raise BadInputError(f"--classes-from {ref}: not a directory")
    # As list_images labels class folders, without listing every image: sorted folders
    # holding at least one visible file.
    classes = tuple(sorted(d.name for d in ref.iterdir() if d.is_dir()
                           and not d.name.startswith(".") and _has_files(d)))
    if not classes:
        raise BadInputError(f"--classes-from {ref}: has no class folders and no {INDEX_NAME}")
    return classes, None


def _has_files(d: Path) -> bool:
    return any(not f.startswith(".") for _, _, files in os.walk(d) for f in files)


def relabel(files: list[tuple[str, int]], own: Sequence[str], classes: Sequence[str],
            what: str) -> list[tuple[str, int]]:
    """Labels numbered by `own` class names renumbered by `classes`; bad input naming
    `what` if some of `own` are not in `classes` (a val set with classes train lacks)."""
    where = {c: i for i, c in enumerate(classes)}
    missing = [c for c in own if c not in where]
    if missing:
        raise BadInputError(
            f"{what}: {len(missing)} of its classes are not among the {len(classes)} of the "
            f"train data ({', '.join(missing[:_SHOWN])}{', ...' if len(missing) > _SHOWN else ''})")
    new = [where[c] for c in own]
    return [(f, new[y]) for f, y in files]


def _names(classes: Sequence[str], words: dict[str, str]) -> tuple[str, ...] | None:
    """Readable names in `classes` order (an id the metadata lacks stands for itself)."""
    return tuple(words.get(c, c) for c in classes) if words else None


def devkit_val(val_dir: Path, devkit: Devkit) -> list[tuple[str, str]]:
    """(path, WNID) for each image of a flat val folder, checked against the devkit: every
    ILSVRC2012_val_NNNNNNNN.JPEG from 1 to the ground truth's length, nothing else."""
    if not val_dir.is_dir():
        raise BadInputError(f"{val_dir}: not a directory")
    found: dict[int, str] = {}
    for p in sorted(val_dir.iterdir()):
        if p.name.startswith("."):
            continue
        m = _VAL_NAME.match(p.name)
        if p.is_dir() or m is None:
            raise BadInputError(
                f"{p}: not an ILSVRC2012_val_NNNNNNNN.JPEG file; --devkit labels the flat val "
                "folder of image-net.org (a val folder with class sub-folders needs no devkit)")
        found[int(m.group(1))] = str(p)
    n = len(devkit.ground_truth)
    if len(found) != n or not all(1 <= i <= n for i in found):
        absent = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, n + 1) if i not in found]
        extra = [Path(found[i]).name for i in sorted(found) if not 1 <= i <= n]
        raise BadInputError(
            f"--devkit: its ground truth labels {n} val images but {val_dir} holds "
            f"{len(found)}" + (f"; missing: {', '.join(absent[:_SHOWN])}" if absent else "")
            + (f"; not in the ground truth: {', '.join(extra[:_SHOWN])}" if extra else ""))
    return [(found[i], devkit.wnids[devkit.ground_truth[i - 1]]) for i in sorted(found)]


def devkit_dataset(src: Path, devkit_dir: Path, reference: Path | None = None,
                   split: str = "train") -> Labelled:
    """image-net.org's layout: `src` is the flat val folder, a folder of synset folders
    (the `train/` folder, written as `split`), or a folder holding `train/` and `val/`. The
    classes are train's (given, or `reference`'s, or else the devkit's 1000 synsets), in
    sorted order; the val labels follow them; the devkit gives their readable names."""
    devkit = read_devkit(devkit_dir)
    if (src / "train").is_dir() and (src / "val").is_dir():
        train, classes = _synset_folders(src / "train", devkit, devkit_dir)
        val_dir = src / "val"
        splits, roots = {"train": train}, {"train": src / "train"}
        names = _names(classes, devkit.words)
    else:
        classes, names = (reference_classes(reference) if reference is not None
                          else (devkit.classes, None))
        names = names or _names(classes, devkit.words)
        if any(p.is_dir() and not p.name.startswith(".") for p in src.iterdir()):
            files, own = _synset_folders(src, devkit, devkit_dir)  # train/ alone
            if split == "train" and reference is None:
                return Labelled({"train": files}, {"train": src}, own, _names(own, devkit.words))
            files = relabel(files, own, classes, str(src))
            return Labelled({split: files}, {split: src}, tuple(classes), names)
        splits, roots, val_dir = {}, {}, src
    val = devkit_val(val_dir, devkit)
    wnids = sorted({w for _, w in val})
    own_ids = {w: i for i, w in enumerate(wnids)}
    splits["val"] = relabel([(f, own_ids[w]) for f, w in val], wnids, classes,
                            f"{val_dir} (labelled by {devkit_dir})")
    roots["val"] = val_dir
    return Labelled(splits, roots, tuple(classes), names)


def _synset_folders(folder: Path, devkit: Devkit,
                    devkit_dir: Path) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """The images of a folder of synset folders, labelled; its folders must be synsets of
    the devkit (else it is another data set, or the wrong devkit)."""
    files, classes = list_images(folder)
    if not classes:
        raise BadInputError(f"{folder}: has no class (synset) folders")
    known = set(devkit.words)
    foreign = [c for c in classes if c not in known]
    if foreign:
        raise BadInputError(f"{folder}: {len(foreign)} of its {len(classes)} class folders are "
                            f"no synset of --devkit {devkit_dir} "
                            f"({', '.join(foreign[:_SHOWN])})")
    return files, classes


def unlabelled_val_reason(folder: Path) -> str | None:
    """Why a flat folder of image-net.org's val images has no labels when read in place (its
    labels are in the devkit), or None when it is no such folder."""
    first = next((p for p in sorted(folder.iterdir()) if not p.name.startswith(".")), None)
    if first is None or not _VAL_NAME.match(first.name):
        return None
    return (f"{folder} is image-net.org's flat val folder, whose labels are in the ILSVRC2012 "
            "devkit, which a folder read in place cannot use: shard it with "
            "`cratemae shard ROOT OUT --devkit DEVKIT` and read OUT")


def is_kaggle_root(root: Path) -> bool:
    """Whether `root` has the folders of Kaggle's ImageNet download (ILSVRC/Data/CLS-LOC):
    then it is read as that layout, whose files must all be there, never as image folders."""
    return (root / KAGGLE_SPLITS).is_dir()


def _kaggle_file(root: Path, name: str) -> Path:
    path = regular_file(root / name)  # a FIFO, socket or device: refused, never opened
    if not path.is_file():
        raise BadInputError(
            f"{path}: not found, though {root} has Kaggle's ImageNet folders "
            f"({KAGGLE_SPLITS}); the download's {name} must be at its top (or give its "
            f"{KAGGLE_SPLITS}/train folder alone)")
    return path


def _kaggle_words(path: Path) -> dict[str, str]:
    """WNID -> readable name, from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca")."""
    words: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: unreadable ({type(err).__name__})") from None
    for n, line in enumerate(lines, start=1):
        wnid, _, name = line.strip().partition(" ")
        if wnid in words:
            raise BadInputError(f"{path}: line {n}: {wnid} is listed a second time")
        if wnid:
            words[wnid] = name.strip() or wnid
    if not words:
        raise BadInputError(f"{path}: empty")
    return words


def _kaggle_val(path: Path) -> dict[str, str]:
    """ImageId -> synset, from LOC_val_solution.csv (its boxes' first token is the synset)."""
    out: dict[str, tuple[int, str]] = {}  # ImageId -> (row, synset)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM, CRLF: as Excel saves
            reader = csv.DictReader(f)
            if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
                raise ValueError(f"its header is {','.join(reader.fieldnames or ())!r}")
            for row in reader:
                n = reader.line_num
                tokens = (row.get("PredictionString") or "").split()
                image = (row.get("ImageId") or "").strip()
                if not image or not tokens:
                    raise ValueError(f"line {n} has no ImageId or PredictionString")
                if image in out and out[image][1] != tokens[0]:
                    raise BadInputError(
                        f"{path}: {image} is listed twice with different synsets, on line "
                        f"{out[image][0]} ({out[image][1]}) and on line {n} ({tokens[0]})")
                out.setdefault(image, (n, tokens[0]))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as err:
        raise BadInputError(f"{path}: not Kaggle's ImageId,PredictionString table "
                            f"({type(err).__name__}: {err})") from None
    if not out:
        raise BadInputError(f"{path}: has no rows")
    return {image: wnid for image, (_, wnid) in out.items()}


def kaggle_dataset(root: Path) -> Labelled:
    """Kaggle's layout: train from its synset folders, val labelled by LOC_val_solution.csv,
    readable names from LOC_synset_mapping.txt (both must be there)."""
    train_dir, val_dir = root / KAGGLE_SPLITS / "train", root / KAGGLE_SPLITS / "val"
    truth = _kaggle_val(_kaggle_file(root, KAGGLE_VAL_CSV))
    words = _kaggle_words(_kaggle_file(root, KAGGLE_MAPPING))
    if not train_dir.is_dir():
        raise BadInputError(f"{train_dir}: not found, though {root} has Kaggle's folders")
    train, classes = list_images(train_dir)
    if not classes:
        raise BadInputError(f"{train_dir}: has no class (synset) folders")
    splits, roots = {"train": train}, {"train": train_dir}
    if val_dir.is_dir():
        files, _ = list_images(val_dir)
        unlabelled = [f for f, _ in files if Path(f).stem not in truth]
        if unlabelled or len(files) != len(truth):
            raise BadInputError(
                f"{root / KAGGLE_VAL_CSV}: labels {len(truth)} images but {val_dir} holds "
                f"{len(files)}" + (f"; no label for {', '.join(unlabelled[:_SHOWN])}"
                                   if unlabelled else ""))
        wnids = sorted({truth[Path(f).stem] for f, _ in files})
        own = {w: i for i, w in enumerate(wnids)}
        splits["val"] = relabel([(f, own[truth[Path(f).stem]]) for f, _ in files], wnids,
                                classes, f"{val_dir} (labelled by {KAGGLE_VAL_CSV})")
        roots["val"] = val_dir
    return Labelled(splits, roots, classes, _names(classes, words))
