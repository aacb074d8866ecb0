"""ANE-friendly split-einsum attention: reversible rewrite and its validation."""

from palette.ane.split_einsum import SplitEinsumState, is_split_einsum, restore_attention, split_einsum
from palette.ane.validate import CallInputs, ProgramOps, SplitEinsumReport, psnr, validate_split_einsum

__all__ = [
    "CallInputs",
    "ProgramOps",
    "SplitEinsumReport",
    "SplitEinsumState",
    "is_split_einsum",
    "psnr",
    "restore_attention",
    "split_einsum",
    "validate_split_einsum",
]
