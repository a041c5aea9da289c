"""Aspect buckets and the pure-function batch sampler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from tailoredgen_train.data.buckets import (
    FIBO_BUCKETS_1024,
    nearest_bucket,
    resize_and_center_crop,
    scale_buckets,
    to_tensor,
)
from tailoredgen_train.data.sampler import BucketBatchSampler


def test_scale_buckets() -> None:
    assert scale_buckets(FIBO_BUCKETS_1024, 1024, 16) == FIBO_BUCKETS_1024
    assert scale_buckets(FIBO_BUCKETS_1024, 512, 16) == tuple((w // 2, h // 2) for w, h in FIBO_BUCKETS_1024)
    for resolution in (256, 384, 512, 768, 1024, 1536):
        buckets = scale_buckets(FIBO_BUCKETS_1024, resolution, 16)
        assert all(w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16 for w, h in buckets)
        assert len(set(buckets)) == len(buckets)
    assert scale_buckets(FIBO_BUCKETS_1024, 16, 16) == ((16, 16),)  # all collapse: deduplicated
    with pytest.raises(ValueError):
        scale_buckets(FIBO_BUCKETS_1024, 0, 16)


def test_nearest_bucket() -> None:
    assert nearest_bucket(1000, 1000, FIBO_BUCKETS_1024) == (1024, 1024)
    assert nearest_bucket(1600, 900, FIBO_BUCKETS_1024) == (1344, 768)
    assert nearest_bucket(900, 1600, FIBO_BUCKETS_1024) == (832, 1248)
    assert nearest_bucket(5000, 100, FIBO_BUCKETS_1024) == (1344, 768)
    assert nearest_bucket(10, 10, ((20, 10), (10, 20))) == (20, 10)  # tie: first wins


@pytest.mark.parametrize("src", [(1600, 900), (300, 500), (1024, 1024), (50, 2000), (1344, 768)])
def test_resize_and_center_crop_exact_size(src: tuple[int, int]) -> None:
    img = Image.new("RGB", src, (10, 20, 30))
    bucket = nearest_bucket(*src, FIBO_BUCKETS_1024)
    out = resize_and_center_crop(img, bucket)
    assert out.size == bucket and out.mode == "RGB"


def test_center_crop_keeps_the_centre() -> None:
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third
    out = resize_and_center_crop(img, (64, 64))
    assert out.getpixel((32, 32)) == (255, 0, 0)


def test_to_tensor_range() -> None:
    img = Image.new("RGB", (4, 2), (0, 255, 0))
    img.putpixel((1, 1), (128, 0, 255))
    t = to_tensor(img)
    assert t.shape == (3, 2, 4) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert t[:, 0, 0].tolist() == [-1.0, 1.0, -1.0]
    assert abs(t[0, 1, 1].item() - (128 / 127.5 - 1)) < 1e-6
    with pytest.raises(ValueError):
        to_tensor(img.convert("L"))


def _keys(n: int = 23) -> list[str]:
    return ["a" if i % 3 == 0 else "b" if i % 3 == 1 else f"c{i % 2}" for i in range(n)]


def test_epoch_covers_every_index_once() -> None:
    keys = _keys()
    sampler = BucketBatchSampler(keys, batch_size=4, seed=7)
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(keys)))
        assert all(len({keys[i] for i in b}) == 1 for b in batches)
        assert all(1 <= len(b) <= 4 for b in batches)
        assert len(batches) == sampler.batches_per_epoch


def test_batches_per_epoch_constant() -> None:
    keys = _keys(37)
    counts = Counter(keys)
    expected = sum(-(-c // 5) for c in counts.values())
    sampler = BucketBatchSampler(keys, batch_size=5, seed=1)
    assert sampler.batches_per_epoch == expected
    assert {len(sampler.epoch_batches(e)) for e in range(6)} == {expected}


def test_batch_at_is_pure() -> None:
    keys = _keys()
    first, second = BucketBatchSampler(keys, 4, seed=3), BucketBatchSampler(keys, 4, seed=3)
    cursors = [0, 5, 1, 17, 3, 40, 2]
    assert [first.batch_at(c) for c in cursors] == [second.batch_at(c) for c in reversed(cursors)][::-1]
    fresh = BucketBatchSampler(keys, 4, seed=3)
    assert fresh.batch_at(17) == first.batch_at(17)


def test_epochs_and_seeds_differ() -> None:
    keys = _keys(40)
    sampler = BucketBatchSampler(keys, 4, seed=3)
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)
    # Negative control: another seed gives another order.
    assert BucketBatchSampler(keys, 4, seed=4).epoch_batches(0) != sampler.epoch_batches(0)
    assert BucketBatchSampler(keys, 4, seed=3).epoch_batches(0) == sampler.epoch_batches(0)


def test_batch_at_walks_epochs() -> None:
    sampler = BucketBatchSampler(_keys(), 4, seed=0)
    n = sampler.batches_per_epoch
    assert [sampler.batch_at(n + i) for i in range(n)] == sampler.epoch_batches(1)


def test_iter_from_matches_batch_at() -> None:
    sampler = BucketBatchSampler(_keys(), 3, seed=11)
    it = sampler.iter_from(5)
    assert [next(it) for _ in range(30)] == [sampler.batch_at(5 + i) for i in range(30)]


def test_two_ranks_disjoint_and_covering() -> None:
    keys = ["a"] * 8 + ["b"] * 8  # 4 + 4 batches of 2: no padding for world_size 2
    ranks = [BucketBatchSampler(keys, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 4
    for epoch in range(2):
        per_rank = [
            [i for step in range(4) for i in s.batch_at(epoch * 4 + step)] for s in ranks
        ]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == list(range(16))


def test_padding_gives_equal_steps() -> None:
    keys = ["a"] * 5 + ["b"] * 2  # 3 + 1 batches of 2 -> 4 global; world 3 pads to 6
    ranks = [BucketBatchSampler(keys, 2, seed=0, rank=r, world_size=3) for r in range(3)]
    assert {s.batches_per_epoch for s in ranks} == {2}
    global_batches = ranks[0].epoch_batches(0)
    assert len(global_batches) == 6 and global_batches[4:] == global_batches[:2]
    covered = {i for s in ranks for step in range(2) for i in s.batch_at(step)}
    assert covered == set(range(7))
    tiny = BucketBatchSampler(["a"], 4, seed=0, rank=3, world_size=4)  # 1 batch for 4 ranks
    assert tiny.batch_at(0) == [0]


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(["a"], 0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(["a"], 1, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        BucketBatchSampler(["a"], 1, seed=0, world_size=0)
    with pytest.raises(ValueError, match="buckets"):
        BucketBatchSampler([], 1, seed=0)
    with pytest.raises(ValueError, match="cursor"):
        BucketBatchSampler(["a"], 1, seed=0).batch_at(-1)


def test_usable_as_dataloader_batch_sampler() -> None:
    data = torch.arange(10).float()
    sampler = BucketBatchSampler([0] * 10, 4, seed=2)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler.iter_from(0))
    batches = [b for _, b in zip(range(3), loader)]
    assert [b.long().tolist() for b in batches] == [sampler.batch_at(i) for i in range(3)]
