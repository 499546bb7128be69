"""A ResNet of torchvision BasicBlocks (tiny widths, random init, float64), BatchNorm in
eval and in train mode (batch statistics couple the samples), against plain autograd."""

import warnings

import pytest
import torch
from torch import nn

import hesse
from tests.models._reference import Block

resnet = pytest.importorskip("torchvision.models.resnet")

DT = torch.float64
NAMES = ["0.weight", "1.weight", "3.bn1.weight", "3.bn2.bias", "4.downsample.1.weight", "7.weight"]  # fmt: skip


def tiny_resnet():
    down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        resnet.BasicBlock(4, 4),
        resnet.BasicBlock(4, 6, stride=2, downsample=down),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


@pytest.mark.parametrize("train", [False, True])
def test_resnet_products_and_diagonals(train, gen):
    torch.manual_seed(0)
    model = tiny_resnet().to(DT)
    for m in model.modules():  # non-trivial running statistics for eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    model.train(train)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, 2, 6, 6, generator=g, dtype=DT)
    Y = torch.randint(0, 3, (4,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    data = [(X, Y)]
    ref = Block(model, loss_fn, X, Y, NAMES)
    dense, ggn = ref.hessian(), ref.ggn()  # in train mode these update the running statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}  # hesse must not
    H = hesse.HessianOperator(model, loss_fn, data, params=NAMES)
    V = torch.randn(H.shape[0], 2, generator=gen, dtype=DT)
    torch.testing.assert_close(H @ V, dense @ V, rtol=1e-8, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hesse.CurvpropFallbackWarning)
        torch.testing.assert_close(hesse.diagonal(H), dense.diagonal(), rtol=1e-8, atol=1e-10)
    G = hesse.GGNOperator(model, loss_fn, data, params=NAMES)
    torch.testing.assert_close(G @ V, ggn @ V, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(hesse.diagonal(G), ggn.diagonal(), rtol=1e-8, atol=1e-10)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)  # nothing was updated
    if not train:  # per-sample diagonals exist only for independent samples
        params = {k: v for k, v in model.named_parameters() if k in NAMES}
        per = hesse.per_sample_diagonal(model, loss_fn, X, Y, params=params)
        flat = torch.cat([per[k].reshape(4, -1) for k in NAMES], 1)
        expected = ref.per_sample_hessian_diagonals(1 / 4)
        torch.testing.assert_close(flat, expected, rtol=1e-8, atol=1e-10)
