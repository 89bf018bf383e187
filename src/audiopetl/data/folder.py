"""Your own data: a folder with one sub-folder per class, or a CSV manifest
`path,label[,split|fold]`. Without a split or fold column, a seeded stratified split is made."""

from __future__ import annotations

import os
from pathlib import Path

from .base import AudioDataset, Clip, DatasetDefaults, DatasetIndex, Split
from .protocols import given_split, rotation_splits, stratified_split

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au"}
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}


class FolderDataset(AudioDataset):
    name = "folder"
    description = "your own data: one sub-folder per class, or a CSV manifest path,label[,split|fold]"
    layout = """either a folder with one sub-folder per class (its name is the label):
  DATA/<class>/**/*.wav|flac|ogg|mp3|aiff|au   (sub-folders starting with "_" or "." are ignored)
or a CSV manifest file (pass the .csv itself):
  path,label[,split|fold]   path relative to the CSV's folder or absolute;
                            split: train/valid/test; fold: an integer
splits: the split column as given; with a fold column, one split per fold (test on K,
validate on the fold before it, train on the rest); otherwise a seeded stratified
80/10/10 split."""
    defaults = DatasetDefaults(max_frames=1024, batch_size=32, epochs=30, specaugment=False)

    def __init__(self, seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.1):
        self.seed = seed
        self.valid_fraction = valid_fraction
        self.test_fraction = test_fraction

    @property
    def how_to_get(self) -> str:
        return "arrange your files as shown, or write a manifest CSV"

    def scan(self, root: str | os.PathLike) -> DatasetIndex:
        root = Path(root)
        if root.is_file():
            return self._scan_manifest(root)
        root = self.require(root)
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        # Every audio-named entry is a clip, also a broken link or a folder named like audio:
        # the feature cache then reports it by path (stop, or skip with --skip-bad-audio).
        clips = [
            Clip(str(path), label)
            for label, name in enumerate(names)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in AUDIO_SUFFIXES
        ]
        if not clips:
            raise self.layout_error(root, "no class sub-folders with audio files found")
        empty = sorted(set(names) - {names[clip.label] for clip in clips})
        if empty:
            raise self.layout_error(
                root, f"class folder(s) {empty} hold no audio files; add audio, remove them, or start their "
                "names with '_' to ignore them"
            )
        return DatasetIndex(self.name, str(root), clips, names)

    def _scan_manifest(self, manifest: Path) -> DatasetIndex:
        rows = self.read_csv(manifest, manifest, ("path", "label"))
        has_split, has_fold = "split" in rows[0], "fold" in rows[0]
        if has_split and has_fold:
            raise self.layout_error(manifest, "give a split column or a fold column, not both")
        class_names = sorted({row["label"] for row in rows})
        ids = {name: i for i, name in enumerate(class_names)}
        clips = []
        for row in rows:
            clip = Clip(str(manifest.parent / row["path"]), ids[row["label"]])  # an absolute path stays as is
            if has_split:
                clip.split = SPLIT_ALIASES.get(row["split"].strip().lower())
                if clip.split is None:
                    raise self.layout_error(manifest, f"split {row['split']!r} is not one of {sorted(SPLIT_ALIASES)}")
            if has_fold:
                clip.fold = self.as_int(manifest, row["fold"], "fold")
            clips.append(clip)
        self.check_files(manifest, clips)
        return DatasetIndex(self.name, str(manifest), clips, class_names)

    def _splits(self, index: DatasetIndex, protocol: str) -> list[Split]:
        first = index.clips[0]
        if first.split is not None:
            return [given_split(index, name="given")]
        if first.fold is not None:
            return rotation_splits(index, sorted({clip.fold for clip in index.clips}))
        return [stratified_split(index, self.valid_fraction, self.test_fraction, self.seed)]
