"""``export onnx``: the whole model of an adapter file as one ONNX graph, features in, logits out.

LoRA is merged into the projections first (inference needs nothing else); every other
method's modules are part of the graph. The input is what ``predict`` feeds the model,
``features`` (batch, *the frontend's feature_shape*): for AST the (frames, mel bins) of
:class:`~audiopetl.frontend.Fbank`; for the speech encoders the rows of
:class:`~audiopetl.frontend.WaveformFrontend` (the frozen feature encoder's output and the
validity column; the feature encoder is not in the graph). The batch axis is dynamic. Uses torch's ``torch.export``-based exporter (needs ``onnxscript``): the
TorchScript one records the batch size of the example as a constant. Class names, the
frontend settings, the method configs and the backbone name go into ``metadata_props``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..atomic import atomic_path
from ..experiments.inference import load_for_inference
from ..frontend import frontend_from_settings


def export_onnx(adapter: str | Path, out: str | Path, opset: int = 18) -> Path:
    try:
        import onnx
    except ImportError as error:
        raise RuntimeError(f"export onnx needs the export extra: pip install 'audiopetl[export]' ({error})") from None
    model = load_for_inference(adapter, device="cpu")
    if model.lora_layers():
        model.merge_lora()
    frontend = frontend_from_settings(model.metadata["frontend"], model.backbone)
    # Ones: the speech encoders' last column marks valid frames, and a clip of padding alone has no mean.
    example = torch.ones(2, *frontend.feature_shape)
    out = Path(out)
    with atomic_path(out) as temp:
        # Traced with the math attention kernel: the graph is decomposed to it anyway, and a fused
        # kernel's output layout seen while tracing differs from its, so a reshape traced as a view
        # of that output fails to decompose (WavLM, whose attention mask is a float bias).
        with sdpa_kernel(SDPBackend.MATH):
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
        # Below its own opset torch converts the graph, and keeps its own when that fails: say so.
        written = next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))
        if written != opset:
            raise ValueError(
                f"--opset {opset}: torch's exporter could not convert the graph to opset {opset} "
                f"(it wrote opset {written}); use --opset {written} or higher"
            )
        properties = {
            "audiopetl.class_names": json.dumps(model.class_names),
            "audiopetl.frontend": json.dumps(model.metadata.get("frontend")),
            "audiopetl.methods": json.dumps([m.to_dict() for m in model.methods]),
            "audiopetl.backbone": json.dumps(model.backbone_record.get("source")),
        }
        for key, value in properties.items():
            graph.metadata_props.add(key=key, value=value)
        shape = ", ".join(map(str, frontend.feature_shape))
        graph.doc_string = f"audiopetl adapter {Path(adapter).name}: features (batch, {shape}) -> logits"
        onnx.checker.check_model(graph)
        onnx.save(graph, str(temp))
    return out
