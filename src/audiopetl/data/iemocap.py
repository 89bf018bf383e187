"""IEMOCAP (Busso et al. 2008): acted dyadic sessions, 4-class speech emotion recognition.

Labels come from the per-dialog ``EmoEvaluation/*.txt`` files: every utterance line starts
with ``[START - END]`` followed by tab-separated utterance name, label and ``[V, A, D]``.
Four classes as in the paper's code base: neutral, happy (``exc``, excited, merged in),
sad, angry; every other label (frustration, surprise, ``xxx``...) is dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import AudioDataset, Clip, DatasetDefaults, DatasetIndex, Split

SESSIONS = (1, 2, 3, 4, 5)
CLASS_NAMES = ["neutral", "happy", "sad", "angry"]
LABELS = {"neu": 0, "hap": 1, "exc": 1, "sad": 2, "ang": 3}
GENDERS = ("F", "M")


def speaker_gender(utterance: str) -> str:
    """``Ses01F_impro01_M013`` -> ``M``: the first letter of the last part names the speaker."""
    return utterance.rsplit("_", 1)[-1][:1]


class IEMOCAP(AudioDataset):
    name = "iemocap"
    description = "IEMOCAP: 5 sessions of acted dialogs, 4 emotions (neutral, happy+excited, sad, angry)"
    layout = """IEMOCAP_full_release/
  Session1 .. Session5/
    dialog/EmoEvaluation/<dialog>.txt   one line per utterance:
        [START - END]<TAB><utterance><TAB><label><TAB>[V, A, D]
        (labels neu, hap, exc, sad, ang are kept, hap and exc as one class; others dropped)
    sentences/wav/<dialog>/<utterance>.wav   16 kHz mono
protocol "default" (the paper's code base): 10 splits; split sessionS-validG trains on the
other four sessions (both speakers), validates on session S's utterances spoken by gender G
and tests on those of the other gender; S runs 5, 1, 2, 3, 4 with G = F then M.
The corpus needs a licence and has no download helper: request it from USC SAIL,
https://sail.usc.edu/iemocap/ (release form), and pass the folder holding IEMOCAP_full_release."""
    defaults = DatasetDefaults(max_frames=800, batch_size=32, epochs=20, specaugment=False, num_classes=4)

    @property
    def how_to_get(self) -> str:
        return "request the licensed corpus from USC SAIL (https://sail.usc.edu/iemocap/); no download helper"

    def scan(self, root: str | os.PathLike) -> DatasetIndex:
        base = self.require(root, *(f"IEMOCAP_full_release/Session{s}/dialog/EmoEvaluation" for s in SESSIONS))
        corpus = base / "IEMOCAP_full_release"
        clips = []
        for session in SESSIONS:
            folder = corpus / f"Session{session}"
            # macOS copies of the corpus carry "._" resource-fork files beside each label file.
            label_files = sorted(p for p in (folder / "dialog" / "EmoEvaluation").glob("*.txt")
                                 if not p.name.startswith("._"))
            if not label_files:
                raise self.layout_error(root, f"no label files in {folder / 'dialog' / 'EmoEvaluation'}")
            for label_file in label_files:
                for utterance, label in self._read_labels(root, label_file):
                    if label not in LABELS:
                        continue
                    dialog = utterance.rsplit("_", 1)[0]
                    wav = folder / "sentences" / "wav" / dialog / f"{utterance}.wav"
                    clips.append(Clip(str(wav), LABELS[label], fold=session))
        if not clips:
            raise self.layout_error(root, f"no utterance carries one of the labels {sorted(LABELS)}")
        self.check_files(root, clips)
        return DatasetIndex(self.name, str(base), clips, list(CLASS_NAMES))

    def _read_labels(self, root: str | os.PathLike, path: Path) -> list[tuple[str, str]]:
        """(utterance, label) of every ``[START - END]`` line of one EmoEvaluation file."""
        pairs = []
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.startswith("["):
                    continue
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) < 3 or not fields[1].startswith("Ses"):
                    raise self.layout_error(
                        root, f"{path}:{number}: expected '[START - END]<TAB>utterance<TAB>label...', got {line!r}"
                    )
                if speaker_gender(fields[1]) not in GENDERS:
                    raise self.layout_error(root, f"{path}:{number}: cannot tell the speaker of {fields[1]!r}")
                pairs.append((fields[1], fields[2]))
        return pairs

    def _splits(self, index: DatasetIndex, protocol: str) -> list[Split]:
        splits = []
        for held_out in (5, 1, 2, 3, 4):
            train_sessions = [s for s in SESSIONS if s != held_out]
            held = [i for i, clip in enumerate(index.clips) if clip.fold == held_out]
            for valid_gender in GENDERS:
                test_gender = "M" if valid_gender == "F" else "F"
                by_gender = {
                    g: [i for i in held if speaker_gender(Path(index.clips[i].path).stem) == g] for g in GENDERS
                }
                splits.append(Split(
                    name=f"session{held_out}-valid{valid_gender}",
                    train=[i for i, clip in enumerate(index.clips) if clip.fold != held_out],
                    valid=by_gender[valid_gender],
                    test=by_gender[test_gender],
                    description=f"train sessions {train_sessions}, valid session {held_out} speaker {valid_gender}, "
                    f"test session {held_out} speaker {test_gender}",
                ))
        return splits
