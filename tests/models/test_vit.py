"""A timm Vision Transformer (tiny config, random init, float64): LayerNorm, GELU, attention
through ``scaled_dot_product_attention`` (``fused_attn``), residual streams, patch embedding
by convolution, against plain autograd on an eager-attention twin (``fused_attn=False``)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import hesse
from tests.models._reference import Block

timm = pytest.importorskip("timm")

DT = torch.float64
NAMES = ["patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.bias", "head.weight"]  # fmt: skip


def problem():
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=8, patch_size=4, in_chans=2, num_classes=3, embed_dim=8, depth=1,
        num_heads=2, mlp_ratio=2.0,
    ).to(DT).eval()  # fmt: skip
    model.blocks[0].attn.fused_attn = True  # the SDPA path, whatever timm's default
    twin = copy.deepcopy(model)
    twin.blocks[0].attn.fused_attn = False
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 2, 8, 8, generator=g, dtype=DT)
    Y = torch.randint(0, 3, (3,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    return model, loss_fn, [(X, Y)], Block(twin, loss_fn, X, Y, NAMES)


def test_vit_products_diagonals_and_per_sample(gen):
    model, loss_fn, data, ref = problem()
    H = hesse.HessianOperator(model, loss_fn, data, params=NAMES)
    dense = ref.hessian()
    X = torch.randn(H.shape[0], 2, generator=gen, dtype=DT)
    torch.testing.assert_close(H @ X, dense @ X, rtol=1e-8, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hesse.CurvpropFallbackWarning)
        torch.testing.assert_close(hesse.diagonal(H), dense.diagonal(), rtol=1e-8, atol=1e-10)
    ((inputs, targets),) = data
    params = {k: v for k, v in model.named_parameters() if k in NAMES}
    per = hesse.per_sample_diagonal(model, loss_fn, inputs, targets, params=params)
    flat = torch.cat([per[k].reshape(3, -1) for k in NAMES], 1)
    torch.testing.assert_close(flat, ref.per_sample_hessian_diagonals(1 / 3), rtol=1e-8, atol=1e-10)
    G = hesse.GGNOperator(model, loss_fn, data, params=NAMES)
    ggn = ref.ggn()
    torch.testing.assert_close(G @ X, ggn @ X, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(hesse.diagonal(G), ggn.diagonal(), rtol=1e-8, atol=1e-10)
