"""One way to read an image file for inference (`cratemae.data.decode.read_image_file`):
`reconstruct` and `analyze` see the same pixels for the same file, whatever its mode and
orientation, and an image too large to decode is refused, in one line, before decoding."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import cli

from cratemae.checkpoints import write_model_weights
from cratemae.data import eval_transform, transforms
from cratemae.data.decode import MAX_PIXELS, read_image_file
from cratemae.errors import BadInputError
from cratemae.model import CrateMAE, CrateMAEConfig

EXIF_ORIENTATION = 0x0112
SIZE = 32


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` 8-bit grey pixels, with a few bytes of
    data: tiny on disk, huge once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 16-bit greyscale PNG (a ramp over the whole range), an RGBA PNG (left half fully
    transparent) and a JPEG stored sideways with EXIF orientation 6."""
    d = tmp_path_factory.mktemp("images")
    ramp = np.linspace(0, 65535, 48 * 40).reshape(40, 48).astype(np.uint16)
    Image.fromarray(ramp).save(d / "grey16.png")
    rgba = np.zeros((40, 48, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 30, 90, 160
    rgba[:, 24:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    sideways = np.zeros((40, 64, 3), dtype=np.uint8)
    sideways[:20, :32] = (250, 0, 0)  # the stored image's top-left quarter is red
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(sideways).save(d / "rotated.jpg", exif=exif, quality=95)
    return {"grey16": d / "grey16.png", "rgba": d / "rgba.png", "exif": d / "rotated.jpg"}


@pytest.mark.parametrize("kind", ["grey16", "rgba", "exif"])
def test_reconstruct_and_analyze_see_the_same_pixels(files, monkeypatch, kind) -> None:
    """Each command then fits the picture to the model its own way (reconstruct: the whole
    short side; analyze: the evaluation crop): with one common resize put in place of both,
    what is left, the reading, must give identical tensors."""
    def resize(img: Image.Image, size: int) -> Image.Image:
        return img.resize((size, size), Image.Resampling.NEAREST)

    monkeypatch.setattr(transforms, "fit_image", lambda img, size, fit: torch.from_numpy(
        np.asarray(resize(img, size))).permute(2, 0, 1))
    by_reconstruct = transforms.image_to_tensor(files[kind], SIZE, fit=transforms.FIT_SHORT_SIDE)
    by_analyze = transforms.image_to_tensor(files[kind], SIZE, (0.0,) * 3, (1.0,) * 3)[None]
    assert by_reconstruct.shape == (3, SIZE, SIZE)
    assert torch.equal(by_reconstruct, by_analyze[0])


@pytest.mark.parametrize("kind", ["grey16", "rgba", "exif"])
def test_both_commands_read_through_read_image_file(files, kind) -> None:
    rgb = read_image_file(files[kind])
    assert torch.equal(transforms.image_to_tensor(files[kind], SIZE, fit=transforms.FIT_SHORT_SIDE),
                       transforms.fit_image(rgb, SIZE, transforms.FIT_SHORT_SIDE).float() / 255)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    batch = transforms.image_to_tensor(files[kind], SIZE, mean, std)[None]
    assert torch.equal(batch[0], eval_transform(SIZE, mean, std)(rgb, np.random.default_rng()))


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped(files) -> None:
    img = read_image_file(files["grey16"])
    pixels = np.asarray(img)
    assert img.mode == "RGB" and pixels.shape == (40, 48, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    ramp = np.linspace(0, 65535, 48 * 40).reshape(40, 48).astype(np.uint16)
    assert np.array_equal(pixels[..., 0], np.round(ramp / 65535 * 255).astype(np.uint8))


def test_transparent_pixels_are_shown_over_white(files) -> None:
    pixels = np.asarray(read_image_file(files["rgba"]))
    assert np.all(pixels[:, :24] == 255)
    assert np.all(pixels[:, 24:] == (30, 90, 160))


def test_the_exif_orientation_is_applied(files) -> None:
    img = read_image_file(files["exif"])
    assert img.size == (40, 64)  # turned: 40 wide, 64 high
    pixels = np.asarray(img, dtype=np.int16)
    # Turned clockwise, the stored top-left quarter ends at the top right.
    assert pixels[5:27, 25:35, 0].min() > 200 and pixels[5:27, 25:35, 1:].max() < 50
    assert pixels[5:27, 5:15].max() < 50


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch) -> None:
    bomb = png_header(tmp_path / "bomb.png", 30_000, 30_000)  # 900 Mpx, 100 bytes
    for read in (read_image_file,
                 lambda p: transforms.image_to_tensor(p, SIZE, fit=transforms.FIT_SHORT_SIDE),
                 lambda p: transforms.image_to_tensor(p, SIZE, (0,) * 3, (1,) * 3)):
        with pytest.raises(BadInputError) as err:
            read(bomb)
        text = str(err.value)
        assert text.startswith(f"{bomb}: cannot read image: image too large") and "\n" not in text
    # The header's size is checked before anything is decoded, PIL's limit or not.
    small = png_header(tmp_path / "small.png", 20, 10)
    with pytest.raises(BadInputError, match=r"image size 20x10 outside 1\.\.100 pixels"):
        read_image_file(small, max_pixels=100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(BadInputError, match=rf"image size 30000x30000 outside 1\.\.{MAX_PIXELS} "):
        read_image_file(bomb)


def test_a_missing_or_broken_file_is_one_line_naming_it(tmp_path) -> None:
    with pytest.raises(BadInputError, match=r"missing\.png: image not found"):
        read_image_file(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadInputError) as err:
        read_image_file(broken)
    assert str(err.value).startswith(f"{broken}: cannot read image: ")
    truncated = png_header(tmp_path / "truncated.png", 20, 10)  # header fine, data short
    with pytest.raises(BadInputError) as err:
        read_image_file(truncated)
    assert str(err.value).startswith(f"{truncated}: cannot read image: ")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CrateMAE(CrateMAEConfig(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                    num_heads=4, decoder_embed_dim=64, decoder_depth=1,
                                    decoder_num_heads=4))
    file = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return write_model_weights(file, model.state_dict(), model.config.to_dict())


@pytest.mark.parametrize("command", ["reconstruct", "analyze"])
def test_both_commands_refuse_an_over_limit_image_in_one_line(checkpoint, tmp_path,
                                                              command) -> None:
    bomb = png_header(tmp_path / "bomb.png", 30_000, 30_000)
    args = (["reconstruct", str(bomb), "--out", str(tmp_path / "r.png")]
            if command == "reconstruct"
            else ["analyze", str(bomb), "--out", str(tmp_path / "analysis")])
    run = cli(*args, "--checkpoint", checkpoint)
    assert run.exit_code == 2, run.output
    about = [line for line in run.stderr.splitlines() if str(bomb) in line]
    assert about == [f"error: {bomb}: cannot read image: image too large (decompression bomb)"]
