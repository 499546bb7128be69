"""Exact Hessian diagonals of a tiny torchvision ResNet (BatchNorm traced as aten ops)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse.curvprop import _exact


def tiny_resnet(dtype: torch.dtype, train: bool) -> nn.Module:
    """torchvision's ResNet with one ``BasicBlock`` per stage and stage widths 2..16."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)
    model.inplanes = 2
    model.conv1 = nn.Conv2d(3, 2, kernel_size=3, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(2)
    model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(BasicBlock, 2, 1)
    model.layer2 = model._make_layer(BasicBlock, 4, 1, stride=2)
    model.layer3 = model._make_layer(BasicBlock, 8, 1, stride=2)
    model.layer4 = model._make_layer(BasicBlock, 16, 1, stride=2)
    model.fc = nn.Linear(16, 3)
    with torch.no_grad():  # non-trivial BatchNorm affine maps and running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.to(dtype).train(train)


def reference_entries(model, loss_fn, x, y, index: torch.Tensor) -> torch.Tensor:
    """``H[i, i]`` for ``i`` in ``index`` by plain autograd double backward."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    out = []
    for i in index.tolist():
        row = torch.autograd.grad(flat[i], params, retain_graph=True)
        out.append(torch.cat([r.reshape(-1) for r in row])[i])
    return torch.stack(out)


def probe_index(model: nn.Module) -> torch.Tensor:
    """Every BatchNorm / fc coordinate and every 37th coordinate of the rest."""
    index, start = [], 0
    for name, p in model.named_parameters():
        n = p.numel()
        if "bn" in name or "downsample.1" in name or name.startswith("fc"):
            index.extend(range(start, start + n))
        else:
            index.extend(range(start, start + n, 37))
        start += n
    return torch.tensor(index)


@pytest.mark.filterwarnings("error::hesse.LoopFallbackWarning")
@pytest.mark.filterwarnings("error::hesse.curvprop.CurvpropFallbackWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_exact_diagonal_of_torchvision_resnet(dtype, train, monkeypatch):
    # Regression: eval-mode BatchNorm traced to aten.native_batch_norm fell to the dense
    # "general" rule, whose float32 eigh failed to converge (examples/resnet_factory.py).
    general = []
    dense_rule = _exact._general

    def recording(ni, env, g):
        general.append(ni.name)
        return dense_rule(ni, env, g)

    monkeypatch.setattr(_exact, "_general", recording)
    model = tiny_resnet(dtype, train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g).to(dtype)
    y = torch.randint(0, 3, (4,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    op = hesse.HessianOperator(model, loss_fn, [(x, y)])
    diag = hesse.diagonal(op, method="exact")
    index = probe_index(model)
    ref = reference_entries(model, loss_fn, x, y, index)
    assert torch.isfinite(diag).all()
    tol = {"rtol": 1e-7, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-5}
    torch.testing.assert_close(diag[index], ref, **tol)
    assert ref.abs().max() > 1e-3  # the probed entries are not all zero
    if not train:  # eval mode: affine batch norm, decomposed; no dense local Hessian
        assert general == [], general


def test_symmetric_eigh_retries_float32_in_float64(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g)
    h = (a + a.T).float()
    real = torch.linalg.eigh

    def eigh_failing_in_float32(m):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", eigh_failing_in_float32)
    lam, vec = _exact._symmetric_eigh(h)
    assert lam.dtype == vec.dtype == torch.float32
    torch.testing.assert_close(vec @ torch.diag(lam) @ vec.T, h, rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):
        _exact._symmetric_eigh(h.double().fill_(float("nan")).float())
