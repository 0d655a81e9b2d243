"""Figures of a run over the H&E: per-slide gene maps (:mod:`.maps`) and the run summary (:mod:`.summary`).

Drawing uses matplotlib's Agg canvas directly (no pyplot), so it changes no global backend state
and works without a display.
"""
from .maps import find_prediction, plot_prediction
from .run import plot_run
from .summary import plot_summary

__all__ = ["find_prediction", "plot_prediction", "plot_run", "plot_summary"]
