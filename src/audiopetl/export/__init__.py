"""Adapters for tools that don't know audiopetl: PEFT adapter folders (:mod:`.peft`) and ONNX models (:mod:`.onnx`).

Needs the ``export`` extra (transformers, peft, onnx, onnxscript); each module imports its tools lazily.
"""
