"""Fluent Speech Commands (Lugosch et al. 2019): spoken commands labelled with an intent,
the (action, object, location) triple, 31 intents, official train/valid/test split."""

from __future__ import annotations

import os

from .base import AudioDataset, Clip, DatasetDefaults, DatasetIndex, Split
from .protocols import SPLIT_NAMES, given_split

LICENCE_URL = "https://fluent.ai/fluent-speech-commands-a-dataset-for-spoken-language-understanding-research/"
INTENT_PARTS = ("action", "object", "location")


class FluentSpeechCommands(AudioDataset):
    name = "fsc"
    description = "Fluent Speech Commands: 30,043 utterances, 31 intents, official split"
    layout = """fluent_speech_commands_dataset/
  data/train_data.csv, data/valid_data.csv, data/test_data.csv
                  columns path,action,object,location (path relative to this folder)
  wavs/speakers/<speaker>/*.wav   16 kHz mono utterances
label: the intent "action|object|location"; the class list is the sorted intents of the
training split. protocol "default": the official split."""
    defaults = DatasetDefaults(max_frames=400, batch_size=32, epochs=75, specaugment=False, num_classes=31)

    @property
    def how_to_get(self) -> str:
        return (
            f"FSC requires accepting its licence: request it at {LICENCE_URL}, then unpack the archive "
            "so that the folder you pass contains data/ and wavs/ as shown"
        )

    def scan(self, root: str | os.PathLike) -> DatasetIndex:
        files = {split: f"data/{split}_data.csv" for split in SPLIT_NAMES}
        root = self.require(root, *files.values(), "wavs")
        rows = {split: self.read_csv(root, root / files[split], ("path", *INTENT_PARTS)) for split in SPLIT_NAMES}
        intents = {split: ["|".join(row[p] for p in INTENT_PARTS) for row in rows[split]] for split in SPLIT_NAMES}
        # Sorted training intents: the same label numbering on every run and machine.
        class_names = sorted(set(intents["train"]))
        ids = {intent: i for i, intent in enumerate(class_names)}
        clips = []
        for split in SPLIT_NAMES:
            unknown = sorted(set(intents[split]) - set(ids))
            if unknown:
                raise self.layout_error(root, f"{files[split]} has intents absent from training: {unknown}")
            clips += [Clip(str(root / row["path"]), ids[intent], split=split)
                      for row, intent in zip(rows[split], intents[split])]
        self.check_files(root, clips)
        return DatasetIndex(self.name, str(root), clips, class_names)

    def _splits(self, index: DatasetIndex, protocol: str) -> list[Split]:
        return [given_split(index)]
