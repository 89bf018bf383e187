"""``audiopetl serve``: a real server on 127.0.0.1 with four adapters of three method families.

Answers must equal ``predict``'s for the same files; every bad input gets its 4xx with a
JSON error and the server keeps answering; the shared multi-LoRA pass gives each task's
own outputs; a bounded load test runs without errors.
"""

from __future__ import annotations

import asyncio
import re
import socket
import statistics
import time

import httpx
import numpy as np
import pytest
import torch

from audio_fixtures import noise, tone, write_audio
from serve_fixtures import (
    CLASSES, FRAMES, METHODS, make_adapter, make_adapters, make_clips, run_both_engines, start_server, stop_server,
)
from audiopetl.cli.main import main
from audiopetl.experiments.inference import predict_files
from audiopetl.frontend import load_audio
from audiopetl.petl import AdapterFileError, LoRAConfig, load_adapter
from audiopetl.serve import Engine, load_tasks
from audiopetl.serve.batching import Batcher
from audiopetl.train.precision import FAST_BF16_ENV

UPLOAD_LIMIT_MB = 1.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    adapters = make_adapters(folder)
    clips = make_clips(folder / "clips")
    specs = [str(path) for path in adapters.values()]
    process, url = start_server(specs, folder / "server.log", "--max-upload-mb", str(UPLOAD_LIMIT_MB),
                                "--max-wait-ms", "5")
    try:
        yield url, adapters, clips, folder
    finally:
        stop_server(process)


def alive(url: str, adapters: dict, clip) -> None:
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    answer = httpx.post(f"{url}/v1/tasks/lora/classify", content=clip.read_bytes())
    assert answer.status_code == 200 and answer.json()["label"]


def test_answers_equal_predict_for_every_task_and_file(served):
    url, adapters, clips, _ = served
    for name, adapter in adapters.items():
        expected = predict_files(adapter, clips, top_k=3, device="cpu")
        for clip, record in zip(clips, expected):
            if clip.suffix == ".wav":
                answer = httpx.post(f"{url}/v1/tasks/{name}/classify", params={"top_k": 3}, content=clip.read_bytes())
            else:
                answer = httpx.post(f"{url}/v1/tasks/{name}/classify", params={"top_k": 3},
                                    files={"file": (clip.name, clip.read_bytes())})
            assert answer.status_code == 200, answer.text
            got = answer.json()
            assert got["task"] == name
            assert got["path"] == (None if clip.suffix == ".wav" else clip.name)
            assert got["label"] == record["label"]
            assert [e["label"] for e in got["top_k"]] == [e["label"] for e in record["top_k"]]
            assert [e["score"] for e in got["top_k"]] == pytest.approx([e["score"] for e in record["top_k"]], abs=2e-6)
            assert got["truncated"] == (clip.name == "long.wav")
            assert (got["warning"] is not None) == got["truncated"]
    # Different methods really give different answers (so the comparison above can tell tasks apart).
    labels = {name: [r["label"] for r in predict_files(a, clips, device="cpu")] for name, a in adapters.items()}
    assert len({tuple(v) for v in labels.values()}) > 1


def test_task_list_health_and_openapi(served):
    url, adapters, _, _ = served
    tasks = httpx.get(f"{url}/v1/tasks").json()
    assert [t["name"] for t in tasks] == list(adapters)
    for task in tasks:
        model = load_adapter(adapters[task["name"]])
        assert task["classes"] == model.class_names
        assert task["trainable_parameters"] == model.num_trainable()
        assert task["method"] == "+".join(m.method for m in model.methods)
    assert httpx.get(f"{url}/readyz").json()["status"] == "ready"
    schema = httpx.get(f"{url}/openapi.json").json()
    body = schema["paths"]["/v1/tasks/{task}/classify"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "audio/wav" in body
    assert "/v1/tasks" in schema["paths"] and "/healthz" in schema["paths"]
    assert httpx.get(f"{url}/v1/stats").json()["shared_lora_tasks"] == ["lora", "lora_wide"]


def test_pages_reference_only_the_server_itself(served):
    """What the pages load (scripts, styles, icons) comes from the server: no CDN, so they work offline."""
    url = served[0]
    for page in ("/", "/docs", "/docs/oauth2-redirect"):
        html = httpx.get(url + page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert re.findall(r"(?:\w+:|[\"'(])//[^\s\"'<>)]*", html.text) == [], page  # no absolute URL
    html = httpx.get(f"{url}/docs").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert len(assets) == 4, assets  # Swagger UI's script and style sheet, the favicon, the schema
    for asset in assets:
        answer = httpx.get(url + asset)
        assert answer.status_code == 200 and int(answer.headers["content-length"]) > 100, asset
    assert httpx.get(f"{url}/redoc").status_code == 404  # ReDoc loads its logo from a CDN: not served


def bad_inputs(folder):
    nan = np.array(tone(440, 0.5))
    nan[100:200] = np.nan
    big = write_audio(folder / "big.wav", tone(300, 12.0, sr=48000), 48000, channels=2)  # ~2.3 MB
    assert big.stat().st_size > UPLOAD_LIMIT_MB * 1e6
    chunked = iter([big.read_bytes()[i : i + 65536] for i in range(0, big.stat().st_size, 65536)])
    return {
        "empty body": ("lora", {"content": b""}, 400, "empty_body"),
        "multipart without file": ("lora", {"files": {"other": ("x.wav", b"abc")}}, 400, "missing_file"),
        "not audio": ("adapter", {"content": b"this is not a sound file at all" * 10}, 415, "not_audio"),
        "NaN samples": ("lora", {"content": write_audio(folder / "nan.wav", nan, 16000, subtype="FLOAT").read_bytes()},
                        422, "bad_audio"),
        "silent": ("lora", {"content": write_audio(folder / "zero.wav", np.zeros(8000), 16000).read_bytes()},
                   422, "bad_audio"),
        "unknown task": ("nope", {"content": b"RIFF"}, 404, "unknown_task"),
        "over the size limit": ("lora", {"content": big.read_bytes()}, 413, "too_large"),
        "over the size limit, streamed": ("lora", {"content": chunked}, 413, "too_large"),
        "top_k below 1": ("lora", {"content": b"RIFF", "params": {"top_k": 0}}, 422, "invalid_request"),
    }


def test_each_bad_input_gets_its_4xx_and_the_server_keeps_answering(served):
    url, adapters, clips, folder = served
    for case, (task, request, status, code) in bad_inputs(folder).items():
        answer = httpx.post(f"{url}/v1/tasks/{task}/classify", **request)
        assert answer.status_code == status, (case, answer.text)
        body = answer.json()
        assert body["error"] == code and body["message"], case
        alive(url, adapters, clips[0])
    assert "tmp" not in httpx.post(f"{url}/v1/tasks/lora/classify", content=b"junk" * 100).json()["message"]
    assert httpx.get(f"{url}/no/such/route").json()["error"] == "not_found"


def test_long_clip_is_truncated_as_in_training_and_says_so(served):
    url, _, clips, _ = served
    long = next(c for c in clips if c.name == "long.wav")
    answer = httpx.post(f"{url}/v1/tasks/adapter/classify", files={"file": (long.name, long.read_bytes())}).json()
    assert answer["truncated"] is True
    assert "3.00 s" in answer["warning"] and f"{FRAMES} frames" in answer["warning"]


def test_load_is_served_without_errors(served, capsys):
    """Bounded: 400 requests, 32 at a time, on loopback; prints latency and throughput."""
    url, adapters, clips, _ = served
    payloads = [clip.read_bytes() for clip in clips[:4]]
    names = list(adapters)
    before = httpx.get(f"{url}/v1/stats").json()

    async def run() -> tuple[list[float], list[int], float]:
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def one(i: int) -> tuple[float, int]:
                async with limit:
                    start = time.perf_counter()
                    answer = await client.post(f"/v1/tasks/{names[i % len(names)]}/classify",
                                               content=payloads[i % len(payloads)])
                    return time.perf_counter() - start, answer.status_code

            start = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(400)))
            return [r[0] for r in results], [r[1] for r in results], time.perf_counter() - start

    latencies, statuses, elapsed = asyncio.run(run())
    assert statuses == [200] * 400
    after = httpx.get(f"{url}/v1/stats").json()
    assert after["samples"] - before["samples"] == 400
    ms = sorted(1000 * t for t in latencies)
    with capsys.disabled():  # shown in every run's log, not only on failure
        print(f"\nload test: 400 requests, 32 concurrent: p50 {statistics.median(ms):.1f} ms, "
              f"p99 {ms[int(0.99 * len(ms)) - 1]:.1f} ms, {400 / elapsed:.1f} requests/s, "
              f"{(after['samples'] - before['samples']) / max(1, after['batches'] - before['batches']):.1f} clips/batch")


# ------------------------------------------------------------------ in-process: the engine and the batcher
@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    return load_tasks([f"{name}={path}" for name, path in make_adapters(folder).items()], torch.device("cpu"))


def mixed_batch(tasks) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    names = ["lora", "adapter", "lora_wide", "lora", "prompt_bitfit", "lora_wide", "adapter"]
    return [(name, torch.randn(1, FRAMES, 128, generator=generator)) for name in names]


def test_shared_lora_pass_gives_each_task_its_own_outputs(tasks):
    items = mixed_batch(tasks)
    shared, per_task = run_both_engines(tasks, items)
    assert shared.passes == 3  # both LoRA tasks in one pass, then adapter and prompt_bitfit
    assert per_task.passes == 4


def test_tasks_share_the_frozen_backbone_weights(tasks):
    weights = {id(t.model.backbone.blocks[0].mlp.fc2.weight) for t in tasks.values()}
    assert len(weights) == 1
    norms = {id(t.model.backbone.norm.weight) for t in tasks.values()}
    assert len(norms) == len(tasks)  # each task trains its own final LayerNorm


def test_concurrent_requests_are_batched(tasks):
    items = mixed_batch(tasks)
    engine = Engine(tasks)

    async def run():
        batcher = Batcher(engine, max_batch=len(items), max_wait_ms=60_000)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(name, f) for name, f in items)), batcher.batches
        finally:
            await batcher.stop()

    results, batches = asyncio.run(run())
    assert batches == 1 and engine.passes == 3 and len(results) == len(items)


def test_each_task_runs_in_the_precision_its_file_records(tmp_path):
    # `train` records bf16 on machines with fast bf16, and `predict` runs such files under bf16
    # autocast: the server must too, also when fp32 and bf16 LoRA tasks are batched together.
    torch.manual_seed(0)  # make_adapter's new layers start from the global generator
    specs = []
    for seed, name in enumerate(("lora", "lora_wide", "adapter")):
        path = make_adapter(tmp_path / f"{name}.safetensors", METHODS[name], seed)
        bf16 = load_adapter(path).save_adapter(tmp_path / f"{name}_bf16.safetensors", {"precision": "bf16"})
        specs.append(f"{name}_bf16={bf16}")
    specs.insert(0, f"lora={tmp_path / 'lora.safetensors'}")  # lora_bf16's weights, recorded as fp32
    tasks = load_tasks(specs, torch.device("cpu"))
    clip = write_audio(tmp_path / "clip.wav", tone(440, 0.8) + noise(0.8, seed=3), 16000)
    features = tasks["lora"].features(torch.from_numpy(load_audio(clip, sample_rate=16000)))
    expected = {}
    for name, task in tasks.items():
        ranked = predict_files(task.path, [clip], top_k=len(CLASSES), device="cpu")[0]["top_k"]
        scores = {e["label"]: e["score"] for e in ranked}
        expected[name] = [scores[c] for c in CLASSES]
    per_task, shared = Engine(tasks, "per-task"), Engine(tasks, "shared")
    got = dict(zip(tasks, per_task.run([(name, features) for name in tasks])))
    for name in tasks:
        assert got[name].tolist() == pytest.approx(expected[name], abs=2e-6), name
    # The shared pass adds the stacked low-rank updates in another order, which bf16 rounds
    # differently: bf16 tolerance there (fp32 and bf16 differ by far more, see below).
    together = dict(zip(tasks, shared.run([(name, features) for name in tasks])))
    assert shared.passes == 3  # the fp32 LoRA task, both bf16 LoRA tasks in one pass, the bf16 adapter
    for name in tasks:
        tolerance = 2e-6 if name == "lora" else 1e-2
        assert together[name].tolist() == pytest.approx(expected[name], abs=tolerance), name
    # Run in fp32, the bf16 tasks answer measurably otherwise: the comparisons above tell them apart.
    with torch.no_grad():
        fp32 = [tasks[name].model(features).softmax(-1)[0] - got[name] for name in tasks if name != "lora"]
    assert max(float(d.abs().max()) for d in fp32) > 1e-4


def served_scores(url: str, task: str, clips: list) -> list[dict[str, float]]:
    scores = []
    for clip in clips:
        answer = httpx.post(f"{url}/v1/tasks/{task}/classify", params={"top_k": len(CLASSES)},
                            content=clip.read_bytes())
        assert answer.status_code == 200, answer.text
        scores.append({e["label"]: e["score"] for e in answer.json()["top_k"]})
    return scores


def predicted_scores(adapter, clips: list) -> list[dict[str, float]]:
    return [{e["label"]: e["score"] for e in record["top_k"]}
            for record in predict_files(adapter, clips, top_k=len(CLASSES), device="cpu")]


def test_serve_runs_the_recorded_precision_unless_told_otherwise(tmp_path, monkeypatch):
    # On a machine that multiplies bf16 fast (forced here), where `train` records bf16.
    monkeypatch.setenv(FAST_BF16_ENV, "1")
    fp32 = make_adapter(tmp_path / "fp32.safetensors", METHODS["adapter"], seed=2)
    bf16 = load_adapter(fp32).save_adapter(tmp_path / "bf16.safetensors", {"precision": "bf16"})  # same weights
    clips = [c for c in make_clips(tmp_path / "clips") if c.suffix == ".wav"]
    expected = {"bf16": predicted_scores(bf16, clips), "fp32": predicted_scores(fp32, clips)}
    # The two precisions answer measurably otherwise, so the comparisons below tell them apart.
    assert max(abs(a[c] - b[c]) for a, b in zip(expected["bf16"], expected["fp32"]) for c in CLASSES) > 1e-4
    for flags, precision, tolerance in (((), "bf16", 2e-6), (("--precision", "fp32"), "fp32", 1e-5)):
        process, url = start_server([f"task={bf16}"], tmp_path / f"{precision}.log", *flags)
        try:
            got = served_scores(url, "task", clips)
        finally:
            stop_server(process)
        for served, predicted in zip(got, expected[precision]):
            assert [served[c] for c in CLASSES] == pytest.approx([predicted[c] for c in CLASSES], abs=tolerance)
    # auto resolves against this hardware as `train` does; an unknown name is refused.
    assert load_tasks([str(fp32)], torch.device("cpu"), "auto")["fp32"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="recorded"):
        load_tasks([str(fp32)], torch.device("cpu"), "fp16")


def test_adapters_for_another_backbone_are_refused_naming_the_file(tmp_path, capsys):
    good = make_adapter(tmp_path / "good.safetensors", LoRAConfig(reduction_rate=16), seed=0)
    other = tmp_path / "other_frames.safetensors"
    from audiopetl.backbone import load_backbone
    from audiopetl.frontend import FbankConfig
    from audiopetl.petl import build_model

    model = build_model(load_backbone("tiny-random", max_frames=2 * FRAMES), LoRAConfig(reduction_rate=16), num_classes=2,
                        class_names=["a", "b"], metadata={"frontend": FbankConfig(max_frames=2 * FRAMES).to_dict()})
    model.save_adapter(other)
    with pytest.raises(AdapterFileError, match="other_frames.safetensors"):
        load_tasks([str(good), str(other)], torch.device("cpu"))
    assert main(["serve", str(good), f"x={other}", "--port", "0"]) == 2
    assert "other_frames.safetensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="given twice"):
        load_tasks([str(good), f"good={other}"], torch.device("cpu"))


def test_a_taken_or_invalid_port_fails_before_any_model_loads(tmp_path, capsys):
    unreadable = tmp_path / "broken.safetensors"  # would fail loading: the port must fail first
    unreadable.write_bytes(b"not an adapter")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["serve", str(unreadable), "--port", str(taken.getsockname()[1])]) == 2
    assert "choose another --port" in capsys.readouterr().err
    assert main(["serve", str(unreadable), "--port", "70000"]) == 2
    assert "--port must be 0-65535" in capsys.readouterr().err


def test_a_real_fault_is_a_logged_500_and_the_server_keeps_answering(tmp_path, caplog):
    from fastapi.testclient import TestClient

    from audiopetl.serve import create_app

    adapters = make_adapters(tmp_path)
    tasks = load_tasks([f"{name}={path}" for name, path in adapters.items()], torch.device("cpu"))
    clip = write_audio(tmp_path / "clip.wav", tone(500, 0.5), 16000).read_bytes()
    broken = tasks["adapter"].model

    def fault(features):  # a model that breaks at run time, as a driver or out-of-memory error would
        raise RuntimeError("simulated device failure")

    broken.forward = fault
    # In a batch mixing tasks, the failing pass fails its own requests only.
    features = torch.zeros(1, FRAMES, 128)
    failed, fine = Engine(tasks).run([("adapter", features), ("lora", features)])
    assert isinstance(failed, RuntimeError) and isinstance(fine, torch.Tensor)
    with TestClient(create_app(tasks), raise_server_exceptions=False) as client:
        answer = client.post("/v1/tasks/adapter/classify", content=clip)
        assert answer.status_code == 500
        assert answer.json()["error"] == "internal" and "RuntimeError" in answer.json()["message"]
        assert "simulated device failure" in caplog.text  # the traceback is in the log, not in the answer
        assert "simulated" not in answer.text
        assert client.post("/v1/tasks/lora/classify", content=clip).status_code == 200
