"""Image decoding converts every valid mode; preprocessing gives the declared shape and values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgec.data.folder import load_pixels, read_folder
from edgec.data.preprocess import Preprocess, load_image, to_rgb
from edgec.errors import InputError


def test_grayscale_becomes_equal_channels():
    img = to_rgb(Image.fromarray(np.full((4, 4), 77, np.uint8), "L"))
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [77, 77, 77]


def test_sixteen_bit_is_rescaled_from_full_range(tmp_path):
    arr = np.array([[0, 65535], [32896, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)  # Pillow writes a 16-bit grayscale PNG
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0, 0] == 128


def test_rgba_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [255, 0, 0, 255]  # opaque red
    rgba[0, 1] = [0, 0, 0, 0]  # fully transparent
    rgba[1, 0] = [0, 0, 255, 128]  # half blue
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [127, 127, 255]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (3, 3), 0)
    img.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    img.info["transparency"] = 1
    img.putpixel((1, 1), 1)
    path = tmp_path / "pal.png"
    img.save(path, transparency=1)
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [0, 255, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_cmyk_and_bilevel(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # red
    path = tmp_path / "c.jpg"
    cmyk.save(path, quality=100)
    r, g, b = np.asarray(load_image(path))[0, 0].tolist()
    assert r > 200 and g < 60 and b < 60
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_undecodable_and_missing_files_are_input_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="cannot decode image"):
        load_image(bad)
    with pytest.raises(InputError, match="image not found"):
        load_image(tmp_path / "gone.png")


def test_center_crop_and_normalise_shapes_and_values():
    pre = Preprocess(size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop="center")
    img = Image.new("RGB", (32, 16), (255, 0, 0))
    x = pre(img)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], 1.0)
    np.testing.assert_allclose(x[1], -1.0)
    nhwc = Preprocess(size=(4, 6), layout="NHWC", crop="none")(img)
    assert nhwc.shape == (4, 6, 3)


def test_center_crop_keeps_the_middle():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # white middle third
    out = Preprocess(size=(10, 10), resize="nearest").resize_image(Image.fromarray(arr))
    assert np.asarray(out).min() == 255


def test_preprocess_json_round_trip():
    pre = Preprocess(size=(64, 48), resize="bilinear", crop="none", layout="NHWC")
    assert Preprocess.from_json(json.loads(json.dumps(pre.to_json()))) == pre
    with pytest.raises(ValueError, match="resize"):
        Preprocess(resize="cubic")


def _img(path, colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_folder_with_class_subfolders(tmp_path):
    _img(tmp_path / "red_circle" / "a.png")
    _img(tmp_path / "blue_square" / "b.png")
    _img(tmp_path / "blue_square" / "c.jpg")
    (tmp_path / "blue_square" / "notes.txt").write_text("ignored")
    folder = read_folder(tmp_path)
    assert folder.labels == ["blue square", "red circle"]
    assert [it.label for it in folder.items] == ["blue square", "blue square", "red circle"]
    assert folder.label_ids().tolist() == [0, 0, 1] and not folder.has_captions


def test_folder_with_captions_file(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png")
    rows = [{"image": "imgs/a.png", "caption": "a thing", "label": "x"},
            {"image": "imgs/b.png", "captions": ["one", "two"]}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    folder = read_folder(tmp_path)
    assert [it.captions for it in folder.items] == [("a thing",), ("one", "two")]
    assert folder.labels == ["x"] and folder.label_ids().tolist() == [0, -1]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"image": "../outside.png"}', "outside the folder"),
        ('{"image": "/etc/passwd"}', "outside the folder"),
        ("{not json", "not valid JSON"),
        ('{"caption": "no image"}', "'image' path"),
        ('{"image": "a.png", "captions": [1]}', "list of strings"),
    ],
)
def test_bad_captions_lines(tmp_path, line, needle):
    (tmp_path / "captions.jsonl").write_text(line + "\n")
    with pytest.raises(InputError, match=needle) as info:
        read_folder(tmp_path)
    assert "captions.jsonl:1" in str(info.value)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(InputError, match="no images"):
        read_folder(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_folder(tmp_path / "missing")


def test_undecodable_images_are_skipped_and_counted_up_to_a_threshold(tmp_path):
    for i in range(9):
        _img(tmp_path / f"{i}.png")
    (tmp_path / "9.png").write_bytes(b"garbage")
    folder = read_folder(tmp_path)
    pre = Preprocess(size=(4, 4))
    loaded = load_pixels(folder, pre, max_bad_fraction=0.2)
    assert loaded.pixels.shape == (9, 3, 4, 4) and len(loaded.bad) == 1 and 9 not in loaded.kept
    with pytest.raises(InputError, match="1 of 10 images"):
        load_pixels(folder, pre, max_bad_fraction=0.05)
