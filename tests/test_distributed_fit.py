"""``torchrun --nproc-per-node 2 -m hgc fit``: two CPU (gloo) processes, each training a share of
every step's slide graphs with their gradients summed, repeat a one-process run that trains the
same two graphs per step (``--graphs-per-step 2``), on real her2st graphs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from her2st_graph_data import write_her2st_store
from hgc.cli import main
from hgc.train.rundir import load_checkpoint

#: A 2-process run matches the one-process run to this (float sums in another order, other threads).
TOLERANCE = 1e-4
FIT = ["--epochs", "4", "--patience", "0", "--hidden", "16", "--layers", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, her2st_manifest):
    return write_her2st_store(her2st_manifest, tmp_path_factory.mktemp("store") / "graphs.h5")


def one_process(store, out, *extra: str):
    result = CliRunner().invoke(main, ["fit", str(store), "--out", str(out), *FIT, *extra])
    assert result.exit_code == 0, result.output
    return out


def history(run, fold: str) -> np.ndarray:
    lines = (run / fold / "history.csv").read_text().splitlines()
    columns = lines[0].split(",")
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    return rows[:, [columns.index(c) for c in ("loss", "mse", "val_pcc")]]


def test_two_processes_repeat_a_one_process_run_of_two_graphs_per_step(store, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hgc", "-v",
         "fit", str(store), "--out", str(tmp_path / "two"), *FIT], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "process 1 of 2" in run.stderr
    two = tmp_path / "two"
    one = one_process(store, tmp_path / "one", "--graphs-per-step", "2")
    single = one_process(store, tmp_path / "single")
    record = json.loads((two / "config.json").read_text())
    assert (record["processes"], record["graphs_per_step"]) == (2, 2)
    assert json.loads((single / "config.json").read_text())["graphs_per_step"] == 1
    for fold in ("patient-B", "patient-C"):  # patient-C: B4 alone, so process 1 trains nothing there
        a = load_checkpoint(two / fold / "model.safetensors")
        b = load_checkpoint(one / fold / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=TOLERANCE, err_msg=f"{fold} {k}")
        np.testing.assert_allclose(history(two, fold), history(one, fold), atol=TOLERANCE)
        assert json.loads((two / fold / "fold.json").read_text())["best_epoch"] == \
            json.loads((one / fold / "fold.json").read_text())["best_epoch"]
    # two graphs per step is another training than one: the comparison above can fail
    assert np.abs(history(single, "patient-B") - history(one, "patient-B")).max() > 100 * TOLERANCE


def test_commands_that_do_not_share_their_work_refuse_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(main, ["build-graph", str(tmp_path / "m.tsv"), "--out", str(tmp_path / "g.h5")])
    assert result.exit_code == 1 and "'hgc build-graph' runs in one process" in result.output
    assert not (tmp_path / "g.h5").exists()


def test_each_process_of_a_node_takes_its_own_gpu(monkeypatch):
    from hgc._distributed import Ranks, local_device
    from hgc.errors import InputError

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_device("cuda", Ranks(1, 2, 1)) == "cuda:1" and local_device("cpu", Ranks(1, 2, 1)) == "cpu"
    assert local_device("cuda:1", Ranks()) == "cuda:1"  # one process: the GPU it names
    with pytest.raises(InputError, match="names one GPU, but torchrun started 2 processes"):
        local_device("cuda:0", Ranks(1, 2, 1))
