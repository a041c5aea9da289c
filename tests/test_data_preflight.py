"""validate_dataset and read_metadata: every bad file reported, nothing written."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailoredgen_train.data import SAMPLE_DATASET_DIR
from tailoredgen_train.data.metadata import read_metadata
from tailoredgen_train.data.preflight import validate_dataset
from tailoredgen_train.errors import DatasetInvalidError

CAPTION = {"short_description": "A red square.", "objects": [{"description": "square"}], "style_medium": "photo"}
CAPTION_TEXT = json.dumps(CAPTION, indent=2)  # deliberately not compact
COMPACT = json.dumps(CAPTION, separators=(",", ":"))


def _image(path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(root: Path, entries: list[dict]) -> None:
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n", encoding="utf-8")


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _good(root: Path) -> None:
    _image(root / "a.png", color=(1, 2, 3))
    _image(root / "sub" / "b.jpg", size=(48, 64))
    _jsonl(root, [{"file_name": "a.png", "caption": CAPTION_TEXT}, {"file_name": "sub/b.jpg", "caption": COMPACT}])


def _bad_dataset(root: Path) -> dict[str, str]:
    """A dataset with one file per problem; returns file -> expected reason."""
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "full.jpg").unlink()
    (root / "truncated.jpg").write_bytes(data[: int(len(data) * 0.7)])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    _image(root / "small.png", size=(20, 64))
    _image(root / "badjson.png")
    _image(root / "listjson.png")
    _image(root / "nocaption.png")
    _image(root / "blank.png")
    _image(root / "unlisted.png")
    _image(root / "anim.gif", size=(64, 64))  # a real GIF, rejected for its extension
    _image(root / "good.png")
    _image(root / "dup.png")
    entries = [
        {"file_name": "good.png", "caption": COMPACT},
        {"file_name": "truncated.jpg", "caption": COMPACT},
        {"file_name": "empty.png", "caption": COMPACT},
        {"file_name": "text.png", "caption": COMPACT},
        {"file_name": "small.png", "caption": COMPACT},
        {"file_name": "badjson.png", "caption": '{"short_description": "x",}'},
        {"file_name": "listjson.png", "caption": '["a", "b"]'},
        {"file_name": "nocaption.png"},
        {"file_name": "blank.png", "caption": "   "},
        {"file_name": "missing.png", "caption": COMPACT},
        {"file_name": "anim.gif", "caption": COMPACT},
        {"file_name": "../escape.png", "caption": COMPACT},
        {"file_name": "/abs.png", "caption": COMPACT},
        {"file_name": "dup.png", "caption": COMPACT},
        {"file_name": "./dup.png", "caption": COMPACT},
    ]
    _jsonl(root, entries)
    return {
        "truncated.jpg": "truncated",
        "empty.png": "empty_file",
        "text.png": "not_an_image",
        "small.png": "too_small",
        "badjson.png": "invalid_json",
        "listjson.png": "invalid_json",
        "nocaption.png": "missing_caption",
        "blank.png": "empty_caption",
        "missing.png": "missing_file",
        "anim.gif": "unsupported_format",
        "../escape.png": "bad_file_name",
        "/abs.png": "bad_file_name",
        "dup.png": "duplicate_entry",
        "unlisted.png": "missing_caption",
    }


def test_good_dataset(tmp_path: Path) -> None:
    _good(tmp_path)
    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert report.ok, report.format()
    assert [s.sample_id for s in report.samples] == ["a.png", "sub/b.jpg"]
    a, b = report.samples
    assert a.caption == COMPACT and b.caption == COMPACT
    assert (a.width, a.height, b.width, b.height) == (64, 48, 48, 64)
    assert a.image_path == tmp_path / "a.png"
    assert len(a.content_hash) == 64 and a.content_hash != b.content_hash
    report.raise_if_invalid()
    assert report.format().endswith("2 valid images, 0 problems")


def test_every_bad_file_reported(tmp_path: Path) -> None:
    expected = _bad_dataset(tmp_path)
    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    got = {p.file: p.reason for p in report.problems}
    for file, reason in expected.items():
        assert got.get(file) == reason, (file, report.format())
    assert len(report.problems) == len(expected)
    assert [s.sample_id for s in report.samples] == ["dup.png", "good.png"]
    assert not report.ok


def test_problem_details(tmp_path: Path) -> None:
    _bad_dataset(tmp_path)
    problems = {p.file: p for p in validate_dataset(tmp_path, caption_format="json", min_side=32).problems}
    assert "20x64" in problems["small.png"].detail and "32" in problems["small.png"].detail
    assert "data.min_side" in problems["small.png"].detail
    assert "line 1 column" in problems["badjson.png"].detail
    assert "JSON object" in problems["listjson.png"].detail
    assert "metadata.jsonl" in problems["unlisted.png"].detail and problems["unlisted.png"].source is None
    assert problems["truncated.jpg"].source == "metadata.jsonl:2"
    assert "metadata.jsonl:14" in problems["dup.png"].detail and problems["dup.png"].source == "metadata.jsonl:15"
    assert problems["empty.png"].to_dict() == {
        "file": "empty.png",
        "reason": "empty_file",
        "detail": problems["empty.png"].detail,
        "source": "metadata.jsonl:3",
    }


def test_format_and_raise(tmp_path: Path) -> None:
    expected = _bad_dataset(tmp_path)
    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    text = report.format()
    for file, reason in expected.items():
        assert any(line.startswith(f"{file}: {reason} — ") for line in text.splitlines()), (file, text)
    assert text.splitlines()[-1] == f"2 valid images, {len(expected)} problems"
    with pytest.raises(DatasetInvalidError) as info:
        report.raise_if_invalid()
    assert str(tmp_path) in info.value.message.splitlines()[0]
    assert "failed validation" in info.value.message.splitlines()[0]
    assert info.value.problems == report.problems
    assert info.value.http_status == 412
    assert len(info.value.to_dict()["problems"]) == len(expected)


def test_image_and_caption_problems_both_reported(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    _jsonl(tmp_path, [{"file_name": "x.png", "caption": "{oops"}])
    reasons = sorted(p.reason for p in validate_dataset(tmp_path, caption_format="json", min_side=8).problems)
    assert reasons == ["empty_file", "invalid_json"]


def test_dataset_unchanged_by_validation(tmp_path: Path) -> None:
    _bad_dataset(tmp_path)
    _good(tmp_path / "nested")
    before = _snapshot(tmp_path)
    validate_dataset(tmp_path, caption_format="json", min_side=32)
    validate_dataset(tmp_path / "nested", caption_format="json", min_side=32)
    assert _snapshot(tmp_path) == before


def test_csv_matches_jsonl(tmp_path: Path) -> None:
    jsonl_dir, csv_dir = tmp_path / "j", tmp_path / "c"
    _good(jsonl_dir)
    _good(csv_dir)
    (csv_dir / "metadata.jsonl").unlink()
    with (csv_dir / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        writer.writerow(["a.png", CAPTION_TEXT])  # multi-line, quoted, with inner quotes doubled
        writer.writerow(["sub/b.jpg", COMPACT])
    assert '""short_description""' in (csv_dir / "metadata.csv").read_text()
    rows = read_metadata(csv_dir)
    assert [r.source for r in rows] == ["metadata.csv:2", f"metadata.csv:{3 + CAPTION_TEXT.count(chr(10))}"]
    from_csv = validate_dataset(csv_dir, caption_format="json", min_side=32)
    from_jsonl = validate_dataset(jsonl_dir, caption_format="json", min_side=32)
    assert from_csv.ok and from_jsonl.ok
    strip = lambda report: [(s.sample_id, s.caption, s.content_hash, s.width, s.height) for s in report.samples]
    assert strip(from_csv) == strip(from_jsonl)


def test_csv_unquoted_caption_with_commas(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text('file_name,caption\na.png,{"a": 1, "b": 2}\n', encoding="utf-8")
    with pytest.raises(DatasetInvalidError, match="metadata.csv:2"):
        read_metadata(tmp_path)


def test_jsonl_preferred_over_csv(tmp_path: Path) -> None:
    _good(tmp_path)
    (tmp_path / "metadata.csv").write_text("file_name,caption\nother.png,x\n", encoding="utf-8")
    assert [r.file_name for r in read_metadata(tmp_path)] == ["a.png", "sub/b.jpg"]


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    _good(tmp_path)
    with (tmp_path / "metadata.jsonl").open("a", encoding="utf-8") as f:
        f.write("\n{not json\n")
        f.write('{"caption": "no file name"}\n')
    with pytest.raises(DatasetInvalidError) as info:
        validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert "metadata.jsonl" in info.value.message
    assert "metadata.jsonl:4" in info.value.message and "metadata.jsonl:5" in info.value.message
    assert "file_name" in info.value.message  # says how to fix it
    assert [p.source for p in info.value.problems] == ["metadata.jsonl:4", "metadata.jsonl:5"]


def test_non_utf8_metadata(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DatasetInvalidError, match="UTF-8.*line 1"):
        read_metadata(tmp_path)


def test_no_metadata(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    with pytest.raises(DatasetInvalidError, match="metadata.jsonl.*file_name.*metadata.csv"):
        validate_dataset(tmp_path, caption_format="json", min_side=8)


def test_missing_or_file_dataset_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetInvalidError, match="does not exist"):
        validate_dataset(tmp_path / "nope", caption_format="json", min_side=8)
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatasetInvalidError, match="not a directory"):
        validate_dataset(tmp_path / "f", caption_format="json", min_side=8)


def test_empty_metadata_is_not_ok(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text("\n", encoding="utf-8")
    report = validate_dataset(tmp_path, caption_format="json", min_side=8)
    assert not report.ok and [p.reason for p in report.problems] == ["empty_dataset"]


def test_inline_json_object_caption(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _jsonl(tmp_path, [{"file_name": "a.png", "caption": CAPTION}])
    assert validate_dataset(tmp_path, caption_format="json", min_side=8).samples[0].caption == COMPACT


def test_hidden_files_ignored(tmp_path: Path) -> None:
    _good(tmp_path)
    _image(tmp_path / ".thumbs" / "a.png")
    _image(tmp_path / ".hidden.png")
    assert validate_dataset(tmp_path, caption_format="json", min_side=32).ok


def test_text_captions_and_prefix(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    _jsonl(tmp_path, [{"file_name": "a.png", "caption": " a red square "}, {"file_name": "b.png", "caption": "x\x07y"}])
    report = validate_dataset(tmp_path, caption_format="text", min_side=8, caption_prefix="in sks style ")
    assert [s.caption for s in report.samples] == ["in sks style a red square"]
    assert [(p.file, p.reason) for p in report.problems] == [("b.png", "invalid_caption")]
    plain = validate_dataset(tmp_path, caption_format="text", min_side=8)
    assert plain.samples[0].caption == "a red square"


def test_bad_arguments(tmp_path: Path) -> None:
    _good(tmp_path)
    with pytest.raises(ValueError, match="caption_prefix"):
        validate_dataset(tmp_path, caption_format="json", min_side=8, caption_prefix="sks")
    with pytest.raises(ValueError, match="caption_format"):
        validate_dataset(tmp_path, caption_format="yaml", min_side=8)  # type: ignore[arg-type]


def test_sample_dataset_is_valid() -> None:
    report = validate_dataset(SAMPLE_DATASET_DIR, caption_format="json", min_side=128)
    assert report.ok, report.format()
    assert len(report.samples) == 6
    for sample in report.samples:
        assert sample.caption == json.dumps(json.loads(sample.caption), separators=(",", ":"))
        assert min(sample.width, sample.height) >= 160
        assert json.loads(sample.caption)["style_medium"] == "digital illustration"
    raw = [json.loads(line)["caption"] for line in (SAMPLE_DATASET_DIR / "metadata.jsonl").read_text().splitlines()]
    assert sorted(raw) == sorted(s.caption for s in report.samples)  # already stored compact
    total = sum(p.stat().st_size for p in SAMPLE_DATASET_DIR.iterdir())
    assert total < 200_000
    assert {p.suffix for p in SAMPLE_DATASET_DIR.iterdir()} >= {".png", ".jpg"}
    assert not any(name.startswith(".") for name in os.listdir(SAMPLE_DATASET_DIR))


def test_converted_images_are_usable_and_reported_as_notes(tmp_path: Path) -> None:
    """CMYK, RGBA, 16-bit and EXIF-rotated files are valid: preflight says what each one became."""
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), (9, 9, 9)).save(tmp_path / "rotated.jpg", exif=exif)
    _image(tmp_path / "plain.png")
    _jsonl(tmp_path, [{"file_name": n, "caption": COMPACT}
                      for n in ("cmyk.jpg", "rgba.png", "deep.png", "rotated.jpg", "plain.png")])

    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert report.ok, report.format()
    assert {(n.file, n.reason) for n in report.notes} == {
        ("cmyk.jpg", "cmyk_converted"),
        ("rgba.png", "alpha_on_black"),
        ("deep.png", "high_bit_depth_scaled"),
        ("rotated.jpg", "exif_rotated"),
    }
    sizes = {s.sample_id: (s.width, s.height) for s in report.samples}
    assert sizes["rotated.jpg"] == (40, 80)
    assert "rgba.png: note alpha_on_black" in report.format()


DEEP = '{"short_description": ' + "[" * 50_000 + "]" * 50_000 + "}"


@pytest.mark.parametrize("caption,why", [
    (DEEP, "nests deeper than 32 levels"),
    ('{"short_description": "a", "score": Infinity}', "Infinity is not valid JSON"),
    ('{"short_description": "a", "score": NaN}', "NaN is not valid JSON"),
])
def test_captions_must_be_strict_json_of_bounded_depth(tmp_path: Path, caption: str, why: str) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    _jsonl(tmp_path, [{"file_name": "a.png", "caption": caption}, {"file_name": "b.png", "caption": COMPACT}])
    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert [(p.file, p.reason) for p in report.problems] == [("a.png", "invalid_json")]
    assert why in report.problems[0].detail
    assert [s.sample_id for s in report.samples] == ["b.png"]  # the control: a good caption in the same file


def test_a_deep_inline_caption_is_a_malformed_line_not_a_crash(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": ' + "[" * 50_000 + "]" * 50_000
                                             + "}\n")
    with pytest.raises(DatasetInvalidError, match="line 1 is not valid JSON .*nests deeper than 32"):
        read_metadata(tmp_path)


def test_depth_is_counted_outside_strings_only() -> None:
    from tailoredgen_train import strict_json

    assert strict_json.loads('{"a": "' + "[" * 100 + '"}') == {"a": "[" * 100}
    nested = "[" * 32 + "]" * 32
    assert strict_json.loads(nested) == eval(nested)  # exactly the limit is accepted
    with pytest.raises(ValueError, match="deeper than 32"):
        strict_json.loads("[" + nested + "]")


def test_unreadable_files_are_reason_codes_not_tracebacks(tmp_path: Path, monkeypatch) -> None:
    # tests run as root, which chmod cannot stop: the operating system's refusal is simulated
    _good(tmp_path)
    real_open = Image.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith("a.png"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refuse)
    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert [(p.file, p.reason) for p in report.problems] == [("a.png", "unreadable")]
    assert "Permission denied" in report.problems[0].detail and "read access" in report.problems[0].detail
    assert [s.sample_id for s in report.samples] == ["sub/b.jpg"]

    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "metadata.jsonl" else real_read(self))
    with pytest.raises(DatasetInvalidError, match=r"Cannot read .*metadata.jsonl \(Permission denied\)") as raised:
        validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert [p.reason for p in raised.value.problems] == ["unreadable"]
