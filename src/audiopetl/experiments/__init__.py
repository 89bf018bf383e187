"""Experiments: the offline demo, paper recipes and sweeps, inference with adapter files, reports."""
