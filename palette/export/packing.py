"""Bit packing of palette indices: `nbits` per index, least significant bit first.

This is the layout Core ML's blob storage uses for `uint1`..`uint6` tensors (coremltools'
`pack_elements_into_bits`): index i occupies bits [i*nbits, (i+1)*nbits) of the byte stream,
where bit b lives in byte b // 8 at position b % 8 (little-endian bit order). The last byte is
zero-padded.
"""

from __future__ import annotations

import math

import numpy as np


def packed_nbytes(count: int, nbits: int) -> int:
    """Bytes taken by `count` indices of `nbits` bits each."""
    return math.ceil(count * nbits / 8)


def pack_bits(indices: np.ndarray, nbits: int) -> np.ndarray:
    """Pack unsigned integers below 2**nbits into a flat uint8 array, LSB first."""
    flat = np.ascontiguousarray(indices, dtype=np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >= 1 << nbits:
        raise ValueError(f"an index {int(flat.max())} does not fit in {nbits} bits")
    if nbits == 8:
        return flat.copy()
    bits = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :nbits]
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` indices as uint8."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != packed_nbytes(count, nbits):
        raise ValueError(
            f"{packed.size} packed bytes cannot hold exactly {count} indices of {nbits} bits "
            f"(expected {packed_nbytes(count, nbits)})"
        )
    if nbits == 8:
        return packed.copy()
    bits = np.unpackbits(packed, bitorder="little")[: count * nbits].reshape(count, nbits)
    return np.packbits(bits, axis=1, bitorder="little").reshape(-1)
