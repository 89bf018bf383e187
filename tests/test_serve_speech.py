"""``serve`` and ``export`` on the speech encoders (wav2vec 2.0, HuBERT, WavLM).

A real server on 127.0.0.1 answers as ``predict`` does for adapters on a speech backbone;
the shared multi-LoRA pass pools with each backbone's padding mask; adapters for different
backbones are refused naming the file; ``export onnx`` takes the waveform frontend's rows
(``export peft`` of speech adapters: tests/test_export.py).
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from audio_fixtures import tone, write_audio
from serve_fixtures import FRAMES, METHODS, make_adapter, make_clips, run_both_engines, start_server, stop_server
from audiopetl.cli.main import main
from audiopetl.experiments.inference import predict_files
from audiopetl.petl import AdapterFileError, LoRAConfig, load_adapter
from audiopetl.serve import load_tasks

SPEECH_PRESETS = ["tiny-random-wav2vec2", "tiny-random-hubert", "tiny-random-wavlm", "tiny-random-wav2vec2-stable"]
MASKED = "tiny-random-wav2vec2-stable"  # the layout whose attention and pooling skip padding frames
SERVED = ("lora", "lora_wide", "adapter")


@pytest.fixture(scope="module")
def speech_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_speech")
    adapters = {name: make_adapter(folder / f"{name}.safetensors", METHODS[name], seed, backbone=MASKED)
                for seed, name in enumerate(SERVED)}
    clips = make_clips(folder / "clips")
    process, url = start_server([str(p) for p in adapters.values()], folder / "server.log", "--max-wait-ms", "5")
    try:
        yield url, adapters, clips
    finally:
        stop_server(process)


def test_speech_answers_equal_predict_for_every_task_and_file(speech_server):
    url, adapters, clips = speech_server
    assert httpx.get(f"{url}/v1/stats").json()["shared_lora_tasks"] == ["lora", "lora_wide"]
    for name, adapter in adapters.items():
        expected = predict_files(adapter, clips, top_k=3, device="cpu")
        for clip, record in zip(clips, expected):
            answer = httpx.post(f"{url}/v1/tasks/{name}/classify", params={"top_k": 3},
                                files={"file": (clip.name, clip.read_bytes())})
            assert answer.status_code == 200, answer.text
            got = answer.json()
            assert got["label"] == record["label"], (name, clip.name)
            assert [e["label"] for e in got["top_k"]] == [e["label"] for e in record["top_k"]]
            # 1e-5, not AST's 2e-6: predict runs the feature encoder's convolutions on all five clips
            # at once, the server on one; their features differ by ~2e-6 (kernel rounding), scores by ~1e-6.
            assert [e["score"] for e in got["top_k"]] == pytest.approx([e["score"] for e in record["top_k"]], abs=1e-5)
            assert got["truncated"] == (clip.name == "long.wav")
            if got["truncated"]:
                assert "3.00 s" in got["warning"] and f"{FRAMES} frames" in got["warning"]
    task = {t["name"]: t for t in httpx.get(f"{url}/v1/tasks").json()}["lora"]
    assert task["sample_rate"] == 16000 and task["max_seconds"] == FRAMES / 100


@pytest.mark.parametrize("backbone", SPEECH_PRESETS)
def test_shared_lora_pass_pools_with_the_backbones_own_mask(tmp_path, backbone):
    # Two clip lengths: tasks on one speech encoder may record different frontends (shapes).
    paths = {
        "lora": make_adapter(tmp_path / "lora.safetensors", METHODS["lora"], 0, backbone=backbone),
        "lora_wide": make_adapter(tmp_path / "lora_wide.safetensors", METHODS["lora_wide"], 1, backbone=backbone),
        "lora_short": make_adapter(tmp_path / "lora_short.safetensors", METHODS["lora"], 2, backbone=backbone,
                                   frames=FRAMES // 2),
        "adapter": make_adapter(tmp_path / "adapter.safetensors", METHODS["adapter"], 3, backbone=backbone),
    }
    tasks = load_tasks([f"{name}={path}" for name, path in paths.items()], torch.device("cpu"))
    waves = [torch.tensor(tone(f, s), dtype=torch.float32) for f, s in [(300, 0.3), (900, 0.8), (2000, 0.5), (500, 0.4), (700, 0.3)]]
    names = ["lora", "lora_wide", "lora_short", "adapter", "lora"]
    items = [(name, tasks[name].features(wave)) for name, wave in zip(names, waves)]
    if backbone == MASKED:  # short clips leave padding frames the mask must hide
        assert (items[0][1][0, :, -1] == 0).any()
    shared, per_task = run_both_engines(tasks, items)
    assert shared.passes == 3  # one shared pass per clip length, then the adapter task
    assert per_task.passes == 4


def test_adapters_for_different_backbones_are_refused_naming_the_file(tmp_path, capsys):
    speech = make_adapter(tmp_path / "speech.safetensors", LoRAConfig(reduction_rate=16), 0, backbone=MASKED)
    ast = make_adapter(tmp_path / "ast_lora.safetensors", LoRAConfig(reduction_rate=16), 0)
    hubert = make_adapter(tmp_path / "hubert_lora.safetensors", LoRAConfig(reduction_rate=16), 0,
                          backbone="tiny-random-hubert")
    for other in (ast, hubert):
        with pytest.raises(AdapterFileError, match=other.name):
            load_tasks([str(speech), str(other)], torch.device("cpu"))
    assert main(["serve", str(speech), str(hubert), "--port", "0"]) == 2
    assert "hubert_lora.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("backbone", SPEECH_PRESETS)
def test_onnx_export_of_a_speech_adapter_takes_the_frontend_rows(tmp_path, backbone):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    name = "lora" if backbone == MASKED else "adapter"
    adapter = make_adapter(tmp_path / f"{name}.safetensors", METHODS[name], 5, backbone=backbone)
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", str(adapter), str(out)]) == 0
    model = load_adapter(adapter).eval()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["audiopetl.frontend"])["kind"] == "waveform"
    frontend = model.backbone.frontend(FRAMES)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for seconds in ([0.4], [0.9, 0.3, 1.5]):  # batch sizes 1 and 3; short clips are padded (masked for MASKED)
        waves = [torch.tensor(tone(440 * (i + 1), s), dtype=torch.float32) for i, s in enumerate(seconds)]
        lengths = torch.tensor([len(w) for w in waves])
        features = frontend(torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), lengths=lengths)
        assert features.shape[1:] == frontend.feature_shape
        (logits,) = session.run(["logits"], {"features": features.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(features), atol=1e-3, rtol=0)


def test_uploaded_speech_clip_is_refused_when_silent(tmp_path):
    """Bad audio on a speech task is the same 4xx as on AST (decoding is shared)."""
    from fastapi.testclient import TestClient

    from audiopetl.serve import create_app

    adapter = make_adapter(tmp_path / "lora.safetensors", METHODS["lora"], 0, backbone=MASKED)
    tasks = load_tasks([str(adapter)], torch.device("cpu"))
    silent = write_audio(tmp_path / "zero.wav", np.zeros(8000), 16000).read_bytes()
    with TestClient(create_app(tasks)) as client:
        assert client.post("/v1/tasks/lora/classify", content=silent).json()["error"] == "bad_audio"
