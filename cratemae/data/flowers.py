"""Oxford Flowers-102 as downloaded from robots.ox.ac.uk (and by torchvision's `Flowers102`):
`jpg/image_00001.jpg` ..., `imagelabels.mat` (its `labels`: the class, 1..102, of image i
at [i - 1]) and `setid.mat` (`trnid`, `valid`, `tstid`: the 1-based image numbers of the
train, val and test splits). Label = class - 1, as torchvision gives it; the class names
are torchvision's list. The paper's fine-tuning trains on train + val. The real splits are
disjoint and every jpg is labelled: an image in two splits (or twice in one), or a jpg past
the labels (a label lost, the rest shifted), is bad input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cratemae.data.records import Item, Records, load_image_file
from cratemae.errors import BadInputError
from cratemae.guard import regular_file

__all__ = ["CLASSES", "flowers_records", "is_flowers_root"]

CLASSES = 102
_SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}
_FILES = ("imagelabels.mat", "setid.mat")
# The 102 class names in label order, as torchvision's `Flowers102.classes` gives them.
_NAMES = (  # noqa: SIM905 - a paragraph reads better than 102 lines
    "pink primrose, hard-leaved pocket orchid, canterbury bells, sweet pea, english marigold, "
    "tiger lily, moon orchid, bird of paradise, monkshood, globe thistle, snapdragon, colt's "
    "foot, king protea, spear thistle, yellow iris, globe-flower, purple coneflower, peruvian "
    "lily, balloon flower, giant white arum lily, fire lily, pincushion flower, fritillary, "
    "red ginger, grape hyacinth, corn poppy, prince of wales feathers, stemless gentian, "
    "artichoke, sweet william, carnation, garden phlox, love in the mist, mexican aster, "
    "alpine sea holly, ruby-lipped cattleya, cape flower, great masterwort, siam tulip, "
    "lenten rose, barbeton daisy, daffodil, sword lily, poinsettia, bolero deep blue, "
    "wallflower, marigold, buttercup, oxeye daisy, common dandelion, petunia, wild pansy, "
    "primula, sunflower, pelargonium, bishop of llandaff, gaura, geranium, orange dahlia, "
    "pink-yellow dahlia?, cautleya spicata, japanese anemone, black-eyed susan, silverbush, "
    "californian poppy, osteospermum, spring crocus, bearded iris, windflower, tree poppy, "
    "gazania, azalea, water lily, rose, thorn apple, morning glory, passion flower, lotus, "
    "toad lily, anthurium, frangipani, clematis, hibiscus, columbine, desert-rose, tree "
    "mallow, magnolia, cyclamen, watercress, canna lily, hippeastrum, bee balm, ball moss, "
    "foxglove, bougainvillea, camellia, mallow, mexican petunia, bromelia, blanket flower, "
    "trumpet creeper, blackberry lily"
).split(", ")


def _folder(root: Path) -> Path | None:
    """`root`, or its `flowers-102/` (torchvision's folder), when it holds the download
    (`jpg/` and one of the .mat files at least: the other missing is said, not taken for
    a class folder)."""
    for folder in (root, root / "flowers-102"):
        if (folder / "jpg").is_dir() and any(os.path.lexists(folder / f) for f in _FILES):
            return folder
    return None


def is_flowers_root(root: Path) -> bool:
    return _folder(root) is not None


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        import scipy.io
    except ImportError:
        raise BadInputError(f"{path}: reading it needs scipy: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(str(regular_file(path)))
        out = {k: np.asarray(mat[k]).ravel() for k in keys}
    except Exception as err:  # scipy raises many kinds for a file that is not a .mat
        raise BadInputError(f"{path}: not Flowers-102's {path.name}, with {', '.join(keys)} "
                            f"({type(err).__name__}: {err})".replace("\n", " ")) from None
    for k, v in out.items():
        if v.size == 0 or v.dtype.kind not in "iuf" or not np.all(v == np.round(v)):
            raise BadInputError(f"{path}: its {k} is not a list of whole numbers")
    return {k: v.astype(np.int64) for k, v in out.items()}


def flowers_records(root: Path) -> Records:
    """The train, val and test splits as `setid.mat` gives them, labelled by
    `imagelabels.mat`; an image listed but missing or corrupt is a skipped sample."""
    folder = _folder(root)
    if folder is None:
        raise BadInputError(f"{root}: --layout flowers102: holds no jpg/, imagelabels.mat and "
                            "setid.mat (nor a flowers-102/ folder with them)")
    absent = [f for f in _FILES if not regular_file(folder / f).is_file()]
    if absent:
        raise BadInputError(f"{folder}: Flowers-102 without its {', '.join(absent)}")
    labels = _load_mat(folder / "imagelabels.mat", ("labels",))["labels"]
    bad = np.flatnonzero((labels < 1) | (labels > CLASSES))
    if bad.size:
        raise BadInputError(f"{folder / 'imagelabels.mat'}: image {int(bad[0]) + 1} has class "
                            f"{int(labels[bad[0]])}, outside 1..{CLASSES}")
    beyond = [f.name for f in (folder / "jpg").glob("image_*.jpg")
              if f.stem[6:].isdigit() and int(f.stem[6:]) > labels.size]
    if beyond:  # a shorter label list: which image lost its label, shifting the rest?
        raise BadInputError(f"{folder / 'imagelabels.mat'}: labels {labels.size} images, but "
                            f"jpg/ holds {min(beyond)}")
    ids = _load_mat(folder / "setid.mat", tuple(_SPLITS.values()))
    owner: dict[int, str] = {}
    for key in _SPLITS.values():
        for i in (int(i) for i in ids[key]):
            if i in owner:  # the real splits are disjoint: a repeat is a duplicate or a leak
                raise BadInputError(f"{folder / 'setid.mat'}: image {i} is in {owner[i]}"
                                    f"{' twice' if owner[i] == key else f' and in {key}'}")
            owner[i] = key
    splits = {}
    for split, key in _SPLITS.items():
        past = ids[key][(ids[key] < 1) | (ids[key] > labels.size)]
        if past.size:
            raise BadInputError(f"{folder / 'setid.mat'}: its {key} lists image {int(past[0])}, "
                                f"past the {labels.size} images of imagelabels.mat")
        splits[split] = [Item(f"image_{i:05d}", int(labels[i - 1]) - 1,
                              _loader(folder / "jpg" / f"image_{i:05d}.jpg"),
                              str(folder / "jpg" / f"image_{i:05d}.jpg"))
                         for i in (int(i) for i in ids[key])]
    return Records("Oxford Flowers-102", splits, tuple(_NAMES))


def _loader(path: Path) -> Callable[[], tuple[str, bytes]]:
    return lambda: load_image_file(str(path))
