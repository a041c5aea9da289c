"""Dataset handling: read-only preflight, image decoding, captions, aspect buckets and batch order."""

from pathlib import Path

from tailoredgen_train.data.buckets import (
    FIBO_BUCKETS_1024,
    CropGeometry,
    crop_geometry,
    nearest_bucket,
    resize_and_center_crop,
    round_to_multiple,
    scale_buckets,
    to_tensor,
)
from tailoredgen_train.data.captions import apply_caption_prefix, normalize_json_caption, normalize_text_caption
from tailoredgen_train.data.images import IMAGE_EXTENSIONS, ImageProblem, load_rgb
from tailoredgen_train.data.metadata import MetadataRow, read_metadata
from tailoredgen_train.data.preflight import PreflightReport, Problem, Sample, validate_dataset
from tailoredgen_train.data.sampler import BucketBatchSampler

# A tiny FIBO-captioned dataset shipped with the package, for smoke tests and examples.
SAMPLE_DATASET_DIR = Path(__file__).resolve().parent / "sample_dataset"
# The same images with plain captions for the legacy versions; they continue this caption prefix.
SAMPLE_TEXT_DATASET_DIR = Path(__file__).resolve().parent / "sample_dataset_text"
SAMPLE_TEXT_CAPTION_PREFIX = "A minimalist flat illustration of"

__all__ = [
    "FIBO_BUCKETS_1024",
    "apply_caption_prefix",
    "CropGeometry",
    "crop_geometry",
    "IMAGE_EXTENSIONS",
    "SAMPLE_DATASET_DIR",
    "SAMPLE_TEXT_CAPTION_PREFIX",
    "SAMPLE_TEXT_DATASET_DIR",
    "BucketBatchSampler",
    "ImageProblem",
    "MetadataRow",
    "PreflightReport",
    "Problem",
    "Sample",
    "load_rgb",
    "nearest_bucket",
    "normalize_json_caption",
    "normalize_text_caption",
    "read_metadata",
    "resize_and_center_crop",
    "round_to_multiple",
    "scale_buckets",
    "to_tensor",
    "validate_dataset",
]
