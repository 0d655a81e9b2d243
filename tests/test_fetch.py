"""``hgc data fetch`` against a local HTTP server that serves ../shared/data in the upstream layout."""
from __future__ import annotations

import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from hgc._fingerprint import file_sha256
from hgc.cli import main
from hgc.data import read_manifest
from hgc.data.fetch import HER2ST_SHA256, HIST2ST_PANELS, fetch_dataset
from hgc.errors import HgcError, InputError


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves files under ``server.root``; honours ``Range: bytes=N-``; can corrupt chosen files
    or drop the connection half-way through them (once)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        server.requests.append((rel, self.headers.get("Range")))
        path = (server.root / rel).resolve()
        if not path.is_relative_to(server.root) or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if rel in server.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if rel in server.drop:  # promise the whole body, send half, hang up
            server.drop.discard(rel)
            self.wfile.write(data[start : (start + len(data)) // 2])
            return
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(shared_data: Path) -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    httpd.root = shared_data.resolve()
    httpd.requests = []
    httpd.corrupt = set()
    httpd.drop = set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server: ThreadingHTTPServer, folder: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{folder}"


@pytest.fixture(scope="module")
def fetched(server, tmp_path_factory) -> Path:
    """One full download of both datasets, shared by the tests of this module."""
    dest = tmp_path_factory.mktemp("fetched")
    fetch_dataset("her2st", dest, base_url=_url(server, "her2st"))
    fetch_dataset("hist2st-panels", dest, base_url=_url(server, "gene_panels/upstream"))
    return dest


@pytest.fixture()
def requests(server) -> list:
    server.requests.clear()
    server.corrupt.clear()
    server.drop.clear()
    return server.requests


def _prepopulate(fetched: Path, dest: Path, skip: str) -> None:
    """Verified copies (hard links) of every her2st file but ``skip``."""
    for rel in HER2ST_SHA256:
        if rel != skip:
            (dest / "her2st" / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(fetched / "her2st" / rel, dest / "her2st" / rel)


def test_full_fetch(fetched: Path, shared_data: Path) -> None:
    folder = fetched / "her2st"
    for rel, sha in HER2ST_SHA256.items():
        assert file_sha256(folder / rel) == sha == file_sha256(shared_data / "her2st" / rel)
    assert not list(fetched.rglob("*.part"))
    manifest = pd.read_csv(folder / "manifest.tsv", sep="\t")
    samples = pd.read_csv(shared_data / "her2st" / "samples.tsv", sep="\t")
    assert list(manifest.columns) == [
        "slide", "patient", "format", "counts", "spots", "image", "microns_per_pixel", "annotations",
    ]
    assert (manifest["format"] == "st").all()
    expected = samples.rename(columns={"section": "slide", "clusters": "annotations"})
    pd.testing.assert_frame_equal(manifest.drop(columns="format"), expected[manifest.columns.drop("format")])
    m = read_manifest(folder / "manifest.tsv", fetched)
    assert m.slide_ids == ["B4", "C2", "C3", "C4", "C5", "C6"]
    assert m.entry("B4").paths["image"] == (folder / "data/ST-imgs/B/B4/BT10737_D2_HE.jpg").resolve()
    assert m.entry("C6").annotations == (folder / "res/ST-cluster/lbl/C6-cluster-annotation.tsv.gz").resolve()
    b4 = m.load("B4")  # the downloaded files make a valid slide
    assert (b4.n_spots, b4.patient, b4.microns_per_pixel) == (283, "B", 0.6889)


def test_panels_match_shared_text_files(fetched: Path, shared_data: Path) -> None:
    for _upstream, (text_name, _sha) in HIST2ST_PANELS.items():
        written = (fetched / "gene_panels" / text_name).read_bytes()
        assert written == (shared_data / "gene_panels" / text_name).read_bytes()


def test_second_fetch_downloads_nothing_cli(fetched: Path, server, requests: list) -> None:
    result = CliRunner().invoke(
        main, ["data", "fetch", "her2st", "--dest", str(fetched), "--base-url", _url(server, "her2st")]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(fetched / "her2st" / "manifest.tsv"))
    assert requests == []  # every file was present and verified


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_resume_partial_download(fetched, server, requests, tmp_path: Path, fraction: float) -> None:
    rel = "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg"
    _prepopulate(fetched, tmp_path, skip=rel)
    data = (fetched / "her2st" / rel).read_bytes()
    offset = int(len(data) * fraction)
    part = tmp_path / "her2st" / (rel + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data[:offset])
    fetch_dataset("her2st", tmp_path, base_url=_url(server, "her2st"))
    assert requests == [(f"her2st/{rel}", f"bytes={offset}-")]  # only the missing bytes were asked for
    assert (tmp_path / "her2st" / rel).read_bytes() == data
    assert not part.exists() and (tmp_path / "her2st" / "manifest.tsv").is_file()


def test_dropped_connection_then_resume(fetched, server, requests, tmp_path: Path) -> None:
    rel = "data/ST-imgs/B/B4/BT10737_D2_HE.jpg"
    _prepopulate(fetched, tmp_path, skip=rel)
    server.drop.add(f"her2st/{rel}")
    base = _url(server, "her2st")
    with pytest.raises(HgcError, match=r"connection closed after \d+ of \d+ bytes.*kept and resumed"):
        fetch_dataset("her2st", tmp_path, base_url=base)
    target = tmp_path / "her2st" / rel
    part = target.with_name(target.name + ".part")
    size = len((fetched / "her2st" / rel).read_bytes())
    assert not target.exists() and part.stat().st_size == size // 2
    assert not (tmp_path / "her2st" / "manifest.tsv").exists()
    fetch_dataset("her2st", tmp_path, base_url=base)
    assert requests[-1] == (f"her2st/{rel}", f"bytes={size // 2}-")
    assert file_sha256(target) == HER2ST_SHA256[rel] and not part.exists()


def test_corrupted_download(fetched, server, requests, tmp_path: Path) -> None:
    rel = "data/ST-cnts/C3.tsv.gz"
    _prepopulate(fetched, tmp_path, skip=rel)
    server.corrupt.add(f"her2st/{rel}")
    with pytest.raises(HgcError) as err:
        fetch_dataset("her2st", tmp_path, base_url=_url(server, "her2st"))
    msg = str(err.value)
    assert f"her2st/{rel}" in msg and HER2ST_SHA256[rel] in msg and "deleted" in msg
    target = tmp_path / "her2st" / rel
    assert not target.exists() and not target.with_name(target.name + ".part").exists()
    assert not (tmp_path / "her2st" / "manifest.tsv").exists()


def test_unreachable_mirror_cli(server, requests, tmp_path: Path) -> None:
    base = _url(server, "no-such-mirror")
    result = CliRunner().invoke(
        main, ["data", "fetch", "hist2st-panels", "--dest", str(tmp_path), "--base-url", base]
    )
    assert result.exit_code == 1
    assert f"cannot download {base}/her_hvg_cut_1000.npy" in result.output
    assert "--base-url" in result.output and "place the file at" in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.rglob("*.npy*"))


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown dataset 'cscc'; expected one of her2st, hist2st-panels"):
        fetch_dataset("cscc", tmp_path)


@pytest.mark.parametrize("style", ["file-url", "folder"])
def test_fetch_from_a_local_mirror(tmp_path, shared_data, style):
    """A mirror on disk works like one on a server (as file:// URL or plain folder), verified the same way."""
    mirror = (shared_data / "gene_panels" / "upstream").resolve()
    base = mirror.as_uri() if style == "file-url" else str(mirror)
    r = CliRunner().invoke(main, ["data", "fetch", "hist2st-panels", "--dest", str(tmp_path), "--base-url", base])
    assert r.exit_code == 0, r.output
    for upstream, (text_name, sha256) in HIST2ST_PANELS.items():
        assert file_sha256(tmp_path / "gene_panels" / "upstream" / upstream) == sha256
        assert (tmp_path / "gene_panels" / text_name).read_text() == (shared_data / "gene_panels" / text_name).read_text()
    r = CliRunner().invoke(main, ["data", "fetch", "her2st", "--dest", str(tmp_path / "x"), "--base-url", str(tmp_path)])
    assert r.exit_code == 1 and "the mirror has no file" in r.output and "Traceback" not in r.output
