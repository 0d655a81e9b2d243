"""The command line is generated from the configs: every graph and training option of `hgc run`
has the config's default and choices, and parsed options become the configs they name."""
from __future__ import annotations

import dataclasses
import json

import click
import pytest
from click.testing import CliRunner

from hgc.cli import main
from hgc.cli.options import config_kwargs, exposed_fields
from hgc.cli.train import PIPELINE_GRAPH_SKIP, _fit_config, _graph_kwargs
from hgc.data.normalize import NORMALISERS
from hgc.errors import InputError
from hgc.graph.fold import GraphConfig
from hgc.graph.knn import KNN_BACKENDS, METRICS
from hgc.nn.config import BACKENDS, CONTRASTS, ModelConfig
from hgc.train.config import FitConfig
from hgc.train.presets import PRESETS


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands[command].params}


def _cli_default(f: dataclasses.Field):
    """What the option's default must be for the config's default to result."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    spec = f.metadata["cli"]
    if spec.csv and default is not None:
        return ",".join(default)
    if spec.multiple:
        return None
    if spec.zero_means_none and default is None:
        return 0
    return default


SHARED = {  # command -> (config, fields it does not take from that config)
    "run": [(GraphConfig, PIPELINE_GRAPH_SKIP + ("genes",)), (FitConfig, ()), (ModelConfig, ())],
    "train": [(GraphConfig, PIPELINE_GRAPH_SKIP + ("genes",)), (FitConfig, ("folds",)), (ModelConfig, ())],
    "build-graph": [(GraphConfig, ())],
    "fit": [(FitConfig, ()), (ModelConfig, ())],
}


@pytest.mark.parametrize("command", sorted(SHARED))
def test_every_config_option_is_offered_with_the_configs_default(command):
    params = _params(command)
    help_text = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    for cls, skip in SHARED[command]:
        for f in exposed_fields(cls, skip):
            assert f.name in params, f"`hgc {command}` lacks the {cls.__name__} option {f.name}"
            p = params[f.name]
            if not p.multiple:
                assert p.default == _cli_default(f), (command, f.name)
            assert p.opts[0] in help_text
    if command in ("run", "train"):  # graph settings they take from elsewhere still parse, as the pipeline's
        assert params["genes"].required and {"seed", "device"} <= set(params)


def test_choices_come_from_the_modules_that_own_them():
    run, graph = _params("run"), _params("build-graph")

    def choices(param: click.Parameter) -> list[str]:
        return list(param.type.choices)  # a list or a tuple, by click version

    assert choices(run["normalize"]) == list(NORMALISERS) == choices(graph["normalize"])
    assert choices(graph["metric"]) == list(METRICS)
    assert choices(graph["knn_backend"]) == list(KNN_BACKENDS)
    assert choices(run["backend"]) == list(BACKENDS) == choices(_params("predict")["backend"])
    assert choices(run["contrast"]) == list(CONTRASTS)
    assert choices(run["preset"]) == list(PRESETS)


def test_parsed_options_become_the_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.tsv").write_text("slide\n")  # parsing checks only that the manifest exists
    args = ["m.tsv", "--protocol", "slide-loso", "--genes", "top-mean:20", "--out", "o", "--k-refer", "9",
            "--no-masking", "--relations", "near,refer", "--patience", "0", "--fold", "slide-A", "--fold", "slide-B",
            "--keep-same-patient", "--hidden", "64", "--normalize", "log10-minmax"]
    with main.commands["run"].make_context("run", args) as ctx:
        kw = ctx.params
        graph = GraphConfig(genes=kw["genes"], normalize=kw["normalize"], **_graph_kwargs(kw))
        fit = _fit_config(kw)
        assert config_kwargs(FitConfig, kw, keep_defaults=False) == {
            "masking": False, "relations": ("near", "refer"), "patience": None, "folds": ("slide-A", "slide-B")}
    assert (graph.k_refer, graph.exclude_same_patient, graph.normalize, graph.k_close) == (9, False, "log10-minmax", 3)
    assert (fit.masking, fit.relations, fit.patience, fit.folds) == (False, ("near", "refer"), None, ("slide-A", "slide-B"))
    assert fit.model == {"hidden": 64} and fit.epochs == FitConfig().epochs


def test_a_preset_supplies_the_defaults_a_user_did_not_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.tsv").write_text("slide\n")
    base = ["m.tsv", "--protocol", "slide-loso", "--genes", "top-mean:20", "--out", "o", "--preset", "spahgc-published"]
    with main.commands["run"].make_context("run", list(base)) as ctx:
        assert _fit_config(ctx.params).patience is None  # the preset's: no early stopping
    with main.commands["run"].make_context("run", [*base, "--patience", "20"]) as ctx:
        assert _fit_config(ctx.params).patience == 20  # the user's choice wins


@pytest.mark.parametrize("config", [GraphConfig(k_refer=9, exclude_same_patient=True),
                                    FitConfig(relations=("near", "refer"), folds=("f",), model={"hidden": 32}),
                                    ModelConfig(drop={"near": 0.1}, relations=("near", "refer"), gene_rank=None)])
def test_configs_round_trip_through_one_dict_form_and_refuse_unknown_keys(config):
    cls = type(config)
    d = config.to_dict()
    assert cls.from_dict(json.loads(json.dumps(d))) == config  # what a run folder stores reads back equal
    assert cls.from_dict({}) == cls()  # missing options take the defaults
    with pytest.raises(InputError, match=r"unknown options \['k_refr'\]"):
        cls.from_dict({**d, "k_refr": 3})
