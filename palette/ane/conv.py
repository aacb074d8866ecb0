"""A 1x1 Conv2d that stands in for an nn.Linear without copying its weight.

The ANE prefers channels-first (B, C, 1, S) tensors, where a Linear is a 1x1 convolution. The conv's
weight is a view of the Linear's weight storage, shape (O, I, 1, 1), and the bias is the very same
Parameter, so an in-place edit of either (palettization writes LUT[indices] into the weight) is seen
by both, and putting the Linear back is exact. Palettization flattens every axis but the output
channel, so a (O, I) weight and its (O, I, 1, 1) view get the same palette.

Compression metadata that coremltools reads from module buffers (`_COREML_/...`) moves with the
layer; a LUT's rank follows the weight's (rank + 2), so it gains or loses the two 1-sized kernel axes.
"""

from __future__ import annotations

import torch
from torch import nn

from palette import metadata



class Conv1x1(nn.Conv2d):
    """1x1 Conv2d over (B, I, 1, S) that computes `linear` on (B, S, I), sharing its parameters.

    Gradients flow to this module's own weight Parameter, not the Linear's: it is meant for
    inference and conversion.
    """

    def __init__(self, linear: nn.Linear) -> None:
        # Built on the meta device so no throwaway weight is allocated and initialised.
        super().__init__(linear.in_features, linear.out_features, 1, bias=False, device="meta")
        weight = linear.weight
        self.weight = nn.Parameter(
            weight.detach().view(*weight.shape, 1, 1), requires_grad=weight.requires_grad
        )
        self.bias = linear.bias
        _move_coreml_buffers(linear, self, add_kernel_axes=True)

    def to_linear(self, linear: nn.Linear) -> nn.Linear:
        """Give `linear` (the module this conv came from) this conv's current state and return it.

        If the weight was rebound rather than edited in place, the Linear takes the new values;
        the old storage is left untouched (someone may hold it as a backup).
        """
        weight = self.weight.detach()
        if weight.untyped_storage().data_ptr() != linear.weight.untyped_storage().data_ptr():
            linear.weight.data = weight.reshape(linear.weight.shape)
        if self.bias is not linear.bias:
            linear.bias = self.bias
        _move_coreml_buffers(self, linear, add_kernel_axes=False)
        return linear


def _move_coreml_buffers(src: nn.Module, dst: nn.Module, add_kernel_axes: bool) -> None:
    """Move `_COREML_` buffers from `src` to `dst`, reshaping the LUT for the weight's new rank."""
    names = [name for name, _ in src.named_buffers(recurse=False) if name.startswith(metadata.PREFIX)]
    for name in names:
        value = src._buffers.pop(name)
        if name == metadata.LUT and value is not None:
            value = _reshape_lut(value, add_kernel_axes)
        dst.register_buffer(name, value, persistent=name not in src._non_persistent_buffers_set)


def _reshape_lut(lut: torch.Tensor, add_kernel_axes: bool) -> torch.Tensor:
    """Linear LUT (G_out, G_in, K[, D]) <-> conv LUT (G_out, G_in, 1, 1, K[, D])."""
    if add_kernel_axes:
        return lut.reshape(*lut.shape[:2], 1, 1, *lut.shape[2:])
    if lut.shape[2:4] != (1, 1):
        raise ValueError(f"conv LUT of shape {tuple(lut.shape)} has no 1x1 kernel axes")
    return lut.reshape(*lut.shape[:2], *lut.shape[4:])
