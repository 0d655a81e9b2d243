"""Cross-validation folds over slides, named by protocol.

- ``patient-kfold``: leave one patient out (TRIPLEX / DKAN); no section of the test patient is
  ever a training slide or a reference.
- ``slide-loso``: leave one slide out (Hist2ST / SpaHGC). Other sections of the test slide's
  patient stay in the training set and the reference pool, as published; compare numbers only
  within one protocol.
- ``split-file``: a TSV with columns ``slide``, ``fold``, ``role`` (``train`` | ``test``).
- ``all``: one fold, named ``all``, training on every slide and testing none: the model that
  ``hgc train`` fits to predict new slides.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import InputError

PROTOCOLS = ("patient-kfold", "slide-loso", "split-file", "all")
#: The protocols a user cross-validates with (``all`` is ``hgc train``'s single fold).
CV_PROTOCOLS = PROTOCOLS[:3]
PROTOCOL_HELP = ("patient-kfold: leave one patient out; slide-loso: leave one slide out; "
                 "split-file: folds from --split-file.")


def isolates_patients(protocol: str) -> bool:
    """Whether ``protocol`` keeps every section of a test slide's patient out of training and out of
    the references (patient-level folds), rather than only the test slide itself."""
    return protocol == "patient-kfold"
#: Version of the rule :func:`validation_slides` follows; cached graph stores built under another
#: rule are rebuilt (2: the validation slide mirrors the test slide's relation to its patient).
VALIDATION_RULE = 2
#: The name of the one fold of protocol ``all``.
ALL_FOLD = "all"


@dataclass(frozen=True)
class Fold:
    """Training and test slide ids of one fold: disjoint, at least one training slide; no test slide
    only for the fold of protocol ``all``."""

    name: str
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.train:
            raise InputError(f"fold '{self.name}' has no training slide (test: {self.test})")
        both = sorted(set(self.train) & set(self.test))
        if both:
            raise InputError(f"fold '{self.name}': slides {both} are both training and test slides")


def make_folds(patients: dict[str, str], protocol: str, split_file: str | Path | None = None) -> list[Fold]:
    """Folds for ``protocol`` over the slides in ``patients`` (slide id -> patient id).

    Slides and patients keep the order of ``patients`` (the manifest order), so fold names and
    order are reproducible.
    """
    if not patients:
        raise InputError("no slides to split into folds")
    slides = list(patients)
    if protocol == "patient-kfold":
        groups = list(dict.fromkeys(patients.values()))
        if len(groups) < 2:
            raise InputError(
                f"patient-kfold needs at least two patients, but all slides belong to {groups}; "
                "use --protocol slide-loso"
            )
        return [Fold(f"patient-{p}", [s for s in slides if patients[s] != p],
                     [s for s in slides if patients[s] == p]) for p in groups]
    if protocol == "slide-loso":
        if len(slides) < 2:
            raise InputError(f"slide-loso needs at least two slides, got {slides}")
        return [Fold(f"slide-{s}", [t for t in slides if t != s], [s]) for s in slides]
    if protocol == "split-file":
        if split_file is None:
            raise InputError("--protocol split-file needs --split-file")
        return _read_split_file(Path(split_file), patients)
    if protocol == "all":
        return [Fold(ALL_FOLD, slides, [])]
    raise InputError(f"unknown protocol '{protocol}'; expected one of {list(PROTOCOLS)}")


def _read_split_file(path: Path, patients: dict[str, str]) -> list[Fold]:
    if not path.is_file():
        raise InputError(f"split file {path} does not exist")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except pd.errors.EmptyDataError:
        raise InputError(f"split file {path} is empty; expected a header slide, fold, role and one row per slide "
                         "and fold") from None
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for a malformed table
        raise InputError(f"cannot read split file {path} ({type(exc).__name__}: {exc}); expected a TSV with columns "
                         "slide, fold, role") from None
    table = table.apply(lambda c: c.str.strip())
    need = {"slide", "fold", "role"}
    if not need <= set(table.columns):
        raise InputError(f"split file {path} needs columns {sorted(need)}, has {list(table.columns)}")
    unknown = sorted(set(table["slide"]) - set(patients))
    if unknown:
        raise InputError(f"split file {path} names slides not in the manifest: {unknown}")
    bad_role = sorted(set(table["role"]) - {"train", "test"})
    if bad_role:
        raise InputError(f"split file {path}: role must be 'train' or 'test', found {bad_role}")
    if table.empty:
        raise InputError(f"split file {path} has a header but no rows; expected one row per slide and fold")
    folds = []
    for name, rows in table.groupby("fold", sort=False):
        fold = Fold(str(name), list(rows.loc[rows.role == "train", "slide"]), list(rows.loc[rows.role == "test", "slide"]))
        if not fold.test:
            raise InputError(f"split file {path}: fold '{name}' has no test slide")
        folds.append(fold)
    return folds


def validation_slides(fold: Fold, patients: dict[str, str], n: int = 1, seed: int = 0) -> list[str]:
    """``n`` whole training slides of ``fold`` held out for early stopping (never a test slide).

    A validation slide should stand to the training slides as the test slide does, or early
    stopping is tuned to the wrong task: where the test slide's patient has other sections among
    the training slides (slide-loso), slides whose patient keeps another training section come
    first; where it has none (patient-kfold, or ``all`` whose new slides are new patients), slides
    whose patient has no other training section come first. Within that, the choice depends only
    on ``seed`` and the fold. At least one training slide always stays for training, so a fold
    with a single training slide gets no validation slide.
    """
    n = min(n, len(fold.train) - 1)
    if n <= 0:
        return []
    rng = random.Random(f"{seed}:{fold.name}")
    key = {s: rng.random() for s in sorted(fold.train)}
    sections = Counter(patients.get(s) for s in fold.train)
    test_seen = any(sections[patients.get(s)] > 0 for s in fold.test)
    chosen = sorted(fold.train, key=lambda s: ((sections[patients.get(s)] > 1) != test_seen, key[s]))[:n]
    return [s for s in fold.train if s in chosen]
