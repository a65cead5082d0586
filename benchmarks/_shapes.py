"""Gradient lists shaped like real models, built without downloading anything."""

from __future__ import annotations

import torch
from torch import nn


def gpt2_small_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2 small (124M parameters, 148 tensors), HF naming."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """ResNet-50 (25.6M parameters, 161 tensors), torchvision naming."""
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("conv1.weight", (64, 3, 7, 7)),
        ("bn1.weight", (64,)),
        ("bn1.bias", (64,)),
    ]
    in_ch = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}."
            out = width * 4
            shapes += [
                (p + "conv1.weight", (width, in_ch, 1, 1)),
                (p + "bn1.weight", (width,)),
                (p + "bn1.bias", (width,)),
                (p + "conv2.weight", (width, width, 3, 3)),
                (p + "bn2.weight", (width,)),
                (p + "bn2.bias", (width,)),
                (p + "conv3.weight", (out, width, 1, 1)),
                (p + "bn3.weight", (out,)),
                (p + "bn3.bias", (out,)),
            ]
            if b == 0:
                shapes += [
                    (p + "downsample.0.weight", (out, in_ch, 1, 1)),
                    (p + "downsample.1.weight", (out,)),
                    (p + "downsample.1.bias", (out,)),
                ]
            in_ch = out
    return [*shapes, ("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]


def mlp_1000_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """500 small linear layers: 1000 tensors of 64x64 and 64."""
    shapes = []
    for i in range(500):
        shapes += [(f"layers.{i}.weight", (64, 64)), (f"layers.{i}.bias", (64,))]
    return shapes


def make_params(
    shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int = 0
) -> list[tuple[str, nn.Parameter]]:
    """Parameters with random gradients of a typical size (global norm around 1)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() for _, s in shapes)
    scale = 1.0 / total**0.5
    named = []
    for name, shape in shapes:
        param = nn.Parameter(torch.empty(shape, dtype=dtype).normal_(generator=gen))
        param.grad = (torch.randn(shape, generator=gen) * scale).to(dtype)
        named.append((name, param))
    return named
