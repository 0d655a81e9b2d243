"""Download public datasets from their upstream, verified against pinned checksums.

Files arrive as ``<name>.part`` and are renamed only once their sha256 matches, so a file under its
final name is always the published one; an interrupted download resumes with an HTTP Range request.
Only the standard library is used for HTTP, so this works wherever Python does.
"""
from __future__ import annotations

import http.client
import logging
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .._fingerprint import file_sha256
from .._outputs import check_writable, write_text
from .._progress import progress
from ..errors import HgcError, InputError

log = logging.getLogger(__name__)

HER2ST_URL = "https://raw.githubusercontent.com/almaan/her2st/master"
HIST2ST_URL = "https://raw.githubusercontent.com/biomed-AI/Hist2ST/main/data"
DATASETS = ("her2st", "hist2st-panels")

_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class _Section:
    """One her2st section with a full-resolution image; paths are upstream repository paths."""

    slide: str
    patient: str
    image: str
    microns_per_pixel: float  # HEST-1k's estimate for this sample

    @property
    def counts(self) -> str:
        return f"data/ST-cnts/{self.slide}.tsv.gz"

    @property
    def spots(self) -> str:
        return f"data/ST-spotfiles/{self.slide}_selection.tsv"

    @property
    def annotations(self) -> str:
        return f"res/ST-cluster/lbl/{self.slide}-cluster-annotation.tsv.gz"


HER2ST_SECTIONS = (
    _Section("B4", "B", "data/ST-imgs/B/B4/BT10737_D2_HE.jpg", 0.6889),
    _Section("C2", "C", "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg", 0.6961),
    _Section("C3", "C", "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg", 0.6691),
    _Section("C4", "C", "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg", 0.6901),
    _Section("C5", "C", "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg", 0.6907),
    _Section("C6", "C", "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg", 0.6982),
)

#: sha256 of the upstream files (almaan/her2st, master), pinned so a changed upstream is noticed.
HER2ST_SHA256 = {
    "data/ST-cnts/B4.tsv.gz": "e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb",
    "data/ST-cnts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
    "data/ST-cnts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
    "data/ST-cnts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
    "data/ST-cnts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
    "data/ST-cnts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
    "data/ST-imgs/B/B4/BT10737_D2_HE.jpg": "3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d",
    "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
    "data/ST-spotfiles/B4_selection.tsv": "192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0",
    "data/ST-spotfiles/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    "data/ST-spotfiles/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    "data/ST-spotfiles/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    "data/ST-spotfiles/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    "data/ST-spotfiles/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    "res/ST-cluster/lbl/B4-cluster-annotation.tsv.gz": "ea7ce6d9630921a9b0d03178988192b7c71baec19eb183ebdfdb991e47d690e4",
    "res/ST-cluster/lbl/C2-cluster-annotation.tsv.gz": "3211500325b1be1cd2be7480f2b094a48647fc25df4d8fe6afb8c48c15650ece",
    "res/ST-cluster/lbl/C3-cluster-annotation.tsv.gz": "a1522a14855bc2022ccbb9ea9cbae59837cbcd310bc4c02727ae6bfa37e6d369",
    "res/ST-cluster/lbl/C4-cluster-annotation.tsv.gz": "a5cc7a3a40983a21ea8400145c80a7dc5b13e7468b987ec0610f4c2123978c71",
    "res/ST-cluster/lbl/C5-cluster-annotation.tsv.gz": "5929e9183e09717891fce94a71ec94551a86d5267ebb085067ac1d71894bc4ea",
    "res/ST-cluster/lbl/C6-cluster-annotation.tsv.gz": "bc1234a7a05073a65017f7c0c101547ae2d3c9aa37b895a27dafd9c33842f9d2",
    # maps (patient, cluster) to the tissue the authors annotated it as
    "res/ST-cluster/motivation.csv": "b7701748b5de40e63771f032a864b5812f9b2aa638459db2257af4ac519f8234",
}

#: Hist2ST gene panels: upstream NumPy file -> (text file written, sha256 of the upstream file).
HIST2ST_PANELS = {
    "her_hvg_cut_1000.npy": (
        "her2st_hist2st_785.txt", "c3492478d462c72796a2f9603302af8e0b34cb884cd55cbd864c193001c9402b"
    ),
    "skin_hvg_cut_1000.npy": (
        "cscc_hist2st_171.txt", "126e6bdc55966c2c0289e0727d4afdd1983ed3e985ca99b02f9bba3bc59765a9"
    ),
}

MANIFEST_COLUMNS = (
    "slide", "patient", "format", "counts", "spots", "image", "microns_per_pixel", "annotations",
)


def fetch_dataset(name: str, dest: str | Path, base_url: str | None = None) -> Path:
    """Download dataset ``name`` under ``dest``; returns the her2st manifest / the panel folder.

    ``base_url`` replaces the upstream address (a mirror with the same file layout).
    Files already present with the right checksum are not downloaded again.
    """
    check_writable(Path(dest) / name)
    if name == "her2st":
        return fetch_her2st(dest, base_url)
    if name == "hist2st-panels":
        return fetch_hist2st_panels(dest, base_url)
    raise InputError(f"unknown dataset '{name}'; expected one of {', '.join(DATASETS)}")


def fetch_her2st(dest: str | Path, base_url: str | None = None) -> Path:
    """The six her2st sections with full-resolution images, and ``<dest>/her2st/manifest.tsv``.

    The manifest is written last, so its presence means every file it names was verified.
    """
    folder = Path(dest) / "her2st"
    base = (base_url or HER2ST_URL).rstrip("/")
    for rel, sha256 in progress(HER2ST_SHA256.items(), desc="her2st", unit="file", leave=False):
        download(f"{base}/{rel}", folder / rel, sha256)
    table = pd.DataFrame(
        [
            (s.slide, s.patient, "st", s.counts, s.spots, s.image, s.microns_per_pixel, s.annotations)
            for s in HER2ST_SECTIONS
        ],
        columns=list(MANIFEST_COLUMNS),
    )
    manifest = write_text(folder / "manifest.tsv", table.to_csv(sep="\t", index=False))
    log.info("her2st: %d sections in %s", len(table), manifest)
    return manifest


def fetch_hist2st_panels(dest: str | Path, base_url: str | None = None) -> Path:
    """Hist2ST's gene panels as text files (one symbol per line) in ``<dest>/gene_panels``.

    The upstream files are NumPy pickles; they are loaded only after their checksum matched.
    """
    folder = Path(dest) / "gene_panels"
    base = (base_url or HIST2ST_URL).rstrip("/")
    for upstream, (text_name, sha256) in HIST2ST_PANELS.items():
        path = download(f"{base}/{upstream}", folder / "upstream" / upstream, sha256)
        genes = np.load(path, allow_pickle=True)  # safe: the pinned checksum matched
        write_text(folder / text_name, "".join(f"{g}\n" for g in genes.tolist()))
        log.info("gene panel %s: %d genes", folder / text_name, len(genes))
    return folder


def download(url: str, target: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``target`` unless it is already there with checksum ``sha256``.

    Streams to ``target.part`` (resumed with a Range request if it exists), checks the sha256,
    then renames; a ``.part`` that fails the check is deleted so the next try starts afresh.
    """
    target = Path(target)
    if target.is_file():
        if file_sha256(target) == sha256:
            log.debug("%s is present and verified", target)
            return target
        log.warning("%s does not match its pinned sha256; downloading it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("", "file"):  # a local mirror: --base-url file:///data/mirror or /data/mirror
        return _copy_local(url, target, part, sha256)
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"hgc/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            if offset and response.status != 206:
                log.info("%s: server does not resume downloads; starting over", url)
                offset = 0
            expected = response.length  # body size; http.client counts it down while reading
            received = _stream(response, part, offset, expected, target.name)
        if expected is not None and received < expected:  # a dropped connection reads as EOF
            raise ConnectionError(
                f"connection closed after {offset + received} of {offset + expected} bytes"
            )
    except urllib.error.HTTPError as exc:
        if not (exc.code == 416 and offset):  # 416 on resume: the .part is already complete
            raise _network_error(url, target, part, exc) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _network_error(url, target, part, exc) from exc
    return _verify_and_rename(url, part, target, sha256)


def _verify_and_rename(url: str, part: Path, target: Path, sha256: str) -> Path:
    digest = file_sha256(part)
    if digest != sha256:
        part.unlink()
        raise HgcError(
            f"download of {url} has sha256 {digest}, expected {sha256}; deleted it. The upstream "
            f"file changed or the transfer was corrupted: run the command again, or place a "
            f"verified copy at {target}"
        )
    os.replace(part, target)
    return target


def _copy_local(url: str, target: Path, part: Path, sha256: str) -> Path:
    """``download`` from a local mirror: copy, verify, rename."""
    split = urllib.parse.urlsplit(url)
    source = Path(urllib.request.url2pathname(split.path)) if split.scheme == "file" else Path(url)
    if not source.is_file():
        raise HgcError(f"the mirror has no file {source} (expected the upstream layout under --base-url)")
    try:
        shutil.copyfile(source, part)
    except OSError as exc:
        raise HgcError(f"cannot copy {source} to {part}: {exc}") from None
    return _verify_and_rename(url, part, target, sha256)


def _stream(response, part: Path, offset: int, length: int | None, label: str) -> int:
    """Write the response body to ``part`` after its first ``offset`` bytes; returns bytes read."""
    total = None if length is None else offset + length
    received = 0
    with open(part, "ab" if offset else "wb") as fh, progress(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        desc=label,
        leave=False,
        disable=total is None or total < _PROGRESS_MIN_BYTES,
    ) as bar:
        while chunk := response.read(_CHUNK):
            fh.write(chunk)
            bar.update(len(chunk))
            received += len(chunk)
    return received


def _network_error(url: str, target: Path, part: Path, exc: Exception) -> HgcError:
    kept = f"; the partial file {part} is kept and resumed next time" if part.is_file() else ""
    return HgcError(
        f"cannot download {url}: {exc}{kept}. If this machine cannot reach it, use --base-url "
        f"(base_url=) to point at a mirror with the same layout, or place the file at {target} "
        "yourself (it is checked against its pinned sha256)"
    )


