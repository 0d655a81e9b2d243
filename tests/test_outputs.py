"""Outputs are complete or absent, one writer at a time, and a folder that cannot be written (read-only,
full) is one clear line before any work -- for every command that writes."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from click.testing import CliRunner

from conftest import REPO, assert_one_line_error, tiny_st_project
from hgc._outputs import atomic_dir, output_lock, safe_name
from hgc.cli import main
from hgc.errors import InputError

FAST = ["--epochs", "1", "--hidden", "8", "--layers", "1", "--backend", "pyg", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _hgc(*args, preexec=None, prefix=()):
    """The real command line in its own process (for kills, locks and resource limits)."""
    return subprocess.run([*prefix, sys.executable, "-m", "hgc", *map(str, args)], capture_output=True,
                          text=True, env=ENV, preexec_fn=preexec, timeout=600)


def _one_line(proc, *needles):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), proc.stderr
    return errors[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_safe_names_are_one_reversible_component():
    for ident in ["B4", "TENX95", "patient-C", "a/b", "..", ".", ".hidden", "x y%z", "../../etc/passwd", "ü/é"]:
        name = safe_name(ident)
        assert "/" not in name and not name.startswith(".") and unquote(name) == ident
    assert safe_name("B4") == "B4" and safe_name("patient-C") == "patient-C"  # ordinary ids unchanged
    with pytest.raises(InputError):
        safe_name("")


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    assert _tree(target) == {"old.txt": b"old"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(target) == {"new.txt": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


#: A child fitting a long run that reports each epoch, so the parent can SIGKILL it mid-training.
KILLED_FIT = """
import importlib, sys
fit = importlib.import_module("hgc.train.fit")
real = fit._validate
def reporting(*args):
    print("epoch", flush=True)
    return real(*args)
fit._validate = reporting
fit.fit(sys.argv[1], sys.argv[2], fit.FitConfig(backend="pyg", device="cpu", epochs=10**6, patience=None,
        progress=False, model={"hidden": 8, "layers": 1}))
"""


def _kill_fit(graphs: Path, out: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FIT, str(graphs), str(out)], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        for _ in range(3):
            assert proc.stdout.readline().strip() == "epoch"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_killed_fit_leaves_the_previous_run_or_nothing(tmp_path, tiny_run):
    _, run = tiny_run
    graphs = run / "graphs.h5"
    _kill_fit(graphs, tmp_path / "fresh")  # a first fit killed: no run at all, predict refuses
    assert not (tmp_path / "fresh").exists()
    assert_one_line_error(_cli("predict", tmp_path / "fresh", "--graphs", graphs, "--out", tmp_path / "p"),
                          "fresh does not exist")
    assert not (tmp_path / "p").exists()

    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    before = _tree(model)
    _kill_fit(graphs, model)  # a refit killed: the earlier run is untouched and still predicts
    assert _tree(model) == before
    assert list(tmp_path.glob(".model.tmp-*"))  # the killed fit's half-built run...
    assert _cli("predict", model, "--graphs", graphs, "--out", tmp_path / "p").exit_code == 0
    assert _cli("fit", graphs, "--out", model, *FAST).exit_code == 0
    assert not list(tmp_path.glob(".model.tmp-*"))  # ...is removed by the next fit of that folder


def test_predict_replaces_stale_files_and_evaluate_reads_only_its_record(tmp_path, tiny_run):
    _, run = tiny_run
    pred = tmp_path / "pred"
    shutil.copytree(run / "predictions", pred)
    (pred / "oldmethod").mkdir()
    shutil.copy(next((pred / "ridge").glob("*.h5ad")), pred / "oldmethod" / "S1.h5ad")  # stale, not in the record
    assert "oldmethod" not in json.loads(_cli("evaluate", pred, "--json").output)["methods"]
    assert _cli("predict", run / "model", "--graphs", run / "graphs.h5", "--out", pred, "--methods", "ridge,mean").exit_code == 0
    assert sorted(p.name for p in pred.iterdir() if p.is_dir()) == ["mean", "ridge"]  # replaced whole
    (pred / "predictions.json").unlink()  # a prediction folder without its record is not scored
    assert_one_line_error(_cli("evaluate", pred), "not a complete hgc prediction folder")

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_one_line_error(_cli("predict", run / "model", "--graphs", run / "graphs.h5", "--out", mine),
                          "does not hold an hgc prediction folder")
    assert_one_line_error(_cli("fit", run / "graphs.h5", "--out", mine, *FAST), "does not hold an hgc run")
    assert _tree(mine) == {"notes.txt": b"keep me"}


def test_files_a_user_added_survive_a_replacement(tmp_path, tiny_run):
    _, run = tiny_run
    pred, model = tmp_path / "pred", tmp_path / "model"
    shutil.copytree(run / "predictions", pred)
    shutil.copytree(run / "model", model)
    (pred / "figures").mkdir()
    (pred / "figures" / "B4.png").write_bytes(b"a figure")
    (model / "notes.txt").write_text("lr sweep 3")
    assert _cli("fit", run / "graphs.h5", "--out", model, *FAST).exit_code == 0
    assert _cli("predict", model, "--graphs", run / "graphs.h5", "--out", pred, "--methods", "ridge").exit_code == 0
    assert (model / "notes.txt").read_text() == "lr sweep 3" and json.loads((model / "config.json").read_text())["folds"]
    assert (pred / "figures" / "B4.png").read_bytes() == b"a figure"
    assert sorted(p.name for p in pred.iterdir() if p.is_dir()) == ["figures", "ridge"]


def test_outputs_named_through_dots_and_links(tmp_path, tiny_run, monkeypatch):
    """`--out .` names the current folder; a symbolic link is written through, to its target."""
    _, run = tiny_run
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert _cli("predict", run / "model", "--graphs", run / "graphs.h5", "--out", ".", "--methods", "mean").exit_code == 0
    assert (here / "predictions.json").is_file()
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    r = _cli("predict", run / "model", "--graphs", run / "graphs.h5", "--out", tmp_path / "link", "--methods", "mean")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "link").is_symlink() and (target / "predictions.json").is_file()
    assert (tmp_path / ".target.lock").exists() and not (tmp_path / ".link.lock").exists()  # one lock per output


def test_options_are_checked_before_anything_is_written(tmp_path, tiny_run):
    _, run = tiny_run
    assert_one_line_error(_cli("fit", run / "graphs.h5", "--out", tmp_path / "m", "--relations", "near,nearby", *FAST),
                          "nearby")
    assert_one_line_error(_cli("fit", run / "graphs.h5", "--out", tmp_path / "m", "--lr", "nan", *FAST), "lr")
    assert_one_line_error(_cli("fit", run / "graphs.h5", "--out", tmp_path / "m", "--device", "tpu"), "tpu", exit_code=2)
    assert_one_line_error(_cli("predict", run / "model", "--graphs", run / "graphs.h5", "--out", tmp_path / "p",
                               "--methods", "hgc,magic"), "magic")
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_is_refused_and_told_who_holds_the_output(tmp_path, tiny_run):
    manifest, run = tiny_run
    target = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom hgc._outputs import output_lock\n"
         "with output_lock(sys.argv[1], 'hgc run m.tsv --out run'):\n    print('held', flush=True)\n    time.sleep(600)",
         str(target)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["run", manifest, "--protocol", "slide-loso", "--genes", "top-mean:5", "--out", target, *FAST],
                        ["fit", run / "graphs.h5", "--out", target, *FAST],
                        ["predict", run / "model", "--graphs", run / "graphs.h5", "--out", target]):
            assert_one_line_error(_cli(*command), "is being written by `hgc run m.tsv --out run`", f"process {holder.pid}")
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with output_lock(target, "test"):  # the lock died with its holder
        pass


def test_readers_and_writers_of_one_run_exclude_each_other(tmp_path, tiny_run):
    """`hgc predict` reads a run under a shared lock: a fit into that folder meanwhile is refused, so
    one prediction set never mixes two trainings."""
    _, run = tiny_run
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom hgc._outputs import output_lock\n"
         "with output_lock(sys.argv[1], 'hgc predict model', shared=True):\n    print('reading', flush=True)\n"
         "    time.sleep(600)", str(model)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert reader.stdout.readline().strip() == "reading"
        assert_one_line_error(_cli("fit", run / "graphs.h5", "--out", model, *FAST),
                              "is being read by `hgc predict model`", f"process {reader.pid}")
        r = _cli("predict", model, "--graphs", run / "graphs.h5", "--out", tmp_path / "p")  # readers share
        assert r.exit_code == 0, r.output
    finally:
        reader.kill()
        reader.wait(timeout=60)


def test_write_failures_of_a_finished_hdf5_image_are_one_line(tmp_path):
    """The in-memory HDF5 file is written at close; if that fails (the size estimate was low, the
    disk filled meanwhile), the error is the usual one line and no temporary file is left."""
    code = ("import resource, signal, sys\nimport numpy as np\nfrom hgc._outputs import atomic_h5\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "with atomic_h5(sys.argv[1], 1000) as f:\n    f.create_dataset('x', data=np.zeros(1 << 19))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.h5")], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 1 and "hgc.errors.InputError: cannot write" in proc.stderr
    assert "size this system allows" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_failures_are_worded_for_what_failed():
    from hgc._outputs import os_error_message

    unreadable = PermissionError(13, "Permission denied", "/data/her2st/A1.tsv")
    assert os_error_message(unreadable, writing=False).startswith("cannot access /data/her2st/A1.tsv: permission denied")
    assert os_error_message(unreadable, "/runs/x").startswith("cannot write /runs/x: permission denied")
    full = OSError(28, "No space left on device")
    assert os_error_message(full, writing=False) == ("cannot write the output: the disk is full; free some space or "
                                                     "choose another output folder")
    assert "shorten them" in os_error_message(OSError(36, "File name too long", "/runs/x" + "y" * 300))
    assert os_error_message(OSError(2, "No such file or directory", "/x")) is None


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next(tmp_path, tiny_run):
    manifest, run = tiny_run
    out = tmp_path / "graphs.h5"
    stale = [tmp_path / ".graphs.h5.tmp-4242-0123abcd", tmp_path / "graphs.h5.tmp4242"]  # now and hgc 0.1's names
    for p in stale:
        p.write_bytes(b"half a graph store")
    r = _cli("build-graph", manifest, "--embeddings", run / "embeddings.h5", "--protocol", "slide-loso",
             "--genes", "top-mean:5", "--out", out)
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in stale) and out.is_file()


def test_a_failed_embed_leaves_nothing(tmp_path):
    manifest = tiny_st_project(tmp_path / "data")
    image = tmp_path / "data" / "slide0" / "slide0.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2] + b"\xff\xd9")  # cut short, end marker appended
    out = tmp_path / "out" / "emb.h5"
    assert_one_line_error(_cli("embed", manifest, "--encoder", "effnet-lite0", "--out", out, "--device", "cpu"),
                          "slide0.jpg", "damaged")
    assert sorted(p.name for p in out.parent.iterdir()) == [".emb.h5.lock"]  # no output, no empty .parts folder


def _without_root_override() -> tuple[str, ...]:
    """A prefix that makes file permissions apply to root too (root ignores them otherwise)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    assert setpriv, "running the suite as root needs util-linux's setpriv to test read-only folders"
    caps = "-dac_override,-dac_read_search"
    return (setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}")


def test_read_only_output_folders_are_one_line_before_any_work(tmp_path, tiny_run):
    manifest, run = tiny_run
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    prefix = _without_root_override()
    try:
        for command in (["embed", manifest, "--out", locked / "e.h5", "--encoder", "effnet-lite0"],
                        ["build-graph", manifest, "--embeddings", run / "embeddings.h5", "--protocol", "slide-loso",
                         "--genes", "top-mean:5", "--out", locked / "g.h5"],
                        ["predict", run / "model", "--graphs", run / "graphs.h5", "--out", locked / "p"],
                        ["run", manifest, "--protocol", "slide-loso", "--genes", "top-mean:5", "--out", locked / "r"]):
            _one_line(_hgc(*command, prefix=prefix), f"cannot write {locked}", "permission denied")
    finally:
        os.chmod(locked, 0o755)
    assert list(locked.iterdir()) == []


def _file_limit(nbytes: int):
    def apply() -> None:  # a full disk, as far as this process can tell: writes past nbytes fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_run):
    manifest, run = tiny_run
    for name, command in (
        ("g.h5", ["build-graph", manifest, "--embeddings", run / "embeddings.h5", "--protocol", "slide-loso",
                  "--genes", "top-mean:5", "--out", tmp_path / "full" / "g.h5"]),  # refused before writing
        ("e.h5", ["embed", manifest, "--out", tmp_path / "full" / "e.h5", "--encoder", "effnet-lite0"]),
        ("model", ["fit", run / "graphs.h5", "--out", tmp_path / "full" / "model", *FAST]),  # fails mid-write
    ):
        _one_line(_hgc(*command, preexec=_file_limit(40_000)), "cannot write", name)
        leftovers = [p.name for p in (tmp_path / "full").iterdir() if not p.name.endswith(".lock")]
        assert leftovers == [], leftovers
