"""The paper's published accuracies (%), keyed by recipe and row, for reports to show beside ours.

Transcribed from Cappellazzo et al., "Parameter-Efficient Transfer Learning of Audio
Spectrogram Transformers" (../shared/paper.txt). These are reference figures only; no
result of ours is ever taken from here.
"""

from __future__ import annotations

_DATASETS4 = ("esc50", "us8k", "gsc", "fsc")
_DATASETS2 = ("esc50", "fsc")


def _rows(datasets, rows: dict[str, tuple[float, ...]]) -> dict[str, dict[str, float]]:
    return {row: dict(zip(datasets, values)) for row, values in rows.items()}


PAPER = {
    "table1": _rows(
        _DATASETS4,
        {
            "Full FT": (87.48, 84.31, 97.31, 93.29),
            "Linear": (75.85, 77.93, 41.78, 27.52),
            "BitFit": (86.05, 82.17, 85.51, 63.85),
            "SPT-300": (84.30, 79.73, 75.28, 40.85),
            "DPT-25": (86.52, 83.67, 89.18, 68.60),
            "Pref-T 24": (82.93, 81.39, 83.46, 55.75),
            "Bottleneck PF par": (88.38, 83.44, 91.33, 73.19),
            "Bottleneck PF seq": (86.77, 82.86, 91.41, 72.45),
            "Bottleneck HOU par": (88.00, 82.80, 91.75, 78.71),
            "Bottleneck HOU seq": (87.75, 83.28, 91.76, 76.45),
            "Convpass PF par": (87.85, 82.72, 92.27, 72.84),
            "Convpass PF seq": (86.15, 83.10, 89.21, 70.31),
            "Convpass HOU par": (87.15, 82.75, 92.55, 77.79),
            "Convpass HOU seq": (87.58, 83.06, 89.45, 74.02),
            "LoRA": (86.45, 83.83, 93.61, 76.00),
        },
    ),
    # Few-shot: row -> dataset -> {K: accuracy}.
    "table2": {
        "DPT-25": {"esc50": {1: 32.7, 2: 44.3, 4: 57.0, 8: 71.9}, "gsc": {2: 9.4, 8: 18.7, 32: 43.1, 64: 57.1}},
        "LoRA": {"esc50": {1: 31.8, 2: 42.2, 4: 58.8, 8: 70.7}, "gsc": {2: 6.8, 8: 15.2, 32: 41.8, 64: 59.8}},
        "Bottle": {"esc50": {1: 33.0, 2: 45.5, 4: 60.2, 8: 72.8}, "gsc": {2: 7.2, 8: 16.0, 32: 47.9, 64: 66.6}},
        "Conv": {"esc50": {1: 32.6, 2: 45.4, 4: 60.3, 8: 73.2}, "gsc": {2: 7.3, 8: 16.2, 32: 47.8, 64: 66.8}},
    },
    "table3": _rows(
        _DATASETS4,
        {
            "FFN-Seq/Par-After": (86.77, 82.86, 91.41, 72.45),
            "FFN-Seq-Before": (54.68, 71.60, 86.80, 61.44),
            "FFN-Par-Before": (87.07, 82.72, 90.84, 72.08),
            "MHSA-Seq/Par-After": (87.80, 83.08, 89.30, 64.40),
            "MHSA-Seq-Before": (76.03, 81.30, 90.74, 73.76),
            "MHSA-Par-Before": (88.38, 83.44, 91.33, 73.19),
        },
    ),
    "table4": _rows(
        _DATASETS4,
        {
            "Wq": (83.05, 82.56, 89.08, 61.84),
            "Wq,Wk": (84.15, 82.35, 91.51, 65.59),
            "Wq,Wv": (86.45, 83.83, 93.61, 76.00),
            "Wq,Wk,Wv,Wo": (86.15, 83.51, 94.08, 78.90),
        },
    ),
    "table5": _rows(
        _DATASETS2,
        {
            "PF FFN-Seq-After": (86.77, 72.45),
            "PF MHSA-Par-Before": (88.38, 73.19),
            "PF FFN-Seq-After x2": (87.18, 73.60),
            "PF MHSA-Par-Before x2": (88.50, 78.19),
            "HOU seq": (87.75, 76.45),
            "HOU par": (88.00, 78.71),
            "HOU mixed": (87.75, 78.41),
            "HYDRA FFN": (87.25, 76.18),
        },
    ),
    "table6": _rows(
        _DATASETS2,
        {
            "PF MHSA-Par-Before x2": (88.50, 78.19),
            "HOU par": (88.00, 78.71),
            "LoRA": (86.70, 82.84),
            "Adapter + LoRA": (88.00, 81.54),
            "Adapter + DPT-25": (86.60, 77.15),
            "Adapter + DPT-14 + LoRA": (86.80, 79.83),
        },
    ),
    "table7": _rows(
        _DATASETS2,
        {
            "Seq residual": (86.77, 72.45),
            "Seq no residual": (69.20, 56.48),
            "Par residual": (73.20, 69.28),
            "Par no residual": (87.07, 72.08),
        },
    ),
}


def paper_accuracy(recipe: str, row: str, dataset: str, k: int | None = None) -> float | None:
    """The published accuracy for a cell, or None where the paper gives none."""
    cell = PAPER.get(recipe, {}).get(row, {}).get(dataset)
    if isinstance(cell, dict):
        return cell.get(k)
    return cell
