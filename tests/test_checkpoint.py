"""load_backbone: checkpoint formats, position-table adaptation, errors, fingerprints."""

from __future__ import annotations

import json
import logging
import re

import httpx2
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import ASTModel

from audiopetl.backbone import (
    CheckpointError,
    adapt_pos_embed,
    backbone_fingerprint,
    fingerprint_state_dict,
    load_backbone,
)
from audiopetl.backbone import checkpoint as checkpoint_module
from checkpoint_fixtures import (
    features,
    hf_hidden,
    random_hf_model,
    save_tiny_hf_checkpoint,
    tiny_ast_config,
    tiny_original_state_dict,
)


def hidden(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_same_outputs(ours, reference: ASTModel, frames: int) -> None:
    x = features(2, frames)
    torch.testing.assert_close(hidden(ours, x), hf_hidden(reference, x), atol=1e-4, rtol=0)


# --- formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, weights_file",
    [
        (dict(), "model.safetensors"),  # classic names, as on the hub
        (dict(new_names=True), "model.safetensors"),  # transformers 5 in-memory names
        (dict(safetensors=False), "pytorch_model.bin"),
        (dict(classification=True), "model.safetensors"),  # audio_spectrogram_transformer. prefix + head
    ],
)
def test_transformers_checkpoints_load_with_identical_outputs(tmp_path, kind, weights_file, caplog):
    directory = save_tiny_hf_checkpoint(tmp_path, **kind)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", weights_file]
    keys = list(load_file(directory / weights_file)) if weights_file.endswith("safetensors") else list(
        torch.load(directory / weights_file, weights_only=True)
    )
    classic = "encoder.layer.0.attention.attention.query.weight"
    assert any(k.endswith(classic) for k in keys) != kind.get("new_names", False)

    with caplog.at_level(logging.INFO, logger="audiopetl.backbone.checkpoint"):
        ours = load_backbone(directory)
    reference = ASTModel.from_pretrained(directory, attn_implementation="eager").eval()
    assert_same_outputs(ours, reference, frames=100)

    report = ours.load_report
    assert ours.source == str(directory) == report.source
    assert report.files == (str(directory / weights_file), str(directory / "config.json"))
    assert report.checkpoint_format == "transformers"
    assert report.checkpoint_grid == report.grid == (12, 9)
    expected_ignored = [k for k in keys if k.startswith("classifier.")]
    assert sorted(report.ignored_keys) == sorted(expected_ignored)
    assert bool(expected_ignored) == kind.get("classification", False)
    assert all(k in caplog.text for k in expected_ignored)


def test_single_safetensors_file_infers_config(tmp_path):
    directory = save_tiny_hf_checkpoint(tmp_path, max_length=1024)
    ours = load_backbone(directory / "model.safetensors", num_heads=4)
    assert ours.config == load_backbone(directory).config
    assert_same_outputs(ours, ASTModel.from_pretrained(directory).eval(), frames=1024)


def test_original_release_layout_loads_with_identical_outputs(tmp_path):
    # The release runs timm's LayerNorm (eps 1e-6) on a 12 x 101 grid (1024 frames).
    reference = random_hf_model(tiny_ast_config(max_length=1024, layer_norm_eps=1e-6))
    path = tmp_path / "audioset_10_10_0.4593.pth"
    torch.save(tiny_original_state_dict(reference), path)

    ours = load_backbone(path, num_heads=4)
    assert_same_outputs(ours, reference, frames=1024)
    config = ours.config
    assert (config.max_frames, config.grid, config.num_layers, config.mlp_size) == (1024, (12, 101), 2, 64)
    assert config.layer_norm_eps == 1e-6
    report = ours.load_report
    assert report.checkpoint_format == "original" and report.files == (str(path),)
    assert sorted(report.ignored_keys) == sorted(
        f"module.{k}.{leaf}"
        for k in ("mlp_head.0", "mlp_head.1", "v.head", "v.head_dist")
        for leaf in ("weight", "bias")
    )


def test_original_layout_infers_vit_b_heads(tmp_path):
    reference = random_hf_model(
        tiny_ast_config(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=1,
                        max_length=1024, layer_norm_eps=1e-6)
    )
    path = tmp_path / "ast.pth"
    torch.save(tiny_original_state_dict(reference), path)
    ours = load_backbone(path, max_frames=100)
    assert ours.config.num_heads == 12 and ours.config.max_frames == 100


def test_original_layout_needs_num_heads_for_odd_widths(tmp_path):
    path = tmp_path / "ast.pth"
    torch.save(tiny_original_state_dict(random_hf_model(tiny_ast_config(max_length=1024))), path)
    with pytest.raises(CheckpointError, match=r"ast\.pth.*head count of hidden size 32; pass num_heads"):
        load_backbone(path)


def test_tiny_random_preset_and_our_own_state_dicts(tmp_path):
    tiny = load_backbone("tiny-random")
    path = tmp_path / "ours.pt"
    torch.save(tiny.state_dict(), path)
    again = load_backbone(path, num_heads=tiny.config.num_heads)
    assert again.load_report.checkpoint_format == "audiopetl"
    assert again.load_report.fingerprint == tiny.load_report.fingerprint
    x = features(1, tiny.config.max_frames)
    torch.testing.assert_close(hidden(again, x), hidden(tiny, x))


# --- hub -------------------------------------------------------------------------------


def fake_hub(monkeypatch, served_dir, requests):
    """Route hf_hub_download to a local folder, recording the requested files."""

    def download(repo_id, filename, revision=None, cache_dir=None):
        requests.append((repo_id, filename, revision, cache_dir))
        if not (served_dir / filename).exists():
            response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/{filename}"))
            raise RemoteEntryNotFoundError(f"{filename} not found", response=response)
        return str(served_dir / filename)

    monkeypatch.setattr(checkpoint_module, "hf_hub_download", download)


@pytest.mark.parametrize("safetensors", [True, False])
def test_hub_fetches_only_config_and_one_weights_file(tmp_path, monkeypatch, safetensors):
    directory = save_tiny_hf_checkpoint(tmp_path / "repo", safetensors=safetensors, classification=True)
    requests = []
    fake_hub(monkeypatch, directory, requests)
    repo = "MIT/ast-finetuned-audioset-10-10-0.4593"  # the dots must not read as a file suffix
    ours = load_backbone(repo, revision="abc", cache_dir=tmp_path / "cache")
    fetched = [r[1] for r in requests]
    # model.safetensors is tried first; a 404 falls back to pytorch_model.bin.
    expected = ["config.json", "model.safetensors"] + ([] if safetensors else ["pytorch_model.bin"])
    assert fetched == expected
    assert all(r[0] == repo and r[2] == "abc" and r[3] == tmp_path / "cache" for r in requests)
    assert ours.source == repo
    assert_same_outputs(ours, ASTModel.from_pretrained(directory).eval(), frames=100)


def test_hub_failures_are_checkpoint_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setattr(checkpoint_module, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match=r"'someone/missing' is not a local file.*cannot reach huggingface.co"):
        load_backbone("someone/missing")


# --- position embeddings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def audioset_like(tmp_path_factory):
    """A tiny checkpoint with the AudioSet grid (12 x 101, 1024 frames)."""
    directory = save_tiny_hf_checkpoint(tmp_path_factory.mktemp("audioset"), max_length=1024)
    table = load_file(directory / "model.safetensors")["embeddings.position_embeddings"]
    return directory, table


def test_shorter_clips_keep_the_middle_time_columns(audioset_like):
    directory, table = audioset_like
    ours = load_backbone(directory, max_frames=500)
    assert ours.config.grid == (12, 49) and ours.load_report.grid == (12, 49)
    plane = table[0, 2:].T.reshape(32, 12, 101)
    start = 101 // 2 - 49 // 2  # 26, as the original AST code: 50 - int(49 / 2)
    expected = plane[:, :, start : start + 49]
    got = ours.pos_embed.detach()
    torch.testing.assert_close(got[0, :2], table[0, :2], rtol=0, atol=0)
    torch.testing.assert_close(got[0, 2:].T.reshape(32, 12, 49), expected, rtol=0, atol=0)
    # Patch (f, t) of the new grid carries the old table's patch (f, t + 26).
    torch.testing.assert_close(got[0, 2 + 3 * 49 + 5], table[0, 2 + 3 * 101 + 5 + 26], rtol=0, atol=0)


def test_longer_clips_interpolate_bilinearly(audioset_like):
    directory, table = audioset_like
    ours = load_backbone(directory, max_frames=1200)  # 119 time columns
    plane = table[:, 2:].transpose(1, 2).reshape(1, 32, 12, 101)
    expected = F.interpolate(plane, size=(12, 119), mode="bilinear")
    got = ours.pos_embed.detach()[:, 2:].transpose(1, 2).reshape(1, 32, 12, 119)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours.pos_embed.detach()[:, :2], table[:, :2], rtol=0, atol=0)


def test_frequency_axis_cut_and_interpolation():
    table = torch.randn(1, 2 + 12 * 9, 8)
    plane = table[:, 2:].transpose(1, 2).reshape(1, 8, 12, 9)
    cut = adapt_pos_embed(table, (12, 9), (5, 9))
    torch.testing.assert_close(cut[:, 2:].transpose(1, 2).reshape(1, 8, 5, 9), plane[:, :, 4:9], rtol=0, atol=0)
    grown = adapt_pos_embed(table, (12, 9), (20, 4))  # time cut first, then frequency interpolated
    expected = F.interpolate(plane[:, :, :, 2:6], size=(20, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(grown[:, 2:].transpose(1, 2).reshape(1, 8, 20, 4), expected, rtol=0, atol=0)
    assert adapt_pos_embed(table, (12, 9), (12, 9)) is table


@pytest.mark.parametrize("frames", [60, 200])
def test_zeros_mode_reproduces_transformers_ignore_mismatched_sizes(tmp_path, frames):
    directory = save_tiny_hf_checkpoint(tmp_path, classification=True)
    ours = load_backbone(directory, max_frames=frames, pos_embed="zeros")
    reference = ASTModel.from_pretrained(directory, max_length=frames, ignore_mismatched_sizes=True).eval()
    assert not reference.embeddings.position_embeddings.any()
    assert not ours.pos_embed.any() and ours.load_report.pos_embed == "zeros"
    assert_same_outputs(ours, reference, frames=frames)


def test_unchanged_grid_keeps_the_table_in_both_modes(tmp_path):
    directory = save_tiny_hf_checkpoint(tmp_path)
    adapt = load_backbone(directory, max_frames=105)  # same 12 x 9 grid as 100 frames
    zeros = load_backbone(directory, max_frames=100, pos_embed="zeros")
    assert torch.equal(adapt.pos_embed, zeros.pos_embed) and adapt.pos_embed.any()


def test_bad_pos_embed_mode_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown pos_embed mode 'cut'; valid: \['adapt', 'zeros'\]"):
        load_backbone(tmp_path, pos_embed="cut")


# --- bad checkpoints -------------------------------------------------------------------


def rewrite_weights(directory, change):
    path = directory / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path)
    return path


def test_missing_key_is_named(tmp_path):
    path = rewrite_weights(save_tiny_hf_checkpoint(tmp_path), lambda s: s.pop("encoder.layer.1.output.dense.bias"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: missing keys .*\['blocks\.1\.mlp\.fc2\.bias'\]"):
        load_backbone(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    def widen(state):
        state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)

    path = rewrite_weights(save_tiny_hf_checkpoint(tmp_path), widen)
    message = rf"{re.escape(str(path))}: tensor shapes .*blocks\.0\.mlp\.fc1\.weight: \(65, 32\) != \(64, 32\)"
    with pytest.raises(CheckpointError, match=message):
        load_backbone(tmp_path)


def test_unknown_and_surplus_keys_are_named(tmp_path):
    save_tiny_hf_checkpoint(tmp_path)
    rewrite_weights(tmp_path, lambda s: s.update({"encoder.layer.0.gate.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys .*\['encoder\.layer\.0\.gate\.weight'\]"):
        load_backbone(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    rewrite_weights(tmp_path, lambda s: s.pop("encoder.layer.0.gate.weight"))
    with pytest.raises(CheckpointError, match=r"1-layer AST does not have: \['blocks\.1\.attn\.k\.bias'"):
        load_backbone(tmp_path)


def test_non_ast_checkpoint(tmp_path):
    bert = {
        "bert.embeddings.word_embeddings.weight": torch.zeros(10, 4),
        "bert.encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4),
    }
    save_file(bert, tmp_path / "model.safetensors")
    message = r"model\.safetensors: not an AST checkpoint.*'bert\.embeddings\.word_embeddings\.weight'"
    with pytest.raises(CheckpointError, match=message):
        load_backbone(tmp_path)
    save_tiny_hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(CheckpointError, match=r"model_type 'vit', not an AST"):
        load_backbone(tmp_path)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such checkpoint file or directory: '.*nowhere'"):
        load_backbone(tmp_path / "nowhere")
    for missing in ("runs/a/b", "weights.pth", "./ast"):
        with pytest.raises(CheckpointError, match=rf"no such checkpoint file or directory: '{re.escape(missing)}'"):
            load_backbone(missing)
    (tmp_path / "config.json").write_text("{}")
    message = r"no weights file; expected one of \['model.safetensors', 'pytorch_model.bin'\], found \['config.json'\]"
    with pytest.raises(CheckpointError, match=message):
        load_backbone(tmp_path)


def test_corrupt_weights_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / 'model.safetensors'))}: cannot read weights"):
        load_backbone(tmp_path)
    (tmp_path / "model.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"model\.pth: cannot read weights"):
        load_backbone(tmp_path / "model.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: not a state dict"):
        load_backbone(tmp_path / "list.pt")


# --- fingerprints ----------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    directory = save_tiny_hf_checkpoint(tmp_path)
    model = load_backbone(directory)
    fingerprint = model.load_report.fingerprint
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert backbone_fingerprint(model) == fingerprint == load_backbone(directory).load_report.fingerprint
    assert load_backbone(directory, max_frames=60).load_report.fingerprint != fingerprint

    state = model.state_dict()
    reordered = dict(reversed(list(state.items())))
    assert fingerprint_state_dict(reordered) == fingerprint
    assert fingerprint_state_dict({k: v.double() for k, v in state.items()}) == fingerprint

    changed = dict(state)
    changed["blocks.1.norm2.bias"] = state["blocks.1.norm2.bias"] + 1e-3
    assert fingerprint_state_dict(changed) != fingerprint


def test_fingerprint_sees_through_wrapped_projections():
    state = load_backbone("tiny-random").state_dict()
    wrapped = {k.replace("attn.q.", "attn.q.base."): v for k, v in state.items()}
    wrapped["blocks.0.attn.q.lora_A"] = torch.randn(4, 96)
    wrapped["blocks.0.mhsa.branches.0.down.weight"] = torch.randn(8, 96)
    assert "blocks.0.attn.q.base.weight" in wrapped
    assert fingerprint_state_dict(wrapped) == fingerprint_state_dict(state)
    with pytest.raises(ValueError, match="not an AST backbone state dict"):
        fingerprint_state_dict({"classifier.weight": torch.zeros(1)})
