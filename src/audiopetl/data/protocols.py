"""Split helpers shared by the dataset modules: fold rotations, an official split read from
each clip's `split`, and a seeded stratified split for data that comes without one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .base import DatasetIndex, Split

SPLIT_NAMES = ("train", "valid", "test")


def rotation_splits(index: DatasetIndex, folds: Sequence[int], validate: bool = True) -> list[Split]:
    """One split per fold, named `fold{K}`, testing on fold K.

    By default the fold just before K (cyclically) validates and the rest train, which is
    the paper's ESC-50 rotation (train 1,2,3 / valid 4 / test 5, then shifted by one).
    `validate=False` trains on every other fold and has no validation split: the published
    UrbanSound8K setup (9 training folds), which reports the last epoch.
    """
    folds = list(folds)
    minimum = 3 if validate else 2
    if len(folds) < minimum:
        raise ValueError(f"{index.name}: a fold rotation needs at least {minimum} folds, got {folds}")
    members: dict[int, list[int]] = defaultdict(list)
    for i, clip in enumerate(index.clips):
        members[clip.fold].append(i)
    empty = [fold for fold in folds if not members[fold]]
    if empty:
        raise ValueError(f"{index.name}: folds {empty} hold no clips")
    splits = []
    for position, test in enumerate(folds):
        valid = [folds[position - 1]] if validate else []
        train_folds = [fold for fold in folds if fold != test and fold not in valid]
        held_out = f"valid fold {valid[0]}" if validate else "no validation"
        splits.append(
            Split(
                name=f"fold{test}",
                train=[i for fold in train_folds for i in members[fold]],
                valid=[i for fold in valid for i in members[fold]],
                test=list(members[test]),
                description=f"train folds {train_folds}, {held_out}, test fold {test}",
            )
        )
    return splits


def given_split(index: DatasetIndex, name: str = "official") -> Split:
    """The split written in each clip's `split` ("train", "valid" or "test")."""
    parts: dict[str, list[int]] = {part: [] for part in SPLIT_NAMES}
    for i, clip in enumerate(index.clips):
        if clip.split not in parts:
            raise ValueError(
                f"{index.name}: clip {clip.path!r} has split {clip.split!r}; expected one of {SPLIT_NAMES}"
            )
        parts[clip.split].append(i)
    return Split(name, parts["train"], parts["valid"], parts["test"], description=f"{name} train/valid/test lists")


def stratified_split(
    index: DatasetIndex, valid_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> Split:
    """A seeded per-class split; each class with at least 3 clips gets >= 1 valid and test clip."""
    if not (0 < valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError(
            f"valid/test fractions must be positive and sum below 1, got {valid_fraction}, {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, clip in enumerate(index.clips):
        by_class[clip.label].append(i)
    train, valid, test = [], [], []
    for label in sorted(by_class):
        members = rng.permutation(by_class[label]).tolist()
        # Too few clips to hold any out: they all train (the class is then absent from valid/test).
        n_valid = max(1, round(len(members) * valid_fraction)) if len(members) >= 3 else 0
        n_test = max(1, round(len(members) * test_fraction)) if len(members) >= 3 else 0
        test += members[:n_test]
        valid += members[n_test : n_test + n_valid]
        train += members[n_test + n_valid :]
    return Split(
        "auto",
        sorted(train),
        sorted(valid),
        sorted(test),
        description=f"stratified {1 - valid_fraction - test_fraction:.0%}/{valid_fraction:.0%}/{test_fraction:.0%}"
        f" split, seed {seed}",
    )
