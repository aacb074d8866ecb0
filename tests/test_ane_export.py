"""Issue 7: a palettized, split-einsum default-model UNet goes through export_coreml and
verifies bit-exact (the export reads every weight back and raises on any mismatch)."""

from __future__ import annotations

import torch

from palette import PaletteSpec, export_coreml, restore_attention, split_einsum, target_layers
from palette.models.default import load_unet
from palette.palettize import palettize


def test_palettized_split_einsum_default_unet_exports_bit_exact(tmp_path) -> None:
    unet = load_unet().eval()
    plain_targets = list(target_layers(unet))
    split_einsum(unet, variant="v1")
    try:
        assert list(target_layers(unet)) == plain_targets  # recipe names still resolve
        spec = PaletteSpec(4, "per_grouped_channel", 16)
        mapping = {n: spec for n, m in target_layers(unet).items() if m.weight.shape[0] % 16 == 0}
        palettes = palettize(unet, mapping, progress=False)
        attn = [n for n in palettes if ".attn1.to_q" in n]
        assert attn and all(dict(unet.named_modules())[n].weight.dim() == 4 for n in attn)  # 1x1 convs
        cfg = unet.config
        inputs = (
            torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size),
            torch.tensor([500.0]),
            torch.randn(1, 16, cfg.cross_attention_dim),
        )
        report = export_coreml(unet, tmp_path / "unet_ane.mlpackage", inputs)  # the palettes it carries
        assert report.n_palettized == len(palettes)
        assert report.stored_palettized_bytes == sum(p.nbytes for p in palettes.values())
    finally:
        restore_attention(unet)
    for n, pal in palettes.items():  # palettes carried back to the Linear layers unchanged
        w = dict(unet.named_modules())[n].weight
        assert torch.equal(w.reshape(pal.shape), pal.dequantize().float())
