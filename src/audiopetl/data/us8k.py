"""UrbanSound8K (Salamon et al. 2014): 8,732 urban sound excerpts (<= 4 s), 10 classes,
10 predefined folds; files come at many sample rates, bit depths and channel counts."""

from __future__ import annotations

import os

from .base import AudioDataset, DatasetDefaults, DatasetIndex, Split, index_from_folded_csv
from .download import Source
from .protocols import rotation_splits

FOLDS = tuple(range(1, 11))


class UrbanSound8K(AudioDataset):
    name = "us8k"
    description = "UrbanSound8K: 8,732 urban sound clips (<= 4 s), 10 classes, 10 folds"
    layout = """UrbanSound8K/
  metadata/UrbanSound8K.csv   columns slice_file_name,fold,classID,class
  audio/fold1 .. audio/fold10 the clips, in the folder of their fold (any rate, depth, channels)
protocols (10-fold cross-validation; split foldK tests on fold K):
  "default":   validate on the fold before K (cyclically), train on the other 8
  "reference": the published code's setup: train on the other 9 folds, no validation
               split, so the run reports its last epoch (training.selection = last)"""
    defaults = DatasetDefaults(max_frames=400, batch_size=32, epochs=30, specaugment=True, num_classes=10)
    download = Source(
        url="https://zenodo.org/records/1203745/files/UrbanSound8K.tar.gz",
        folder="UrbanSound8K",
        archive_root="UrbanSound8K",
        md5="9aa69802bbf37fb986f71ec1483a196e",  # published on the Zenodo record
    )
    protocols = ("default", "reference")

    def scan(self, root: str | os.PathLike) -> DatasetIndex:
        root = self.require(root, "metadata/UrbanSound8K.csv", "audio")
        rows = self.read_csv(
            root, root / "metadata" / "UrbanSound8K.csv", ("slice_file_name", "fold", "classID", "class")
        )
        return index_from_folded_csv(
            self, root, rows, lambda row, fold: root / "audio" / f"fold{fold}" / row["slice_file_name"],
            "classID", "class", FOLDS,
        )

    def _splits(self, index: DatasetIndex, protocol: str) -> list[Split]:
        return rotation_splits(index, FOLDS, validate=protocol != "reference")
