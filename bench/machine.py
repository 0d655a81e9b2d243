"""What a benchmark ran on: every result JSON carries this, so a number is never quoted without
its machine, library versions and code version.

Missing pieces (no GPU, no DGL, not a git checkout) are ``None``, never an error: the description
must work on every machine a benchmark runs on.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Libraries whose versions decide the figures (import name -> key in the description).
LIBRARIES: dict[str, str] = {
    "torch": "torch",
    "dgl": "dgl",
    "torch_geometric": "torch_geometric",
    "faiss": "faiss",
    "numpy": "numpy",
    "timm": "timm",
}


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def library_version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken optional install (e.g. DGL on new torch) is "missing"
        return None
    return str(getattr(mod, "__version__", "unknown"))


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def git_commit(repo: Path = REPO) -> str | None:
    """HEAD of the checkout, with ``+dirty`` when files differ from it (so a figure measured on
    uncommitted code says so); $HGC_GIT_COMMIT where the tree was copied without .git (a GPU host)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        # tracked files only: result files a run writes into bench/results/ do not change the code
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HGC_GIT_COMMIT") or None
    return head + ("+dirty" if dirty else "") if head else None


def hgc_version() -> str | None:
    try:
        from hgc import __version__
    except ImportError:
        return None
    return __version__


def shared_data_root() -> Path | None:
    """The real-data folder benchmarks read: $HGC_DATA, else ../shared/data beside the repo, else None."""
    for candidate in (os.environ.get("HGC_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "her2st").is_dir():
            return Path(candidate)
    return None


def describe() -> dict[str, Any]:
    """The machine and software of this process, as a JSON-ready dict."""
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "ram_gib": ram_gib(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {key: library_version(module) for module, key in LIBRARIES.items()},
        "hgc_version": hgc_version(),
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def short(machine: dict[str, Any]) -> str:
    """One line naming the machine, for table captions."""
    where = machine["gpu"] or f"{machine['cpu']} ({machine['cores']} cores)"
    v = machine["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "dgl", "torch_geometric", "faiss") if v.get(k))
    return f"{where}; {libs}"


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=2))
