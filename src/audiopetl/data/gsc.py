"""Google Speech Commands V2 (Warden 2018): 1-s recordings of 35 words with the official
train/valid/test split given by `validation_list.txt` and `testing_list.txt`."""

from __future__ import annotations

import os

from .base import AudioDataset, Clip, DatasetDefaults, DatasetIndex, Split
from .download import Source
from .protocols import given_split

# The 35 words of v0.02, in label order; v0.01 lacks five of them.
WORDS = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
    "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
    "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero",
)


class SpeechCommands(AudioDataset):
    name = "gsc"
    description = "Speech Commands V2: 105,829 1-s recordings of 35 keywords, official split"
    layout = """speech_commands_v0.02/
  <word>/*.wav           one folder per word, 35 words (16 kHz mono 1-s clips)
  validation_list.txt    <word>/<file>.wav per line: the validation split
  testing_list.txt       <word>/<file>.wav per line: the test split (all other clips train)
  _background_noise_/    long noise recordings, not a class (ignored)
protocol "default": the official split."""
    defaults = DatasetDefaults(max_frames=100, batch_size=128, epochs=75, specaugment=False, num_classes=35)
    download = Source(
        url="http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
        folder="speech_commands_v0.02",
        # sha256 as listed by torchaudio's SPEECHCOMMANDS dataset for this URL.
        sha256="af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58",
    )

    def scan(self, root: str | os.PathLike) -> DatasetIndex:
        root = self.require(root, "validation_list.txt", "testing_list.txt", *WORDS)
        folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
        extra = sorted(folders - set(WORDS))
        if extra:
            raise self.layout_error(root, f"unexpected word folders {extra} (V2 has exactly the 35 words listed)")
        listed = {}
        for split, list_name in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
            for line in (root / list_name).read_text().split():
                listed[line] = split
        clips = []
        for label, word in enumerate(WORDS):
            for path in sorted((root / word).glob("*.wav")):
                relative = f"{word}/{path.name}"
                clips.append(Clip(str(path), label, split=listed.pop(relative, "train")))
        if listed:
            stray = sorted(listed)
            raise self.layout_error(root, f"{len(stray)} files in the split lists are not on disk, e.g. {stray[:5]}")
        return DatasetIndex(self.name, str(root), clips, list(WORDS))

    def _splits(self, index: DatasetIndex, protocol: str) -> list[Split]:
        return [given_split(index)]
