"""Training SpaHGC per fold, the baselines beside it, and predictions for the held-out slides."""
from .baselines import BASELINES, KnnBaseline, MeanBaseline, RidgeBaseline, make_baseline
from .config import FitConfig
from .fit import fit, fit_folds
from .folds import check_leakage, load_folds
from .inference import load_model
from .predict import METHODS, predict, predict_fold
from .rundir import Run, open_run

__all__ = [
    "BASELINES",
    "METHODS",
    "FitConfig",
    "KnnBaseline",
    "MeanBaseline",
    "RidgeBaseline",
    "Run",
    "check_leakage",
    "fit",
    "fit_folds",
    "load_folds",
    "load_model",
    "make_baseline",
    "open_run",
    "predict",
    "predict_fold",
]
