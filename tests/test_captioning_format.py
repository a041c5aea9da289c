"""FIBO's caption format without a model: preflight's checks, FIBO's cleaning step on the kinds of
output its VLM writes, and FIBO's message format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tailoredgen_train.captioning import prompts
from tailoredgen_train.captioning.cleaning import (
    AESTHETIC_BOUNDS,
    PICKASCORE_BOUNDS,
    clean_caption,
    clean_vlm_output,
    parse_vlm_output,
    score_word,
)
from tailoredgen_train.captioning.visual_schema import shared_fields
from tailoredgen_train.data import SAMPLE_DATASET_DIR
from tailoredgen_train.data.caption_format import CAPTION_FIELDS, FIELD_NAMES, has_known_field, unknown_fields
from tailoredgen_train.data.preflight import validate_dataset

# The shapes of what FIBO's VLM writes, from the FIBO repository (Bria-AI/FIBO at c406e12). That
# repository is CC BY-NC 4.0, so the wording below is ours; the structure is theirs, quirk by quirk:
# - RAW_RECORD is like `default_json_caption.json`: one line, ", "/": " separators, every object
#   field present with null for the ones that do not apply, "text_render": [], and the texture
#   answers that end in "End of texture answer.";
# - PRETTY_CLEANED is like `examples/outputs/inspire.json`: indented, scores already words, no nulls.
RAW_RECORD = (
    '{"short_description": "A heron stands in shallow water at dawn.", "objects": [{"description": "A grey '
    'heron with a long neck.", "location": "center-left", "relationship": "The heron wades near the reeds.", '
    '"relative_size": "large within frame", "shape_and_color": "Slender, grey and white.", "texture": "Soft '
    'feathers. End of texture answer.", "appearance_details": "A black crest on its head.", "number_of_objects": '
    'null, "pose": "Standing on one leg.", "expression": null, "clothing": null, "action": "Watching the water.", '
    '"gender": null, "skin_tone_and_texture": null, "orientation": "Facing left."}, {"description": "Tall reeds.", '
    '"location": "right", "relationship": "Behind the heron.", "relative_size": "medium", "shape_and_color": '
    '"Thin, green.", "texture": "Smooth stalks. End of texture answer.", "appearance_details": "", '
    '"number_of_objects": 12, "pose": null, "expression": null, "clothing": null, "action": null, "gender": null, '
    '"skin_tone_and_texture": null, "orientation": "Upright."}], "background_setting": "A misty lake.", '
    '"lighting": {"conditions": "Dawn light", "direction": "Backlit.", "shadows": null}, "aesthetics": '
    '{"composition": "Rule of thirds.", "color_scheme": "Muted greys and pinks.", "mood_atmosphere": "Calm."}, '
    '"photographic_characteristics": {"depth_of_field": "Shallow.", "focus": "Sharp focus on the heron.", '
    '"camera_angle": "Eye-level.", "lens_focal_length": "Telephoto."}, "style_medium": "photograph", '
    '"text_render": [], "context": "A nature photograph.", "artistic_style": "Serene, realistic"}'
)
PRETTY_CLEANED = """{
  "short_description": "A paper boat floats on a puddle.",
  "objects": [
    {
      "description": "A folded paper boat.",
      "location": "center",
      "relationship": "It floats alone on the water.",
      "relative_size": "medium",
      "shape_and_color": "Triangular, white.",
      "texture": "matte paper",
      "orientation": "facing right"
    }
  ],
  "background_setting": "Wet asphalt.",
  "lighting": {"conditions": "overcast", "direction": "from above", "shadows": "soft"},
  "aesthetics": {
    "composition": "centered",
    "color_scheme": "greys with a white subject",
    "mood_atmosphere": "quiet",
    "aesthetic_score": "high",
    "preference_score": "high"
  },
  "photographic_characteristics": {"depth_of_field": "shallow", "focus": "sharp on the boat",
    "camera_angle": "high angle", "lens_focal_length": "macro"},
  "style_medium": "photograph",
  "text_render": [],
  "context": "A stock photograph.",
  "artistic_style": "minimal, realistic"
}"""


def _jsonl(root: Path, captions: list[object]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, caption in enumerate(captions):
        Image.new("RGB", (64, 64), (index * 40, 0, 0)).save(root / f"{index}.png")
        lines.append(json.dumps({"file_name": f"{index}.png", "caption": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


# ---- preflight ----------------------------------------------------------------------------------------


def test_a_json_object_without_fibo_fields_is_refused(tmp_path):
    _jsonl(tmp_path, ['{"foo": "bar"}', '{"short_description": "a red square"}'])
    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert [(p.file, p.reason) for p in report.problems] == [("0.png", "not_a_fibo_caption")]
    detail = report.problems[0].detail
    assert "'foo'" in detail and "docs/CAPTIONS.md" in detail and "tailoredgen-train caption" in detail


def test_unknown_fields_are_notes_naming_the_closest_known_field(tmp_path):
    caption = {"short_description": "x", "lightning": {"conditions": "y"}, "lighting": {"brightnes": "z"},
               "objects": [{"descripton": "a"}], "camera": "q"}
    _jsonl(tmp_path, [json.dumps(caption)])
    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert report.ok  # notes only
    details = sorted(n.detail for n in report.notes if n.reason == "unknown_caption_field")
    assert details == sorted([
        "'lightning' is not a FIBO caption field (closest known field: 'lighting'); FIBO was not trained on it",
        "'lighting.brightnes' is not a FIBO caption field; FIBO was not trained on it",
        "'objects[0].descripton' is not a FIBO caption field (closest known field: 'objects[0].description'); "
        "FIBO was not trained on it",
        "'camera' is not a FIBO caption field; FIBO was not trained on it",
    ])


def test_invalid_json_and_non_objects_point_to_the_reference(tmp_path):
    _jsonl(tmp_path, ["a red square", '["short_description"]'])
    report = validate_dataset(tmp_path, caption_format="json", min_side=32)
    assert [p.reason for p in report.problems] == ["invalid_json", "invalid_json"]
    for problem in report.problems:
        assert "FIBO captions are structured JSON objects" in problem.detail and "docs/CAPTIONS.md" in problem.detail


def test_the_sample_dataset_has_only_known_fields():
    # the negative control of the checks above: FIBO-format captions raise nothing
    report = validate_dataset(SAMPLE_DATASET_DIR, caption_format="json", min_side=32)
    assert report.ok and not [n for n in report.notes if n.reason == "unknown_caption_field"]


def test_the_field_table_matches_fibos_examples():
    assert FIELD_NAMES == ("short_description", "objects", "background_setting", "lighting", "aesthetics",
                           "photographic_characteristics", "style_medium", "text_render", "context",
                           "artistic_style")
    for text in (RAW_RECORD, PRETTY_CLEANED):
        caption = json.loads(text)
        assert has_known_field(caption) and unknown_fields(caption) == []
    assert not has_known_field({"foo": 1})


def test_the_reference_documents_every_field():
    reference = (Path(__file__).resolve().parents[1] / "docs" / "CAPTIONS.md").read_text()
    names = {f.name for f in CAPTION_FIELDS} | {sub.name for f in CAPTION_FIELDS for sub in f.fields}
    missing = [name for name in names if f"`{name}`" not in reference]
    assert not missing, f"docs/CAPTIONS.md does not mention {missing}"
    example = json.loads(reference.split("```json\n", 1)[1].split("```", 1)[0])
    assert unknown_fields(example) == [] and set(example) == set(FIELD_NAMES)


# ---- FIBO's cleaning step -------------------------------------------------------------------------------


def test_cleaning_a_raw_record_drops_nulls_and_empties_and_compacts():
    cleaned = json.loads(clean_vlm_output(RAW_RECORD))
    raw = json.loads(RAW_RECORD)
    assert "text_render" not in cleaned  # [] dropped
    heron, reeds = cleaned["objects"]
    assert "expression" not in heron and "number_of_objects" not in heron and heron["pose"] == raw["objects"][0]["pose"]
    assert "appearance_details" not in reeds and reeds["number_of_objects"] == 12  # "" dropped, 12 kept
    assert cleaned["lighting"] == {"conditions": "Dawn light", "direction": "Backlit."}
    assert heron["texture"] == "Soft feathers. End of texture answer."  # FIBO keeps its quirks
    assert list(cleaned) == [k for k in raw if k != "text_render"]  # FIBO's order survives
    assert clean_vlm_output(RAW_RECORD) == json.dumps(cleaned, separators=(",", ":"))  # stored compact


def test_cleaning_a_cleaned_caption_changes_nothing_but_whitespace():
    assert json.loads(clean_vlm_output(PRETTY_CLEANED)) == {k: v for k, v in json.loads(PRETTY_CLEANED).items()
                                                          if k != "text_render"}


def test_numeric_scores_become_fibos_words():
    record = json.loads(RAW_RECORD) | {"aesthetic_score": 7.2, "pickascore": 0.95, "resolution": "1024"}
    cleaned = clean_caption(record)
    scores = (cleaned["aesthetics"]["aesthetic_score"], cleaned["aesthetics"]["preference_score"])
    assert scores == ("high", "very high")
    assert "pickascore" not in cleaned and "resolution" not in cleaned  # only FIBO's ten fields stay
    assert clean_caption({"short_description": "x", "aesthetic_score": 5.0}) == {
        "short_description": "x", "aesthetics": {"aesthetic_score": "very low"}}
    assert clean_caption({"aesthetics": {"composition": "c", "preference_score": 0.8}})["aesthetics"] == {
        "composition": "c", "preference_score": "low"}


@pytest.mark.parametrize(("value", "bounds", "word"), [
    (5.49, AESTHETIC_BOUNDS, "very low"), (5.5, AESTHETIC_BOUNDS, "low"), (6.0, AESTHETIC_BOUNDS, "medium"),
    (6.99, AESTHETIC_BOUNDS, "medium"), (7.0, AESTHETIC_BOUNDS, "high"), (7.6, AESTHETIC_BOUNDS, "very high"),
    (0.779, PICKASCORE_BOUNDS, "very low"), (0.82, PICKASCORE_BOUNDS, "medium"), (0.9, PICKASCORE_BOUNDS, "high"),
    (0.91, PICKASCORE_BOUNDS, "very high"),
])
def test_score_thresholds_are_fibos(value, bounds, word):
    assert score_word(value, bounds) == word


def test_nested_emptiness_is_dropped_bottom_up():
    assert clean_caption({"short_description": "x", "lighting": {"shadows": None, "direction": ""},
                          "objects": [{"pose": None}], "aesthetics": {"composition": math.nan}}) == {
        "short_description": "x"}


@pytest.mark.parametrize(("text", "message"), [
    (RAW_RECORD[:700], "not valid JSON"),  # the token budget ran out mid-string
    ('```json\n{"short_description": "x"}\n```', "not valid JSON"),  # a chat model's markdown fence
    ('{"short_description": "x"} and some words', "not valid JSON"),  # text after the object
    ('["short_description"]', "not an object"),
    ("", "wrote nothing"),
    ("<|im_end|>", "wrote nothing"),
])
def test_malformed_outputs_are_reported_not_repaired(text, message):
    with pytest.raises(ValueError, match=message):
        clean_vlm_output(text)


def test_stop_sequences_end_the_output():
    assert parse_vlm_output('{"short_description": "x"}<|im_end|>{"junk": 1}') == {"short_description": "x"}
    with pytest.raises(ValueError, match="none of FIBO's caption fields"):
        clean_vlm_output('{"foo": "bar"}')


# ---- visual schemas --------------------------------------------------------------------------------------


def test_shared_fields_keep_what_most_captions_agree_on():
    captions = [
        {"style_medium": "digital illustration", "artistic_style": "flat", "lighting": {"conditions": "studio",
         "direction": "front"}, "objects": [{"description": "a bear"}], "context": "a sticker set"},
        {"style_medium": "Digital Illustration.", "artistic_style": "flat", "lighting": {"conditions": "studio"},
         "objects": [{"description": "a bear"}], "context": "a book cover"},
        {"style_medium": "digital illustration", "artistic_style": "3D", "lighting": {"conditions": "daylight"},
         "objects": [{"description": "a bear"}], "context": "a poster"},
    ]
    assert shared_fields(captions) == {"lighting": {"conditions": "studio"}, "style_medium": "digital illustration",
                                       "artistic_style": "flat"}
    assert shared_fields(captions, min_agreement=0.9) == {"style_medium": "digital illustration"}
    assert shared_fields([{"context": "a"}, {"context": "b"}]) == {}  # half is not a majority


# ---- FIBO's message format ---------------------------------------------------------------------------------


def test_messages_are_fibos():
    image = Image.new("RGB", (32, 32))
    # the structures FIBO's build_messages (src/fibo_inference/vlm/local_vlm.py) returns for each task
    assert prompts.inspire_messages(image) == [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "<inspire>"}]}]
    assert prompts.generate_messages("  a cat on a sofa ") == [
        {"role": "user", "content": [{"type": "text", "text": "<generate>\na cat on a sofa"}]}]
    assert prompts.refine_messages(' {"short_description": "a cat"} ', " make it night ") == [
        {"role": "user", "content": [{"type": "text", "text":
            '<refine>\nInput:\n{"short_description": "a cat"}\nEditing instructions:\nmake it night'}]}]
    assert prompts.images_of(prompts.inspire_messages(image)) == [image]
    assert prompts.Sampling() == prompts.Sampling(temperature=0.2, top_p=0.9)  # FIBO's DEFAULT_SAMPLING


def test_a_visual_schema_file_may_be_brias_api_answer(tmp_path):
    from tailoredgen_train.captioning.visual_schema import load_visual_schema, save_visual_schema
    from tailoredgen_train.errors import CaptionInputError

    schema = {"style_medium": "watercolor", "lighting": {"conditions": "soft daylight"}}
    assert load_visual_schema(save_visual_schema(schema, tmp_path / "mine.json")) == schema
    (tmp_path / "bria.json").write_text(json.dumps({"visual_schema": json.dumps(schema)}))
    assert load_visual_schema(tmp_path / "bria.json") == schema
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(CaptionInputError, match="must be a JSON object"):
        load_visual_schema(tmp_path / "list.json")
    with pytest.raises(CaptionInputError, match="does not exist"):
        load_visual_schema(tmp_path / "missing.json")
