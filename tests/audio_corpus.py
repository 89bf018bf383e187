"""A corpus of broken and odd-but-valid audio files, as real collections hold them.

`write_corpus(folder)` returns ``(broken, valid)``: path -> what it is. Broken files must be
reported by path by every command; valid ones must load.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from audio_fixtures import speech_like, write_audio


def write_corpus(folder: str | Path, rate: int = 16000) -> tuple[dict[str, str], dict[str, str]]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip = speech_like(0.5, rate, seed=7)
    broken: dict[str, str] = {}
    valid: dict[str, str] = {}

    def bad(name: str, kind: str) -> Path:
        broken[str(folder / name)] = kind
        return folder / name

    def good(name: str, kind: str) -> Path:
        valid[str(folder / name)] = kind
        return folder / name

    full = write_audio(folder / "_full.tmpwav", clip, rate, format="WAV").read_bytes()
    bad("empty.wav", "empty file").write_bytes(b"")
    bad("cut_header.wav", "header cut off").write_bytes(full[:20])
    bad("header_only.wav", "header without samples").write_bytes(full[:44])
    bad("text.wav", "text with an audio extension").write_text("this is not audio\n")
    bad("random.flac", "random bytes named .flac").write_bytes(np.random.default_rng(0).bytes(4096))
    nan = clip.copy()
    nan[100] = np.nan
    write_audio(bad("nan.wav", "NaN sample"), nan, rate, subtype="FLOAT")
    inf = clip.copy()
    inf[50] = np.inf
    write_audio(bad("inf.wav", "infinite sample"), inf, rate, subtype="FLOAT")
    write_audio(bad("silent.wav", "all zeros"), np.zeros(rate // 2, np.float32), rate)
    os.symlink(folder / "gone.wav", bad("dangling.wav", "broken symbolic link"))
    bad("folder.wav", "folder named like audio").mkdir()
    good("data_cut.wav", "data cut off mid-way (header claims more)").write_bytes(full[: len(full) // 2 + 1])
    (folder / "_full.tmpwav").unlink()

    write_audio(good("pcm24.wav", "24-bit PCM"), clip, rate, subtype="PCM_24")
    write_audio(good("pcm_u8.wav", "8-bit unsigned PCM"), clip, rate, subtype="PCM_U8")
    write_audio(good("float32.wav", "32-bit float"), clip, rate, subtype="FLOAT")
    write_audio(good("rate8k.wav", "8 kHz"), speech_like(0.5, 8000, seed=8), 8000)
    write_audio(good("rate44k.wav", "44.1 kHz"), speech_like(0.5, 44100, seed=9), 44100)
    write_audio(good("stereo.wav", "2 channels"), clip, rate, channels=2)
    write_audio(good("six_channels.wav", "6 channels"), clip, rate, channels=6)
    write_audio(good("clip.flac", "FLAC"), clip, rate, subtype="PCM_16")
    write_audio(good("clip.ogg", "OGG Vorbis"), clip, rate, subtype="VORBIS")
    write_audio(good("long.wav", "60 s clip"), speech_like(60.0, rate, seed=10), rate)
    write_audio(good("tiny.wav", "10 samples"), clip[1000:1010], rate)
    write_audio(good("UPPER.WAV", "upper-case extension"), clip, rate)
    write_audio(good("flac_named.wav", "FLAC content named .wav"), clip, rate, format="FLAC")
    write_audio(good("_target.flac", "target of the link"), clip, rate)
    os.symlink(folder / "_target.flac", good("link.flac", "symbolic link to a file"))
    return broken, valid
