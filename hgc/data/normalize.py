"""Expression transforms, fitted on training slides only and saved beside the graphs.

Two transforms:

- ``log1p`` (default): ``log1p(counts / library_size * 1e4)`` where the library size is the
  spot's total over *all* genes of the slide. Nothing is fitted.
- ``log10-minmax`` (SpaHGC): ``log10(counts + 1)`` then per-gene min-max scaling with the
  minimum and maximum over the training spots. Test values may fall outside [0, 1]; they are not
  clipped (clipping would hide a distribution shift). Genes constant on the training spots map
  to 0.

``to_dict()`` / :meth:`Normaliser.from_dict` round-trip the fitted state through JSON so the
graph store and run directories can apply the same transform to new slides.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np

from ..errors import InputError
from .genes import TARGET_SUM, expression_matrix, log1p_normalized
from .slide import Slide

NORMALISERS = ("log1p", "log10-minmax")


class Normaliser:
    """Base class: ``fit`` on training slides, then ``transform`` any slide to (n, G) float32."""

    name: ClassVar[str]
    _registry: ClassVar[dict[str, type["Normaliser"]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        Normaliser._registry[cls.name] = cls

    def fit(self, slides: Sequence[Slide], genes: Sequence[str]) -> "Normaliser":
        return self

    def transform(self, slide: Slide, genes: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "Normaliser":
        """Rebuild a (fitted) normaliser from :meth:`to_dict` output."""
        name = d.get("name")
        if name not in Normaliser._registry:
            raise InputError(f"unknown normaliser '{name}'; expected one of {list(NORMALISERS)}")
        return Normaliser._registry[name]._from_state(d)

    @classmethod
    def _from_state(cls, d: dict) -> "Normaliser":
        return cls()


class Log1pNormaliser(Normaliser):
    """Library-size scaling to ``target_sum`` then natural ``log1p``; stateless."""

    name = "log1p"

    def __init__(self, target_sum: float = TARGET_SUM) -> None:
        self.target_sum = float(target_sum)

    def transform(self, slide: Slide, genes: Sequence[str]) -> np.ndarray:
        return log1p_normalized(slide, genes, self.target_sum)

    def to_dict(self) -> dict:
        return {"name": self.name, "target_sum": self.target_sum}

    @classmethod
    def _from_state(cls, d: dict) -> "Normaliser":
        return cls(d.get("target_sum", TARGET_SUM))


class Log10MinMaxNormaliser(Normaliser):
    """SpaHGC's transform: ``log10(x + 1)``, then per-gene min-max from the training spots."""

    name = "log10-minmax"

    def __init__(self) -> None:
        self.genes: list[str] | None = None
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def fit(self, slides: Sequence[Slide], genes: Sequence[str]) -> "Normaliser":
        if not slides:
            raise InputError("log10-minmax normalisation is fitted on training slides, but none were given")
        logged = np.concatenate([np.log10(expression_matrix(s, genes)[0] + 1.0) for s in slides])
        self.genes = list(genes)
        self.min = logged.min(axis=0).astype(np.float32)
        self.max = logged.max(axis=0).astype(np.float32)
        return self

    def transform(self, slide: Slide, genes: Sequence[str]) -> np.ndarray:
        if self.genes is None:
            raise InputError("log10-minmax normaliser used before fit() on training slides")
        if list(genes) != self.genes:
            raise InputError(
                f"slide {slide.id}: log10-minmax was fitted on {len(self.genes)} other genes "
                f"than the {len(genes)} requested"
            )
        logged = np.log10(expression_matrix(slide, genes)[0] + 1.0)
        span = self.max - self.min
        scaled = np.divide(logged - self.min, span, out=np.zeros_like(logged), where=span > 0)
        return scaled.astype(np.float32)

    def to_dict(self) -> dict:
        if self.genes is None:
            return {"name": self.name}
        return {"name": self.name, "genes": self.genes,
                "min": self.min.tolist(), "max": self.max.tolist()}

    @classmethod
    def _from_state(cls, d: dict) -> "Normaliser":
        out = cls()
        if "genes" in d:
            out.genes = list(d["genes"])
            out.min = np.asarray(d["min"], dtype=np.float32)
            out.max = np.asarray(d["max"], dtype=np.float32)
        return out


def make_normaliser(name: str) -> Normaliser:
    """A fresh (unfitted) normaliser by name: ``log1p`` or ``log10-minmax``."""
    if name not in Normaliser._registry:
        raise InputError(f"unknown normalisation '{name}'; expected one of {list(NORMALISERS)}")
    return Normaliser._registry[name]()
