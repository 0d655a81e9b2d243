"""``torchrun --nproc-per-node 2 -m hgc embed``: two CPU (gloo) processes share the slides and
write one embedding file like a one-process run's; a process that dies leaves the others'
finished slides, and a rerun completes the rest."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embed_helpers import TINY, tiny_manifest, tiny_weights
from hgc._distributed import Ranks
from hgc.embed import embed_manifest, read_attrs, read_embeddings

SLIDES = ("S1", "S2", "S3", "S4")
#: attributes that may differ between a one-process and a distributed run
RUN_ATTRS = {"image_record"}


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hgc",
         "-v", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def embed_args(manifest: Path, weights: Path, out: Path) -> list[str]:
    return ["embed", str(manifest), "--encoder", TINY, "--weights", str(weights), "--out", str(out),
            "--patch-um", "50", "--workers", "0", "--no-progress"]


def assert_same_file(got: Path, expected: Path) -> None:
    want, have = read_attrs(expected), read_attrs(got)
    assert list(have) == list(want) == list(SLIDES)
    for slide in SLIDES:
        assert {k: v for k, v in have[slide].items() if k not in RUN_ATTRS} == \
            {k: v for k, v in want[slide].items() if k not in RUN_ATTRS}
        (b1, e1), (b2, e2) = read_embeddings(got, slide), read_embeddings(expected, slide)
        assert list(b1) == list(b2)
        np.testing.assert_allclose(e1, e2, rtol=1e-5, atol=1e-6)


@pytest.fixture()
def setup(tmp_path):
    manifest, weights = tiny_manifest(tmp_path, SLIDES, grid=3), tiny_weights(tmp_path)
    single = embed_manifest(manifest, TINY, tmp_path / "single.h5", weights=weights, patch_um=50.0, workers=0,
                            progress=False)
    return manifest, weights, single


def test_slides_are_shared_out_deterministically() -> None:
    assert Ranks(0, 2).share(SLIDES) == ["S1", "S3"] and Ranks(1, 2).share(SLIDES) == ["S2", "S4"]
    assert Ranks(2, 3).share(SLIDES) == ["S3"] and Ranks().share(SLIDES) == list(SLIDES)


def test_two_processes_write_the_one_process_file(setup, tmp_path):
    manifest, weights, single = setup
    run = torchrun(*embed_args(manifest, weights, tmp_path / "two.h5"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "process 1 of 2" in run.stderr and "process 0 of 2" in run.stderr
    for slide in SLIDES:
        assert run.stderr.count(f"slide '{slide}': embedding") == 1  # each slide by one process
    assert_same_file(tmp_path / "two.h5", single)
    assert not (tmp_path / "two.h5.parts").exists()


def test_a_process_that_dies_leaves_the_others_slides_and_a_rerun_completes(setup, tmp_path):
    manifest, weights, single = setup
    image = tmp_path / "S4" / "S4.jpg"  # S4 is process 1's second slide: its first, S2, is done before
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])
    out = tmp_path / "two.h5"
    run = torchrun(*embed_args(manifest, weights, out), cwd=tmp_path)
    assert run.returncode != 0 and "S4.jpg is truncated" in run.stderr
    # hgc says why in one line: torchrun's agent prints its own traceback, none has a frame in hgc
    assert not re.search(r'File "(?![^"]*site-packages)[^"]*[/\\]hgc[/\\][^"]*\.py"', run.stderr)
    assert not out.exists() and (tmp_path / "two.h5.parts" / "S2.h5").is_file()

    image.write_bytes(good)
    rerun = torchrun(*embed_args(manifest, weights, out), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "slide 'S2': embeddings up to date (part), skipped" in rerun.stderr
    assert "slide 'S4': embedding" in rerun.stderr
    assert_same_file(out, single)
