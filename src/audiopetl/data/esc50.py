"""ESC-50 (Piczak 2015): 2,000 five-second environmental recordings, 50 classes, 5 folds."""

from __future__ import annotations

import os

from .base import AudioDataset, DatasetDefaults, DatasetIndex, Split, index_from_folded_csv
from .download import Source
from .protocols import rotation_splits

FOLDS = (1, 2, 3, 4, 5)


class ESC50(AudioDataset):
    name = "esc50"
    description = "ESC-50: 2,000 5-s environmental sound clips, 50 classes, 5 folds"
    layout = """ESC-50-master/
  meta/esc50.csv   columns filename,fold,target,category (target = class id 0-49)
  audio/*.wav      44.1 kHz mono 5-s clips named in esc50.csv
protocol "default": 5 rotations; split foldK tests on fold K, validates on the fold before
it (cyclically) and trains on the other three; fold5 is the paper's train 1,2,3 / valid 4 / test 5."""
    defaults = DatasetDefaults(max_frames=500, batch_size=32, epochs=50, specaugment=True, num_classes=50)
    # GitHub builds this zip on the fly from the master branch: no checksum or size is
    # published and its bytes may change, so it is verified by its layout only.
    download = Source(url="https://github.com/karoldvl/ESC-50/archive/master.zip", folder="ESC-50-master",
                      archive_root="ESC-50-master")

    def scan(self, root: str | os.PathLike) -> DatasetIndex:
        root = self.require(root, "meta/esc50.csv", "audio")
        rows = self.read_csv(root, root / "meta" / "esc50.csv", ("filename", "fold", "target", "category"))
        return index_from_folded_csv(
            self, root, rows, lambda row, fold: root / "audio" / row["filename"], "target", "category", FOLDS
        )

    def _splits(self, index: DatasetIndex, protocol: str) -> list[Split]:
        return rotation_splits(index, FOLDS)
