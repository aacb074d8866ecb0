"""The PSNR-vs-size experiment leaves the model's weights bit-identical, and the plot writes a PNG."""

from __future__ import annotations

import torch
from torch import nn

from palette import Candidates, make_probe_set, probe_sensitivity
from palette.experiments import linear8_palette, psnr_size_curve
from palette.plot import plot_psnr_vs_size


def test_plot_writes_png_and_keeps_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).eval()
    probe = make_probe_set(model, (torch.randn(8, 64),))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = probe_sensitivity(model, probe, Candidates(nbits=(1, 2, 4, 8), granularities=("per_tensor",)),
                             progress=False, n_probes=2)
    curve = psnr_size_curve(model, sens, probe, bits=(2, 4))
    out = plot_psnr_vs_size(tmp_path / "p.png", curve, extra={"other": [(10_000, 20.0), (12_000, 30.0)]})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_linear8_palette_is_symmetric_int8():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    got = linear8_palette(w).dequantize().float()
    assert torch.allclose(got[0], w[0], atol=1 / 254) and torch.equal(got[1], w[1])
