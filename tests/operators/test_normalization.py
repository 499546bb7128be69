"""Loss normalisation (NOTE [loss normalisation]): every operator is the curvature of the
dataset-mean loss, for every loss form, against plain-autograd dense references.

The references weight each batch by a count computed here from its definition (torch's
own denominators), independently of hesse's rule.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hesse
from hesse.operators._normalization import Normalization
from tests.problems import double_backward_hessian

DT = torch.float64
V, E, T = 3, 4, 3  # classes, features, tokens


def jacobian(f, x):
    """``(out.numel(), n)`` Jacobian by one reverse pass per output entry."""
    x = x.detach().requires_grad_(True)
    out = f(x).reshape(-1)
    rows = [torch.autograd.grad(out[i], x, retain_graph=True)[0] for i in range(out.numel())]
    return torch.stack(rows)


class Tokens(nn.Module):
    """A causal token mixer: (B, T, E) -> logits (B*T, V) (or (B, T, V) if not ``flat``)."""

    def __init__(self, flat=True):
        super().__init__()
        self.inp, self.out, self.flat = nn.Linear(E, 5), nn.Linear(5, V), flat

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)
        h = h.cumsum(1) / steps[:, None]  # each token sees the tokens before it
        z = self.out(h)
        return z.flatten(0, 1) if self.flat else z


def mlp(out=V):
    return nn.Sequential(nn.Linear(E, 5), nn.Tanh(), nn.Linear(5, out))


def spatial():
    return nn.Sequential(nn.Linear(E, 2 * V), nn.Unflatten(1, (V, 2)))


def _ce_count(loss_fn):
    def count(y):
        keep = y != loss_fn.ignore_index
        return keep.sum() if loss_fn.weight is None else loss_fn.weight[y[keep]].sum()

    return count


def _targets(kind, n, gen, ignore=False):
    if kind == "class":
        y = torch.randint(0, V, n, generator=gen)
        if ignore:
            y[..., 0] = -100
        return y
    if kind == "binary":
        return torch.rand(*n, generator=gen, dtype=DT).round()
    return torch.randn(*n, generator=gen, dtype=DT)


WEIGHT = torch.tensor([0.5, 2.0, 1.25], dtype=DT)


def case(name, gen):
    """``(model, loss_fn, data, count, loss_count)``: ``count(y)`` is the reference M_b."""
    sizes = (3, 3, 2)  # a short last batch
    B = sum(sizes)
    X = torch.randn(B, E, generator=gen, dtype=DT)
    Xt = torch.randn(B, T, E, generator=gen, dtype=DT)

    def batches(X, Y, per=1):
        out, lo = [], 0
        for s in sizes:
            out.append((X[lo : lo + s], Y[lo * per : (lo + s) * per]))
            lo += s
        return out

    numel = lambda y: y.numel()  # noqa: E731
    if name.startswith("mse"):
        loss = nn.MSELoss(reduction="sum" if name == "mse-sum" else "mean")
        return mlp(), loss, batches(X, _targets("real", (B, V), gen)), numel, None
    if name.startswith("bce"):
        kw = {"weight": WEIGHT} if name == "bce-weight" else {}
        kw = {"pos_weight": WEIGHT} if name == "bce-posweight" else kw
        loss = nn.BCEWithLogitsLoss(**kw)
        return mlp(), loss, batches(X, _targets("binary", (B, V), gen)), numel, None
    if name == "bce-probs":
        model = nn.Sequential(mlp(), nn.Sigmoid())
        return model, nn.BCELoss(), batches(X, _targets("binary", (B, V), gen)), numel, None
    if name.startswith("ce"):
        kw = {
            "ce": {},
            "ce-sum": {"reduction": "sum"},
            "ce-ignore": {},
            "ce-weight": {"weight": WEIGHT},
            "ce-smooth": {"label_smoothing": 0.2},
            "ce-all": {"weight": WEIGHT, "label_smoothing": 0.2},
        }[name.split(":")[0]]
        loss = nn.CrossEntropyLoss(**kw)
        ignore = name.startswith(("ce-ignore", "ce-all"))
        layout = name.split(":")[1] if ":" in name else "rows"
        if layout == "rows":
            Y = _targets("class", (B,), gen, ignore)
            return mlp(), loss, batches(X, Y), _ce_count(loss), None
        if layout == "spatial":
            Y = _targets("class", (B, 2), gen, ignore)
            return spatial(), loss, batches(X, Y), _ce_count(loss), None
        Y = _targets("class", (B, T), gen, ignore).reshape(-1)  # tokens flattened
        return Tokens(), loss, batches(Xt, Y, per=T), _ce_count(loss), None
    if name == "callable-bt":  # (B, T, V) logits, a mean over the samples' token means
        Y = _targets("class", (B, T), gen)

        def lm_loss(z, y):
            return nn.functional.cross_entropy(z.flatten(0, 1), y.flatten())

        return Tokens(flat=False), lm_loss, batches(Xt, Y), lambda y: y.shape[0], None
    if name == "callable-stated":  # flattened tokens, padding skipped, count stated
        Y = _targets("class", (B, T), gen, ignore=True).reshape(-1)

        def masked(z, y):
            return nn.functional.cross_entropy(z, y, ignore_index=-100)

        count = lambda y: (y != -100).sum()  # noqa: E731
        return Tokens(), masked, batches(Xt, Y, per=T), count, count
    raise AssertionError(name)


CASES = [
    "mse",
    "mse-sum",
    "bce",
    "bce-weight",
    "bce-posweight",
    "bce-probs",
    "ce",
    "ce-sum",
    "ce-ignore",
    "ce-weight",
    "ce-smooth",
    "ce-all",
    "ce:spatial",
    "ce-all:spatial",
    "ce:tokens",
    "ce-all:tokens",
    "callable-bt",
    "callable-stated",
]


class Reference:
    """Dense curvature of the dataset loss ``sum_b M_b L_b / sum_b M_b`` (or ``sum_b L_b``)."""

    def __init__(self, model, loss_fn, data, count):
        self.model, self.loss_fn, self.data = model, loss_fn, data
        named = dict(model.named_parameters())
        self.names = list(named)
        self.shapes = [named[k].shape for k in self.names]
        self.x = torch.cat([named[k].detach().reshape(-1) for k in self.names])
        mean = getattr(loss_fn, "reduction", "mean") == "mean"
        counts = [float(count(y)) for _, y in data]
        self.weights = [c / sum(counts) if mean else 1.0 for c in counts]
        self.counts = counts if mean else [1.0] * len(counts)

    def out(self, v, X):
        parts = torch.split(v, [s.numel() for s in self.shapes])
        state = {k: p.reshape(s) for k, p, s in zip(self.names, parts, self.shapes)}
        return functional_call(self.model, state, (X,))

    def loss(self, v):
        return sum(
            w * self.loss_fn(self.out(v, X), Y) for w, (X, Y) in zip(self.weights, self.data)
        )

    def hessian(self):
        return double_backward_hessian(self.loss, self.x)

    def _pieces(self):
        for w, c, (X, Y) in zip(self.weights, self.counts, self.data):
            o = self.out(self.x, X).detach()
            J = jacobian(lambda v, X=X: self.out(v, X), self.x)
            yield w, c, o, J, Y

    def ggn(self):
        total = 0
        for w, _, o, J, Y in self._pieces():
            Ho = double_backward_hessian(
                lambda z, Y=Y, o=o: self.loss_fn(z.reshape(o.shape), Y), o.reshape(-1)
            )
            total = total + w * J.T @ Ho @ J
        return total

    def empirical_fisher(self):
        """``(1/M) sum_n (J_n^T M_b s_n)(J_n^T M_b s_n)^T``, ``s_n`` row ``n`` of the output
        gradient of the batch loss ``L_b`` (so ``M_b s_n`` is that of its sum form)."""
        total = 0
        for w, c, o, J, Y in self._pieces():
            z = o.clone().requires_grad_(True)
            (s,) = torch.autograd.grad(self.loss_fn(z, Y), z)
            G = (J.reshape(o.shape[0], -1, J.shape[1]) * s.reshape(o.shape[0], -1, 1)).sum(1)
            total = total + w * c * G.T @ G  # M_b^2 / M = w_b M_b
        return total


def _build(name, gen):
    torch.manual_seed(0)
    model, loss_fn, data, count, stated = case(name, gen)
    model = model.to(DT)
    return model, loss_fn, data, count, stated, Reference(model, loss_fn, data, count)


def _check(op, ref, gen, *, exact_diag=True):
    n = ref.shape[0]
    dense = op.to_dense()
    torch.testing.assert_close(dense, ref, rtol=1e-9, atol=1e-11)
    v = torch.randn(n, generator=gen, dtype=DT)
    torch.testing.assert_close(op @ v, ref @ v, rtol=1e-9, atol=1e-11)
    if exact_diag:
        torch.testing.assert_close(
            hesse.diagonal(op, method="exact"), dense.diagonal(), rtol=1e-9, atol=1e-11
        )


@pytest.mark.parametrize("name", CASES)
def test_hessian_operator(name, gen):
    model, loss_fn, data, _, stated, reference = _build(name, gen)
    op = hesse.HessianOperator(model, loss_fn, data, loss_count=stated)
    _check(op, reference.hessian(), gen)


@pytest.mark.parametrize("name", [c for c in CASES if not c.startswith("callable")])
def test_ggn_and_empirical_fisher(name, gen):
    model, loss_fn, data, _, stated, reference = _build(name, gen)
    G = hesse.GGNOperator(model, loss_fn, data, loss_count=stated)
    _check(G, reference.ggn(), gen)
    F = hesse.FisherOperator(model, loss_fn, data, kind="empirical", loss_count=stated)
    _check(F, reference.empirical_fisher(), gen)


@pytest.mark.parametrize("name", ["mse", "bce-weight", "ce-all", "ce-all:spatial", "ce:tokens"])
def test_mc_fisher_diagonal_is_its_dense_diagonal(name, gen):
    model, loss_fn, data, _, stated, _ = _build(name, gen)
    F = hesse.FisherOperator(model, loss_fn, data, kind="mc", mc_samples=2, loss_count=stated)
    torch.testing.assert_close(hesse.diagonal(F, method="exact"), F.to_dense().diagonal())


@pytest.mark.parametrize("name", ["mse", "bce", "ce-all", "ce-weight:spatial"])
def test_count_matches_torch_denominator(name, gen):
    """``M_b * loss(mean) == loss(sum)``: the count is what torch divides by."""
    model, loss_fn, data, _, _, _ = _build(name, gen)
    norm = Normalization("t", loss_fn)
    X, Y = data[0]
    out = model(X)
    summed = type(loss_fn)(**{**_options(loss_fn), "reduction": "sum"})
    count = norm.count(Y, X.shape[0])
    torch.testing.assert_close(loss_fn(out, Y) * count, summed(out, Y))


def _options(loss_fn):
    keys = ("weight", "pos_weight", "ignore_index", "label_smoothing")
    return {k: getattr(loss_fn, k) for k in keys if hasattr(loss_fn, k)}


def test_undeterminable_count_is_refused(gen):
    model, loss_fn, data, _, _, _ = _build("callable-stated", gen)
    with pytest.raises(
        ValueError,
        match=r"HessianOperator\(model, loss_fn, data\): cannot tell how many terms loss_fn "
        r"\(function\) averages over: the model output has leading dimension 9 but the inputs "
        r"have batch size 3.*pass loss_count=fn",
    ):
        hesse.HessianOperator(model, loss_fn, data)
    with pytest.raises(TypeError, match="expected loss_count to be callable"):
        hesse.GGNOperator(model, nn.CrossEntropyLoss(), data, loss_count=3)
    y = torch.full((9,), -100)
    with pytest.raises(ValueError, match="averages over 0.0 terms on the first batch"):
        hesse.GGNOperator(model, nn.CrossEntropyLoss(), [(data[0][0], y)])
    with pytest.raises(ValueError, match=r"MSELoss needs targets shaped like the output \(9, 3\)"):
        hesse.HessianOperator(model, nn.MSELoss(), [(data[0][0], torch.zeros(9, 1, dtype=DT))])
    with pytest.raises(ValueError, match=r"class-index targets of shape \(9,\).*Flatten token"):
        hesse.HessianOperator(model, nn.CrossEntropyLoss(), [(data[0][0], y[:3])])


def test_token_rows_grouped_per_sample_equal_rows_as_samples(gen):
    """NOTE [coupled rows]: the same token rows, grouped T per sequence or one per sample,
    give the same exact and MC (per-column) diagonals."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(E, 5), nn.Tanh(), nn.Linear(5, V)).to(DT)

    class PerToken(nn.Module):  # (B, T, E) -> (B*T, V), tokens independent
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).flatten(0, 1)

    X = torch.randn(3, T, E, generator=gen, dtype=DT)
    Y = torch.randint(0, V, (3 * T,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    grouped = hesse.GGNOperator(PerToken(), loss_fn, [(X, Y)])
    rows = hesse.GGNOperator(net, loss_fn, [(X.flatten(0, 1), Y)])
    for method in ("exact", "mc"):
        a = hesse.diagonal(grouped, method=method, num_matvecs=None if method == "exact" else 2)
        b = hesse.diagonal(rows, method=method, num_matvecs=None if method == "exact" else 2)
        a, b = (a, b) if method == "exact" else (a.value, b.value)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grouped._rows_per_sample == T and rows._rows_per_sample == 1
