"""Data in every form users pass (NOTE [data forms]): same products, or a message with the fix."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import hesse
import hesse.distributed as hd
from hesse.cli import main

DT = torch.float64
OPERATORS = {
    "hessian": lambda m, d, **kw: hesse.HessianOperator(m, nn.CrossEntropyLoss(), d, **kw),
    "ggn": lambda m, d, **kw: hesse.GGNOperator(m, nn.CrossEntropyLoss(), d, **kw),
    "fisher": lambda m, d, **kw: hesse.FisherOperator(
        m, nn.CrossEntropyLoss(), d, kind="empirical", **kw
    ),
    "distributed hessian": lambda m, d, **kw: hd.HessianOperator(m, nn.CrossEntropyLoss(), d, **kw),
}


def problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X = torch.randn(10, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (10,), generator=g)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=g, dtype=DT)
    return model, X, y, V


class Reiterable:
    """A user's own collection: every ``iter()`` starts a fresh generator."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches


class TwoInputs(nn.Module):
    """``inner(cat(a, b))``, called positionally or by keyword."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.cat([a, b], dim=1))


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_every_form_gives_the_list_of_batches_products(kind):
    model, X, y, V = problem()
    make = OPERATORS[kind]
    reference = make(model, [(X[:4], y[:4]), (X[4:], y[4:])]) @ V  # mean loss: any split
    forms = {
        "pair tuple": (X, y),
        "pair list": [X, y],
        "list of one batch": [(X, y)],
        "DataLoader": DataLoader(TensorDataset(X, y), batch_size=4),
        "re-iterable": Reiterable([(X[:4], y[:4]), (X[4:], y[4:])]),
        "tuple of batches": ((X[:7], y[:7]), (X[7:], y[7:])),
    }
    for name, data in forms.items():
        torch.testing.assert_close(make(model, data) @ V, reference, msg=name)
    # Tuple inputs (model(*inputs)) and dict inputs (model(**inputs)) of a two-input model.
    two = TwoInputs(model)
    a, b = X[:, :2], X[:, 2:]
    for name, data in {
        "tuple inputs": ((a, b), y),
        "tuple inputs, batches": [((a[:4], b[:4]), y[:4]), ((a[4:], b[4:]), y[4:])],
        "dict inputs": ({"a": a, "b": b}, y),
        "dict inputs, batches": [
            ({"b": b[:3], "a": a[:3]}, y[:3]),
            ({"a": a[3:], "b": b[3:]}, y[3:]),
        ],
    }.items():
        torch.testing.assert_close(make(two, data) @ V, reference, msg=name)


def test_hf_style_keyword_model():
    """Dict inputs reach the model as keywords: ``input_ids`` and ``attention_mask``."""
    g = torch.Generator().manual_seed(1)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
            return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))

    model = Tiny().to(DT)
    ids = torch.randint(0, 7, (6, 5), generator=g)
    mask = torch.ones(6, 5, dtype=DT)
    mask[:, 3:] = 0
    y = torch.randint(0, 3, (6,), generator=g)
    inputs = {"input_ids": ids, "attention_mask": mask}
    G = hesse.GGNOperator(model, nn.CrossEntropyLoss(), (inputs, y)).to_dense()
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), [(inputs, y)]).to_dense()
    # Independent reference: plain autograd double backward over the flat parameters.
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()]).requires_grad_(True)

    def loss(v):
        chunks, i = {}, 0
        for k, p in params.items():
            chunks[k] = v[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        out = torch.func.functional_call(model, chunks, (), inputs)
        return nn.functional.cross_entropy(out, y)

    (grad,) = torch.autograd.grad(loss(flat), flat, create_graph=True)
    ref = torch.stack(
        [torch.autograd.grad(grad[i], flat, retain_graph=True)[0] for i in range(len(flat))]
    )
    torch.testing.assert_close(H, ref)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # the GGN half ran on keyword inputs too


def test_refused_forms_name_the_fix():
    model, X, y, _ = problem()
    ce = nn.CrossEntropyLoss()
    call = r"hesse.HessianOperator\(model, loss_fn, data\): "
    with pytest.raises(
        TypeError,
        match=call
        + r"expected a collection .* got a torch.float64 tensor of shape \(10, 5\).*\[\(X, y\)\]",
    ):
        hesse.HessianOperator(model, ce, X)
    with pytest.raises(
        TypeError,
        match=r"each batch to be an \(inputs, targets\) pair, got a torch.float64 tensor .* as batch 0. If the data is one batch, .*\[\(X, y\)\]",
    ):
        hesse.HessianOperator(model, ce, [X])
    with pytest.raises(
        ValueError,
        match=r"reads as one \(inputs, targets\) batch, but its inputs .*\(10, 5\).* and targets .*\(4,\).* differ in their leading",
    ):
        hesse.HessianOperator(model, ce, (X, y[:4]))
    shuffled = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)
    with pytest.raises(
        ValueError,
        match=call
        + r"data is a DataLoader that shuffles \(its sampler is a RandomSampler\).*shuffle=False",
    ):
        hesse.HessianOperator(model, ce, shuffled)
    subset = DataLoader(TensorDataset(X, y), batch_size=4, sampler=SubsetRandomSampler(range(8)))
    with pytest.raises(
        ValueError, match=r"its sampler is a SubsetRandomSampler.*SequentialSampler"
    ):
        hd.HessianOperator(model, ce, subset)
    with pytest.raises(TypeError, match=r"one-shot iterator .*Pass list\(data\)"):
        hesse.HessianOperator(model, ce, ((X, y) for _ in range(2)))
    with pytest.raises(ValueError, match=r"data yielded no batches"):
        hesse.HessianOperator(model, ce, [])
    with pytest.raises(
        TypeError, match=r"inputs of batch 1 to be a tensor, a tuple of tensors .* or a dict"
    ):
        hesse.HessianOperator(model, ce, Reiterable([(X, y), ("text", y)])).to_dense()
    with pytest.raises(
        TypeError, match=r"an object of type dict as batch 0.*yield \(inputs, targets\)"
    ):
        hesse.HessianOperator(model, ce, [{"x": X, "y": y}])


def test_check_deterministic_refuses_data_that_changes():
    model, X, y, _ = problem()
    ce = nn.CrossEntropyLoss()

    class Augmented:
        """Random noise added on every pass (to the last batch only)."""

        def __init__(self) -> None:
            self.g = torch.Generator().manual_seed(0)

        def __iter__(self):
            yield X[:5], y[:5]
            yield X[5:] + 0.01 * torch.randn(X[5:].shape, generator=self.g, dtype=DT), y[5:]

    class Growing:
        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            yield from [(X, y)] * self.passes

    hesse.HessianOperator(model, ce, Augmented())  # not checked unless asked
    with pytest.raises(
        ValueError, match=r"different batch 1 on two passes .*deterministic transforms"
    ):
        hesse.HessianOperator(model, ce, Augmented(), check_deterministic=True)
    with pytest.raises(ValueError, match=r"different number of batches on two passes"):
        hesse.GGNOperator(model, ce, Growing(), check_deterministic=True)
    fixed = DataLoader(TensorDataset(X, y), batch_size=3)
    hesse.GGNOperator(model, ce, fixed, check_deterministic=True)  # passes


FACTORIES = """
import torch
from torch.utils.data import DataLoader, TensorDataset

def _parts():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return model, torch.randn(12, 3, generator=g), torch.randint(0, 2, (12,), generator=g)

def shuffled():
    model, X, y = _parts()
    return model, torch.nn.CrossEntropyLoss(), DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)

def tensor():
    model, X, y = _parts()
    return model, torch.nn.CrossEntropyLoss(), X
"""


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("shuffled", "--model: the data shuffled() returned: data is a DataLoader that shuffles"),
        (
            "tensor",
            "--model: the data tensor() returned: expected a collection of (inputs, targets)",
        ),
    ],
)
def test_command_uses_the_same_check(tmp_path, capsys, factory, message):
    path = tmp_path / "factories.py"
    path.write_text(textwrap.dedent(FACTORIES))
    code = main(
        ["analyze", "--model", f"{path}:{factory}", "--out", str(tmp_path / "o"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
