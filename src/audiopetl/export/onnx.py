"""``export onnx``: the whole model of an adapter file as one ONNX graph, features in, logits out.

LoRA is merged into the projections first (inference needs nothing else); every other
method's modules are part of the graph. The input is what ``predict`` feeds the model,
``features`` (batch, frames, mel bins) from :class:`~audiopetl.frontend.Fbank`; the batch
axis is dynamic. Uses torch's ``torch.export``-based exporter (needs ``onnxscript``): the
TorchScript one records the batch size of the example as a constant. Class names, the
frontend settings, the method configs and the backbone name go into ``metadata_props``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..experiments.inference import load_for_inference


def export_onnx(adapter: str | Path, out: str | Path, opset: int = 18) -> Path:
    try:
        import onnx
    except ImportError as error:
        raise RuntimeError(f"export onnx needs the export extra: pip install 'audiopetl[export]' ({error})") from None
    model = load_for_inference(adapter, device="cpu")
    if model.lora_layers():
        model.merge_lora()
    config = model.backbone.config
    example = torch.zeros(2, config.max_frames, config.num_mel_bins)
    out = Path(out)
    with atomic_path(out) as temp:
        torch.onnx.export(
            model,
            (example,),
            str(temp),
            dynamo=True,
            input_names=["features"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
        graph = onnx.load(str(temp))
        properties = {
            "audiopetl.class_names": json.dumps(model.class_names),
            "audiopetl.frontend": json.dumps(model.metadata.get("frontend")),
            "audiopetl.methods": json.dumps([m.to_dict() for m in model.methods]),
            "audiopetl.backbone": json.dumps(model.backbone_record.get("source")),
        }
        for key, value in properties.items():
            graph.metadata_props.add(key=key, value=value)
        graph.doc_string = f"audiopetl adapter {Path(adapter).name}: features (batch, frames, mel) -> logits"
        onnx.checker.check_model(graph)
        onnx.save(graph, str(temp))
    return out
