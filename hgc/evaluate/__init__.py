"""Accuracy metrics, prediction folders and the evaluation report (PCC-ALL/HEG/HVG, MSE, MAE per held-out slide)."""
from .metrics import (
    METRIC_KEYS,
    N_TOP_GENES,
    SlideMetrics,
    pearson_per_gene,
    pooled_pcc,
    slide_metrics,
    training_gene_sets,
)
from .predictions import Prediction, open_predictions, read_prediction, write_prediction, writing_predictions
from .report import evaluate, write_report

__all__ = [
    "METRIC_KEYS",
    "N_TOP_GENES",
    "Prediction",
    "SlideMetrics",
    "evaluate",
    "open_predictions",
    "pearson_per_gene",
    "pooled_pcc",
    "read_prediction",
    "slide_metrics",
    "training_gene_sets",
    "write_prediction",
    "write_report",
    "writing_predictions",
]
