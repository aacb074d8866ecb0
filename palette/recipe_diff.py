"""What changed between two recipes: per layer (spec, stored bytes), layers only in one of them, and
the totals (size, bits per weight, predicted PSNR). `Recipe.diff`, `palette.diff` and `palette diff` call `diff`.

Two recipes are *equivalent* when they store the model alike: the same target layers with the same
weight shapes, the same spec (or 16 bits) and the same stored LUT for each, and the same bytes of
everything else (hence the same size and bits per weight); with a vector spec (`cluster_dim > 1`)
also the same seed, which its k-means depends on. What does not change the stored model is ignored:
`info` (budget, command, calibration notes), the palette version, the model fingerprint (a recipe
applies to a fine-tune alike; a different fingerprint is listed under `notes`) and the predicted
PSNR, unless `psnr_tol_db` is given: then a predicted PSNR further apart than that is a difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .recipe import Recipe, layer_bytes
from .spec import PaletteSpec


def label(spec: PaletteSpec | None) -> str:
    """A spec's short label; `16-bit` for a layer kept unpalettized."""
    return "16-bit" if spec is None else spec.label


@dataclass(frozen=True)
class LayerChange:
    """One layer in both recipes whose stored form differs (or, with `old`/`new` absent, one layer
    in only one of them: `in_a`/`in_b` say which)."""

    name: str
    old: PaletteSpec | None
    new: PaletteSpec | None
    old_bytes: int
    new_bytes: int
    note: str = ""  # what else differs: the weight shape, the stored LUT
    in_a: bool = True
    in_b: bool = True

    @property
    def delta_bytes(self) -> int:
        return self.new_bytes - self.old_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "old": self.old.to_dict() if self.in_a and self.old is not None else None,
            "new": self.new.to_dict() if self.in_b and self.new is not None else None,
            "old_label": label(self.old) if self.in_a else None,
            "new_label": label(self.new) if self.in_b else None,
            "old_bytes": self.old_bytes,
            "new_bytes": self.new_bytes,
            "delta_bytes": self.delta_bytes,
            "note": self.note,
        }


@dataclass(frozen=True)
class Totals:
    """A recipe's whole-model figures."""

    size_bytes: int
    bits_per_weight: float
    predicted_psnr: float | None

    @classmethod
    def of(cls, recipe: Recipe) -> "Totals":
        return cls(recipe.size_bytes, recipe.bits_per_weight, recipe.predicted_psnr)

    def to_dict(self) -> dict[str, Any]:
        return {"size_bytes": self.size_bytes, "bits_per_weight": self.bits_per_weight,
                "predicted_psnr": self.predicted_psnr}


@dataclass(frozen=True)
class RecipeDiff:
    """The differences of recipe b from recipe a; falsy (and `str` says so) when equivalent."""

    changed: tuple[LayerChange, ...]  # in both, stored differently, in a's layer order
    only_a: tuple[LayerChange, ...]  # layers only a has (new_bytes 0)
    only_b: tuple[LayerChange, ...]  # layers only b has (old_bytes 0)
    a: Totals
    b: Totals
    other: tuple[str, ...] = ()  # differences beyond layers: fixed bytes, seed, predicted PSNR
    notes: tuple[str, ...] = ()  # what differs but does not count (fingerprint)

    def __bool__(self) -> bool:
        return bool(self.changed or self.only_a or self.only_b or self.other)

    @property
    def equivalent(self) -> bool:
        return not self

    def to_dict(self) -> dict[str, Any]:
        def delta(x: float | None, y: float | None) -> float | None:
            return None if x is None or y is None else y - x

        return {
            "equivalent": self.equivalent,
            "changed": [c.to_dict() for c in self.changed],
            "only_in_a": [c.to_dict() for c in self.only_a],
            "only_in_b": [c.to_dict() for c in self.only_b],
            "totals": {"a": self.a.to_dict(), "b": self.b.to_dict(), "delta": {
                "size_bytes": self.b.size_bytes - self.a.size_bytes,
                "bits_per_weight": self.b.bits_per_weight - self.a.bits_per_weight,
                "predicted_psnr": delta(self.a.predicted_psnr, self.b.predicted_psnr)}},
            "other": list(self.other),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        rows: list[str] = []
        if not self:
            rows.append("recipes are equivalent (same layers, specs and stored bytes)")
        layers = [*self.changed, *self.only_a, *self.only_b]
        if layers:
            width = max(24, *(len(c.name) for c in layers))
            rows.append(f"{'layer':<{width}} {'a':>9} {'b':>9} {'a bytes':>10} {'b bytes':>10} {'delta B':>10}")
            for c in layers:
                old = label(c.old) if c.in_a else "absent"
                new = label(c.new) if c.in_b else "absent"
                rows.append(f"{c.name:<{width}} {old:>9} {new:>9} {c.old_bytes:>10,} {c.new_bytes:>10,} "
                            f"{c.delta_bytes:>+10,}" + (f"  ({c.note})" if c.note else ""))
        rows.extend(self.other)
        psnr = [_f(t.predicted_psnr) for t in (self.a, self.b)]
        rows.append(f"size {self.a.size_bytes:,} B -> {self.b.size_bytes:,} B "
                    f"({self.b.size_bytes - self.a.size_bytes:+,} B); bits/weight {self.a.bits_per_weight:.4f} -> "
                    f"{self.b.bits_per_weight:.4f}; predicted PSNR {psnr[0]} -> {psnr[1]} dB")
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _same_lut(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def diff(a: Recipe, b: Recipe, *, psnr_tol_db: float | None = None) -> RecipeDiff:
    """The differences of `b` from `a` (see the module docstring for what counts): every layer in
    both whose spec, shape or stored LUT differs, with its stored bytes in each; the layers only
    one has; the totals. `psnr_tol_db`: also count predicted PSNRs further apart than that (a
    recipe without a predicted PSNR against one with it counts too)."""
    if not isinstance(a, Recipe) or not isinstance(b, Recipe):
        raise ValueError(f"diff takes two Recipes, got {type(a).__name__} and {type(b).__name__}")
    if psnr_tol_db is not None and not (math.isfinite(psnr_tol_db) and psnr_tol_db >= 0):
        raise ValueError(f"psnr_tol_db must be a non-negative number, got {psnr_tol_db!r}")
    changed, only_a, only_b = [], [], []
    for n, spec in a.layers.items():
        old_bytes = layer_bytes(spec, a.shapes[n])
        if n not in b.layers:
            only_a.append(LayerChange(n, spec, None, old_bytes, 0, in_b=False))
            continue
        new = b.layers[n]
        notes = []
        if a.shapes[n] != b.shapes[n]:
            notes.append(f"shape {'x'.join(map(str, a.shapes[n]))} -> {'x'.join(map(str, b.shapes[n]))}")
        if not _same_lut(a.luts.get(n), b.luts.get(n)):
            notes.append("stored LUT differs")
        if spec != new or notes:
            changed.append(LayerChange(n, spec, new, old_bytes, layer_bytes(new, b.shapes[n]), "; ".join(notes)))
    for n, spec in b.layers.items():
        if n not in a.layers:
            only_b.append(LayerChange(n, None, spec, 0, layer_bytes(spec, b.shapes[n]), in_a=False))
    other = []
    if a.fixed_bytes != b.fixed_bytes:
        other.append(f"non-target parameters {a.fixed_bytes:,} B -> {b.fixed_bytes:,} B "
                     f"({b.fixed_bytes - a.fixed_bytes:+,} B)")
    vectors = any(s is not None and s.cluster_dim > 1 for r in (a, b) for s in r.layers.values())
    if vectors and a.seed != b.seed:
        other.append(f"seed {a.seed} -> {b.seed} (vector palettes depend on it)")
    pa, pb = a.predicted_psnr, b.predicted_psnr
    if psnr_tol_db is not None and (
        (pa is None) != (pb is None) or (pa is not None and pb is not None and abs(pb - pa) > psnr_tol_db)
    ):
        other.append(f"predicted PSNR {_f(pa)} -> {_f(pb)} dB differs by more than {psnr_tol_db:g} dB")
    notes = []
    if a.model.fingerprint != b.model.fingerprint:
        notes.append(f"computed for other weights ({a.model.cls} {a.model.fingerprint[:19]} vs "
                     f"{b.model.cls} {b.model.fingerprint[:19]})")
    return RecipeDiff(tuple(changed), tuple(only_a), tuple(only_b), Totals.of(a), Totals.of(b), tuple(other),
                      tuple(notes))


__all__ = ["LayerChange", "RecipeDiff", "Totals", "diff"]
