"""`PaletteSpec`: how one weight tensor is palettized, and what that costs in bytes.

The options are exactly the ones Core ML's `constexpr_lut_to_dense` (iOS 18) can store: a LUT of
2^nbits fp16 entries (vectors of `cluster_dim` entries) per tensor or per group of `group_size`
output channels, indices bit-packed at nbits each, and an optional fp16 scale per output channel.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ._checks import boolean, integer

NBITS: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_grouped_channel")
CLUSTER_DIMS: tuple[int, ...] = (1, 2, 4)
DEFAULT_GROUP_SIZE = 16


@dataclass(frozen=True)
class PaletteSpec:
    """One palettization choice for one weight (output channels on axis 0).

    `group_size` counts output channels sharing one LUT; it applies to `per_grouped_channel` only
    (left `None` it becomes 16) and is `None` for `per_tensor`. Vectors of `cluster_dim` entries run
    along the output-channel axis, as in coremltools.
    """

    nbits: int = 4
    granularity: str = "per_tensor"
    group_size: int | None = None
    cluster_dim: int = 1
    per_channel_scale: bool = False

    def __post_init__(self) -> None:
        # types first, once, here at the boundary: numpy integers become ints, floats are refused
        for name, allowed in (("nbits", f"one of {NBITS}"), ("cluster_dim", f"one of {CLUSTER_DIMS}"),
                              ("group_size", "a positive int")):
            value = getattr(self, name)
            if value is not None or name != "group_size":
                try:
                    object.__setattr__(self, name, integer(value, name))
                except ValueError:
                    raise ValueError(f"{name} must be {allowed} (an integer), got {value!r} "
                                     f"({type(value).__name__})") from None
        object.__setattr__(self, "per_channel_scale", boolean(self.per_channel_scale, "per_channel_scale"))
        if not isinstance(self.granularity, str):
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.nbits not in NBITS:
            raise ValueError(f"nbits must be one of {NBITS} (Core ML's LUT sizes), got {self.nbits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.cluster_dim not in CLUSTER_DIMS:
            raise ValueError(f"cluster_dim must be one of {CLUSTER_DIMS}, got {self.cluster_dim!r}")
        if self.granularity == "per_tensor":
            if self.group_size is not None:
                raise ValueError(
                    "group_size applies to granularity='per_grouped_channel' only; "
                    f"got group_size={self.group_size!r} with 'per_tensor'"
                )
        else:
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise ValueError(f"group_size must be a positive int, got {gs!r}")
            if gs % self.cluster_dim:
                raise ValueError(
                    f"group_size ({gs}) must be a multiple of cluster_dim ({self.cluster_dim})"
                )

    @property
    def n_entries(self) -> int:
        """LUT entries per group: 2^nbits."""
        return 1 << self.nbits

    def n_groups(self, out_channels: int, name: str = "weight") -> int:
        """Number of LUTs for a weight with `out_channels` rows; a clear error where it cannot fit."""
        d = self.cluster_dim
        if self.granularity == "per_tensor":
            if out_channels % d:
                raise ValueError(
                    f"{name}: {out_channels} output channels are not divisible by "
                    f"cluster_dim={d}; use cluster_dim=1"
                )
            return 1
        gs = self.group_size
        assert gs is not None
        if out_channels % gs:
            raise ValueError(
                f"{name}: group_size={gs} does not divide its {out_channels} output channels; "
                f"pick a divisor of {out_channels} or granularity='per_tensor'"
            )
        return out_channels // gs

    def nbytes(self, shape: tuple[int, ...] | Any, name: str = "weight") -> int:
        """Exact stored bytes of a weight of `shape` under this spec.

        Bit-packed indices (nbits per index, one index per `cluster_dim` values), fp16 LUTs of
        2^nbits x cluster_dim entries per group, and one fp16 scale per output channel if any.
        """
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        groups = self.n_groups(shape[0], name)
        index_bytes = math.ceil(numel // self.cluster_dim * self.nbits / 8)
        lut_bytes = groups * self.n_entries * self.cluster_dim * 2
        scale_bytes = 2 * shape[0] if self.per_channel_scale else 0
        return index_bytes + lut_bytes + scale_bytes

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        """Average stored bits per weight element, LUTs and scales included."""
        return 8 * self.nbytes(shape) / math.prod(int(s) for s in shape)

    @property
    def label(self) -> str:
        """Short human label, e.g. `4b`, `4b g16`, `2b g16 v2 s`."""
        parts = [f"{self.nbits}b"]
        if self.granularity == "per_grouped_channel":
            parts.append(f"g{self.group_size}")
        if self.cluster_dim > 1:
            parts.append(f"v{self.cluster_dim}")
        if self.per_channel_scale:
            parts.append("s")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], layer: str | None = None) -> "PaletteSpec":
        """The spec a JSON object describes; a ValueError naming `layer` (if given) and the field."""
        where = f"{layer}: " if layer else ""
        if not isinstance(data, dict):
            raise ValueError(f"{where}a PaletteSpec must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"{where}unknown PaletteSpec field(s) {sorted(map(str, unknown))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}{e}") from None
