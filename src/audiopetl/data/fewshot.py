"""Few-shot training subsets: K clips per class drawn with a seed (paper Table II).

The draw depends only on the labels, the candidate set and the seed, so every method in a
sweep trains on the same clips; and for one seed a smaller K is a subset of a larger K.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def few_shot_subset(labels: Sequence[int] | np.ndarray, indices: Sequence[int] | np.ndarray, k: int,
                    seed: int = 0) -> np.ndarray:
    """`k` indices per class, drawn from `indices` (positions into `labels`), sorted."""
    if k < 1:
        raise ValueError(f"few-shot K must be >= 1, got {k}")
    labels = np.asarray(labels)
    candidates = np.unique(np.asarray(indices, dtype=np.int64))  # sorted: input order must not matter
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels[candidates]):
        members = candidates[labels[candidates] == label]
        if len(members) < k:
            raise ValueError(f"class {int(label)} has only {len(members)} training clips, fewer than K={k}")
        # A full permutation (not choice(k)) so the draw for each class is the same for every K.
        chosen.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
