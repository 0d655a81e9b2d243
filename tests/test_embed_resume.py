"""Kill `hgc embed` with SIGKILL in the middle of a slide; the next run completes the file."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import hgc.embed.extract as extract
from embed_helpers import TINY, tiny_manifest, tiny_weights
from hgc.embed import embed_manifest, read_attrs, read_embeddings
from hgc.embed.store import EmbeddingStore
from hgc.errors import InputError

SLIDES = ("S1", "S2", "S3")
#: The child runs embed_manifest as the CLI does; its model reports each batch and is slowed down,
#: so the parent can SIGKILL it at a known point inside a slide (not at a lucky moment).
CHILD = """
import logging, sys, time
import hgc.embed.extract as extract
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
build = extract.Encoder.build
def reporting_build(self):
    model = build(self)
    forward = model.forward
    def slow_forward(x):
        print("batch", file=sys.stderr, flush=True)
        time.sleep(0.1)
        return forward(x)
    model.forward = slow_forward
    return model
extract.Encoder.build = reporting_build
extract.embed_manifest(sys.argv[1], sys.argv[2], out=sys.argv[3], weights=sys.argv[4], batch_size=2,
                       workers=0, progress=False)
"""


@pytest.fixture()
def setup(tmp_path):
    return tiny_manifest(tmp_path, SLIDES, grid=4), tiny_weights(tmp_path)


def _kill_inside(manifest, weights, out, slide: str) -> str:
    """SIGKILL the child after its third batch of ``slide`` (of 8)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(manifest), TINY, str(out), str(weights)],
        stderr=subprocess.PIPE, text=True,
    )
    seen, batches = [], -1
    try:
        for line in proc.stderr:
            seen.append(line)
            if f"slide '{slide}': embedding" in line:
                batches = 0
            elif line.startswith("batch") and batches >= 0:
                batches += 1
                if batches == 3:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


def test_sigkill_mid_slide_then_resume(setup, tmp_path, monkeypatch, caplog):
    manifest, weights = setup
    out = tmp_path / "emb.h5"
    log = _kill_inside(manifest, weights, out, "S2")
    assert "slide 'S2': embedding" in log and "slide 'S3'" not in log
    parts = out.with_name("emb.h5.parts")
    assert not out.exists()  # the output only ever appears complete
    assert sorted(p.name for p in parts.glob("*.h5")) == ["S1.h5"]  # S2 was not half-written

    computed = []
    real = extract.embed_slide

    def counting(slide, *args, **kwargs):
        computed.append(slide.id)
        return real(slide, *args, **kwargs)

    monkeypatch.setattr(extract, "embed_slide", counting)
    with caplog.at_level(logging.INFO, logger="hgc"):
        embed_manifest(manifest, TINY, out, weights=weights, batch_size=2, workers=0, progress=False)
    assert computed == ["S2", "S3"]  # S1, finished before the kill, is not recomputed
    assert "slide 'S1': embeddings up to date (part), skipped" in caplog.text
    assert not parts.exists()
    assert set(read_attrs(out)) == set(SLIDES)

    fresh = tmp_path / "fresh.h5"
    embed_manifest(manifest, TINY, fresh, weights=weights, batch_size=2, workers=0, progress=False)
    for s in SLIDES:  # resumed == uninterrupted, bit for bit (same batch size, CPU)
        b1, e1 = read_embeddings(out, s)
        b2, e2 = read_embeddings(fresh, s)
        np.testing.assert_array_equal(b1, b2)
        np.testing.assert_array_equal(e1, e2)


def test_leftovers_of_a_kill_during_the_merge_are_cleaned(setup, tmp_path, caplog):
    """A kill while writing parts or merging leaves temporary files: they are ignored and removed;
    a damaged part is recomputed, the previous output stays valid throughout."""
    manifest, weights = setup
    out = tmp_path / "emb.h5"
    embed_manifest(manifest, TINY, out, weights=weights, workers=0, progress=False)
    _, before = read_embeddings(out, "S1")
    parts = out.with_name("emb.h5.parts")
    parts.mkdir()
    (parts / "S2.h5.tmp4242").write_bytes(b"half an HDF5 file")
    (parts / "S3.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    out.with_name("emb.h5.tmp4243").write_bytes(b"half a merge")
    with caplog.at_level(logging.INFO, logger="hgc"):
        embed_manifest(manifest, TINY, out, weights=weights, workers=0, progress=False)
    assert "slide 'S3': recomputing embeddings: " in caplog.text and "unreadable" in caplog.text
    assert caplog.text.count("up to date (output), skipped") == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("emb.h5")) == ["emb.h5"]
    np.testing.assert_array_equal(read_embeddings(out, "S1")[1], before)
    assert set(read_attrs(out)) == set(SLIDES)


def test_two_runs_cannot_write_one_output(tmp_path):
    """A second process is refused while the first holds the output; the lock dies with its holder."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom hgc.embed.store import EmbeddingStore\n"
         f"with EmbeddingStore({str(tmp_path / 'e.h5')!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=rf"e\.h5 is being written by .*process {holder.pid}"):
            EmbeddingStore(tmp_path / "e.h5").__enter__()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with EmbeddingStore(tmp_path / "e.h5"):  # killed holder: the lock is free again
        pass
