"""What every dataset module shares: clips, splits, defaults, the `AudioDataset` base class
and the layout error that tells a user what was expected and how to get it."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from .download import Source


@dataclass
class Clip:
    """One labelled audio file; `split` / `fold` come from the dataset's own metadata."""

    path: str
    label: int
    split: str | None = None
    fold: int | None = None


@dataclass(frozen=True)
class DatasetDefaults:
    """Per-dataset training defaults (paper Sec. III-A and the reference hyper-parameters)."""

    max_frames: int
    batch_size: int
    epochs: int
    specaugment: bool
    num_classes: int | None = None  # None: depends on the data (own datasets)


@dataclass
class Split:
    """One train/valid/test partition, as indices into `DatasetIndex.clips`."""

    name: str
    train: list[int]
    valid: list[int]
    test: list[int]
    description: str = ""


@dataclass
class DatasetIndex:
    """The clips of a dataset found on disk, with label `i` named `class_names[i]`."""

    name: str
    root: str
    clips: list[Clip]
    class_names: list[str]

    @property
    def labels(self) -> list[int]:
        return [clip.label for clip in self.clips]


class DatasetLayoutError(ValueError):
    """A dataset folder that is missing or does not look like the dataset."""


class AudioDataset:
    """A dataset reader: `scan` finds and validates the files, `splits` applies a protocol.

    Subclasses set the class attributes and implement `scan` and `_splits`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    layout: ClassVar[str]  # shown by `audiopetl data info NAME` and in layout errors
    defaults: ClassVar[DatasetDefaults]
    download: ClassVar[Source | None] = None
    protocols: ClassVar[tuple[str, ...]] = ("default",)

    @property
    def how_to_get(self) -> str:
        if self.download is not None:
            return f"run `audiopetl data download {self.name} --to DIR` and pass DIR/{self.download.folder}"
        return "see `audiopetl data info " + self.name + "`"

    def scan(self, root: str | os.PathLike) -> DatasetIndex:
        raise NotImplementedError

    def splits(self, index: DatasetIndex, protocol: str = "default") -> list[Split]:
        """The protocol's train/valid/test partitions of `index`."""
        if protocol not in self.protocols:
            raise ValueError(f"unknown protocol {protocol!r} for {self.name}; valid: {list(self.protocols)}")
        return self._splits(index, protocol)

    def _splits(self, index: DatasetIndex, protocol: str) -> list[Split]:
        raise NotImplementedError

    # -- helpers for scan() -------------------------------------------------------------
    def layout_error(self, root: str | os.PathLike, problem: str) -> DatasetLayoutError:
        return DatasetLayoutError(
            f"{self.name}: {problem}\nexpected under {str(root)!r}:\n{self.layout}\nto get it: {self.how_to_get}"
        )

    def require(self, root: str | os.PathLike, *relative: str) -> Path:
        """`root` as a Path, after checking it and `root/relative...` exist."""
        root = Path(root)
        if not root.is_dir():
            raise self.layout_error(root, f"no such folder {str(root)!r}")
        missing = [name for name in relative if not (root / name).exists()]
        if missing:
            raise self.layout_error(root, f"missing {missing}")
        return root

    def read_csv(self, root: str | os.PathLike, path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
        """Rows of a metadata CSV, after checking it has `columns`."""
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            present = reader.fieldnames or []
        missing = [c for c in columns if c not in present]
        if missing:
            raise self.layout_error(root, f"{path.name} lacks columns {missing} (has {present})")
        if not rows:
            raise self.layout_error(root, f"{path.name} lists no clips")
        for line, row in enumerate(rows, start=2):  # line 1 is the header
            if any(row[c] is None for c in present):
                raise self.layout_error(
                    root, f"{path}, line {line}: too few fields ({len([v for v in row.values() if v is not None])} "
                    f"for the {len(present)} columns {present})"
                )
            empty = [c for c in columns if not row[c].strip()]
            if empty:
                raise self.layout_error(root, f"{path}, line {line}: empty {empty}")
        return rows

    def as_int(self, root: str | os.PathLike, value: str, what: str) -> int:
        try:
            return int(value)
        except ValueError:
            raise self.layout_error(root, f"{what} {value!r} is not an integer") from None

    def check_files(self, root: str | os.PathLike, clips: list[Clip]) -> None:
        """Fail if metadata names files that are not on disk (first few named)."""
        missing = [clip.path for clip in clips if not os.path.isfile(clip.path)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise self.layout_error(root, f"{len(missing)} audio files listed in the metadata are missing: {shown}")


def class_names_from_ids(dataset: AudioDataset, root: str | os.PathLike, pairs: set[tuple[int, str]]) -> list[str]:
    """Class names ordered by the ids a metadata file gives them, checked to be consistent."""
    names: dict[int, str] = {}
    for class_id, name in sorted(pairs):
        if names.setdefault(class_id, name) != name:
            raise dataset.layout_error(root, f"class id {class_id} is named both {names[class_id]!r} and {name!r}")
    if sorted(names) != list(range(len(names))) or len(set(names.values())) != len(names):
        raise dataset.layout_error(root, f"class ids are not a one-to-one 0..N-1 numbering: {names}")
    return [names[i] for i in range(len(names))]



def index_from_folded_csv(
    dataset: AudioDataset,
    root: Path,
    rows: list[dict[str, str]],
    path_of: Callable[[dict[str, str], int], Path],
    label_column: str,
    name_column: str,
    folds: tuple[int, ...],
) -> DatasetIndex:
    """A `DatasetIndex` from metadata rows with a fold, a numeric class id and a class name
    per clip (the ESC-50 and UrbanSound8K style); checks folds, ids and files."""
    clips, pairs = [], set()
    for row in rows:
        fold = dataset.as_int(root, row["fold"], "fold")
        if fold not in folds:
            raise dataset.layout_error(root, f"fold {fold} is not one of {list(folds)}")
        label = dataset.as_int(root, row[label_column], label_column)
        pairs.add((label, row[name_column]))
        clips.append(Clip(str(path_of(row, fold)), label, fold=fold))
    dataset.check_files(root, clips)
    return DatasetIndex(dataset.name, str(root), clips, class_names_from_ids(dataset, root, pairs))
