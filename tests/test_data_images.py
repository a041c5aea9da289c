"""load_rgb: full decoding, orientation and mode normalisation, with negative controls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailoredgen_train.data.captions import normalize_json_caption, normalize_text_caption
from tailoredgen_train.data.images import ImageProblem, load_rgb


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Incompressible pixels so that cutting a file really removes image data."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _reason(path: Path, **kwargs: int) -> str:
    with pytest.raises(ImageProblem) as info:
        load_rgb(path, **kwargs)
    assert info.value.detail
    return info.value.reason


def test_plain_rgb_roundtrip(tmp_path: Path) -> None:
    _noise((32, 24)).save(tmp_path / "a.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (32, 24)
    assert np.array_equal(np.asarray(img), np.asarray(_noise((32, 24))))


def test_truncated_jpeg(tmp_path: Path) -> None:
    _noise((256, 256)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * 0.7)])
    assert _reason(tmp_path / "cut.jpg") == "truncated"


def test_truncated_png(tmp_path: Path) -> None:
    _noise((128, 128)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: int(len(data) * 0.7)])
    assert _reason(tmp_path / "cut.png") in ("truncated", "corrupt")


def test_empty_and_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image\n")
    assert _reason(tmp_path / "empty.png") == "empty_file"
    assert _reason(tmp_path / "text.png") == "not_an_image"
    assert _reason(tmp_path / "absent.png") == "missing_file"


def test_content_of_another_format_is_rejected(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "really_a_gif.png", format="GIF")
    assert _reason(tmp_path / "really_a_gif.png") == "unsupported_format"


def test_png_content_with_jpg_name_is_fine(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "named.jpg", format="PNG")
    assert load_rgb(tmp_path / "named.jpg").getpixel((0, 0)) == (1, 2, 3)


def test_too_many_pixels(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    assert _reason(tmp_path / "big.png", max_pixels=9_999) == "too_many_pixels"
    assert load_rgb(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)


def test_decompression_bomb_warning_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns; load_rgb must refuse.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)
    assert _reason(tmp_path / "bomb.png") == "too_many_pixels"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)  # past twice the limit: Pillow's error
    assert _reason(tmp_path / "bomb.png") == "too_many_pixels"


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    r, g, b = load_rgb(tmp_path / "cmyk.jpg").getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_rgba_transparent_becomes_black(tmp_path: Path) -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    img.paste((255, 0, 0, 0), (0, 0, 4, 8))  # fully transparent red on the left half
    img.paste((255, 0, 0, 128), (4, 0, 6, 8))  # half-transparent red
    img.save(tmp_path / "rgba.png")
    loaded = load_rgb(tmp_path / "rgba.png")
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((7, 0)) == (0, 0, 255)
    assert loaded.getpixel((4, 0)) == (128, 0, 0)
    # Negative control: the naive conversion keeps the hidden red.
    assert Image.open(tmp_path / "rgba.png").convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_la_transparent_becomes_black(tmp_path: Path) -> None:
    Image.new("LA", (4, 4), (200, 0)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_becomes_black(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((3, 3), 1)
    img.save(tmp_path / "p.png", transparency=0)
    reopened = Image.open(tmp_path / "p.png")
    assert reopened.mode == "P" and "transparency" in reopened.info
    loaded = load_rgb(tmp_path / "p.png")
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((3, 3)) == (0, 255, 0)
    assert reopened.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_palette_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [0] * 765)
    img.save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").getpixel((0, 0)) == (10, 20, 30)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((4, 4), 40000, dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 65535, 0
    Image.fromarray(arr).save(tmp_path / "g16.png")
    reopened = Image.open(tmp_path / "g16.png")
    assert reopened.mode in ("I;16", "I")
    loaded = load_rgb(tmp_path / "g16.png")
    assert loaded.getpixel((2, 2))[0] in (155, 156)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (0, 0, 0)
    # Negative control: Pillow's own conversion clips 40000 to white.
    assert reopened.convert("RGB").getpixel((2, 2)) == (255, 255, 255)


def test_mode_i_in_16bit_range_is_scaled() -> None:
    from tailoredgen_train.data.images import _to_rgb8

    img = Image.fromarray(np.full((2, 2), 40000, dtype=np.int32))
    assert img.mode == "I"
    assert _to_rgb8(img).getpixel((0, 0))[0] in (155, 156)


def test_high_bit_depth_is_converted_strip_by_strip_as_one_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion works a strip of rows at a time (bounded memory); the result must be what the
    whole-image formula gives, with the range taken over every strip, not each strip's own."""
    from tailoredgen_train.data import images

    monkeypatch.setattr(images, "_STRIP_PIXELS", 64 * 10)  # 10 rows of 64: the image below is 5 strips
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (45, 64)).astype(np.uint16)
    stretched = rng.uniform(-50.0, 300.0, (45, 64)).astype(np.float32)
    stretched[:10] = 0.0  # the first strip alone has no range: stretching it per strip would give zeros
    for arr, scale in ((values, lambda a: a * (255.0 / 65535.0)),
                       (stretched, lambda a: (a - a.min()) * (255.0 / (a.max() - a.min())))):
        expected = np.rint(scale(arr.astype(np.float64))).astype(np.uint8)
        converted = np.asarray(images._to_rgb8(Image.fromarray(arr)))
        assert np.array_equal(converted[..., 0], expected) and np.array_equal(converted[..., 2], expected)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the raw left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    loaded = load_rgb(tmp_path / "rot.jpg")
    assert loaded.size == (20, 40)
    r, g, b = loaded.getpixel((10, 2))  # the raw left edge is now the top
    assert r > 200 and g < 60 and b < 60


def test_other_modes_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    Image.new("1", (4, 4), 1).save(tmp_path / "one.png")
    assert load_rgb(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)
    assert load_rgb(tmp_path / "one.png").getpixel((0, 0)) == (255, 255, 255)


def test_animated_webp_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    assert Image.open(tmp_path / "anim.webp").n_frames == 2
    assert load_rgb(tmp_path / "anim.webp").getpixel((4, 4)) == (255, 0, 0)


def test_file_not_modified(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes(), (tmp_path / "a.png").stat().st_mtime_ns
    load_rgb(tmp_path / "a.png")
    assert ((tmp_path / "a.png").read_bytes(), (tmp_path / "a.png").stat().st_mtime_ns) == before


def test_normalize_json_caption() -> None:
    assert normalize_json_caption(' { "b": 1,\n "a": "é" } ') == '{"b":1,"a":"\\u00e9"}'
    with pytest.raises(ValueError, match="line 1 column"):
        normalize_json_caption('{"a": }')
    with pytest.raises(ValueError, match="JSON object"):
        normalize_json_caption("[1, 2]")
    with pytest.raises(ValueError, match="NaN"):
        normalize_json_caption('{"a": NaN}')


def test_normalize_text_caption() -> None:
    assert normalize_text_caption("  a photo\tof a cat\n ") == "a photo\tof a cat"
    for bad in ("", "  \n ", "a\x00b", "a\x1bb"):
        with pytest.raises(ValueError):
            normalize_text_caption(bad)
