"""Few-shot subsets (K per class, seeded, identical across methods) and on-the-fly SpecAugment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audiopetl.data import SpecAugment, few_shot_subset

# 50 classes x 24 clips, shuffled: an ESC-50-sized training pool.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(50), 24))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_few_shot_has_k_per_class_from_the_candidates(k):
    candidates = np.flatnonzero(np.arange(len(LABELS)) % 4 != 0)  # e.g. training rows only
    subset = few_shot_subset(LABELS, candidates, k, seed=0)
    assert np.isin(subset, candidates).all() and len(np.unique(subset)) == len(subset)
    assert np.bincount(LABELS[subset], minlength=50).tolist() == [k] * 50


def test_few_shot_is_deterministic_by_seed_and_not_first_k():
    candidates = np.arange(len(LABELS))
    draws = [few_shot_subset(LABELS, candidates, 8, seed=s) for s in (0, 0, 1, 2)]
    np.testing.assert_array_equal(draws[0], draws[1])  # same seed, e.g. another method
    np.testing.assert_array_equal(draws[0], few_shot_subset(LABELS, candidates[::-1].copy(), 8, seed=0))
    assert not np.array_equal(draws[0], draws[2]) and not np.array_equal(draws[2], draws[3])
    first_k = np.sort(np.concatenate([np.flatnonzero(LABELS == c)[:8] for c in range(50)]))
    assert not np.array_equal(draws[0], first_k)


def test_few_shot_smaller_k_is_nested_and_too_few_clips_fail():
    candidates = np.arange(len(LABELS))
    assert set(few_shot_subset(LABELS, candidates, 2, seed=3)) <= set(few_shot_subset(LABELS, candidates, 8, seed=3))
    with pytest.raises(ValueError, match="only 24 training clips, fewer than K=32"):
        few_shot_subset(LABELS, candidates, 32)
    with pytest.raises(ValueError, match="K must be >= 1"):
        few_shot_subset(LABELS, candidates, 0)


def band_widths(mask: torch.Tensor) -> list[int]:
    """Widths of the single contiguous True band of each row (0 when none)."""
    widths = []
    for row in mask:
        where = torch.nonzero(row).flatten()
        if len(where):
            assert where[-1] - where[0] + 1 == len(where), "mask is not one contiguous band"
        widths.append(len(where))
    return widths


def test_specaugment_masks_one_band_per_axis_within_limits():
    torch.manual_seed(0)
    features = torch.randn(64, 500, 128) + 5.0  # no value is 0 before masking
    original = features.clone()
    out = SpecAugment()(features)
    torch.testing.assert_close(features, original)  # input untouched
    assert out.shape == features.shape
    masked = out == 0
    unmasked = ~masked
    torch.testing.assert_close(out[unmasked], features[unmasked])
    time_rows = masked.all(dim=2)  # frames masked across every bin
    freq_rows = masked.all(dim=1)  # bins masked across every frame
    time_widths, freq_widths = band_widths(time_rows), band_widths(freq_rows)
    assert max(time_widths) <= 80 and max(freq_widths) <= 24
    assert len(set(time_widths)) > 10 and len(set(freq_widths)) > 10  # drawn per clip
    expected = time_rows[:, :, None] | freq_rows[:, None, :]
    assert torch.equal(masked, expected)


def test_specaugment_is_fresh_each_call_and_reproducible_with_a_generator():
    features = torch.ones(8, 100, 128)
    augment = SpecAugment(freq_mask=24, time_mask=80)
    first = augment(features, torch.Generator().manual_seed(1))
    again = augment(features, torch.Generator().manual_seed(1))
    other = augment(features, torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(SpecAugment(0, 0)(features), features)
    with pytest.raises(ValueError, match="batch, frames, mel bins"):
        augment(torch.ones(100, 128))
