"""Every error path of KFACOperator / EKFACOperator, matched on its message."""

import pytest
import torch
from torch import nn

import hesse
from tests.kfac.test_kfac import DT, ce_data, mlp, mse_data

CE = nn.CrossEntropyLoss()


def test_no_supported_layer():
    model = nn.Sequential(nn.Flatten(), nn.LayerNorm(4)).to(DT)
    with pytest.raises(NotImplementedError, match=r"KFACOperator.*no layer KFAC supports"):
        hesse.KFACOperator(model, nn.MSELoss(), mse_data(out=(4,)))


def test_parameter_outside_supported_layers_is_named_never_dropped():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT)
    with pytest.raises(
        NotImplementedError,
        match=r"parameter '1.weight' belongs to module '1' \(LayerNorm\).*params=",
    ):
        hesse.KFACOperator(model, CE, ce_data())
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert hesse.KFACOperator(model, CE, ce_data(), params=names).shape == (35, 35)


def test_unknown_loss_for_type2_and_mc_suggests_empirical():
    def loss_fn(out, y):
        return (out - y).abs().mean()

    for fisher_type in ("type-2", "mc"):
        with pytest.raises(NotImplementedError, match=r"none is known for function.*'empirical'"):
            hesse.KFACOperator(mlp(), loss_fn, mse_data(), fisher_type=fisher_type)
    hesse.KFACOperator(mlp(), loss_fn, mse_data(), fisher_type="empirical")


@pytest.fixture(scope="module")
def K():
    return hesse.KFACOperator(mlp(), CE, ce_data())


def test_negative_or_bad_damping(K):
    with pytest.raises(
        ValueError,
        match=r"KFACOperator.inverse\(damping\): expected damping >= 0 \(finite\), got -1",
    ):
        K.inverse(-1.0)
    with pytest.raises(
        ValueError, match=r"logdet\(damping\): expected damping >= 0 \(finite\), got nan"
    ):
        K.logdet(float("nan"))
    with pytest.raises(
        TypeError, match=r"expected damping to be a number >= 0, got an object of type str"
    ):
        K.inverse("0.1")
    with pytest.raises(ValueError, match="exclude each other"):
        K.inverse(0.1, exact_damping=True, heuristic_damping=True)


def test_singular_factors_without_damping(K):
    # cross-entropy's output Hessian is singular (softmax is shift invariant): so is G.
    with pytest.raises(ValueError, match=r"block '2'.*is singular.*Pass damping > 0"):
        K.inverse(0.0, exact_damping=True)
    with pytest.raises(ValueError, match=r"block '2' \(G\) is singular"):
        K.inverse(0.0)
    with pytest.raises(ValueError, match=r"logdet\(damping\): block '2' is singular"):
        K.logdet()
    assert torch.isfinite(K.logdet(1e-3))
    K.inverse(1e-12, exact_damping=True)  # any positive damping is regular


def test_bad_options():
    with pytest.raises(
        ValueError, match=r"fisher_type should be one of 'type-2', 'mc'.*got 'exact'"
    ):
        hesse.KFACOperator(mlp(), CE, ce_data(), fisher_type="exact")
    with pytest.raises(ValueError, match=r"kfac_approx should be one of 'expand', 'reduce'"):
        hesse.KFACOperator(mlp(), CE, ce_data(), kfac_approx="mean")
    with pytest.raises(ValueError, match=r"mc_samples=3 only applies to fisher_type='mc'"):
        hesse.KFACOperator(mlp(), CE, ce_data(), mc_samples=3)
    with pytest.raises(TypeError, match=r"expected generator to be a torch.Generator"):
        hesse.KFACOperator(mlp(), CE, ce_data(), generator=0)
    with pytest.raises(ValueError, match=r"EKFACOperator.*'forward-only' has no gradients"):
        hesse.EKFACOperator(mlp(), CE, ce_data(), fisher_type="forward-only")


def test_unsupported_layer_options():
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).to(DT)
    with pytest.raises(NotImplementedError, match=r"module '0' \(Conv2d\) has groups=2"):
        hesse.KFACOperator(conv, nn.MSELoss(), mse_data(shape=(2, 4, 4), out=(8,)))
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), nn.Flatten())
    with pytest.raises(NotImplementedError, match=r"padding_mode='circular'"):
        hesse.KFACOperator(conv.to(DT), nn.MSELoss(), mse_data(shape=(2, 4, 4), out=(32,)))
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    data = [(torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 2, dtype=DT))]
    with pytest.raises(NotImplementedError, match=r"'reduce' would make the embedding's input"):
        hesse.KFACOperator(emb, nn.MSELoss(), data, kfac_approx="reduce")


def test_tied_weights_and_in_place_outputs():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    with pytest.raises(
        NotImplementedError, match=r"'a.weight' is shared by \['a.weight', 'b.weight'\]"
    ):
        hesse.KFACOperator(Tied().to(DT), nn.MSELoss(), mse_data(shape=(3,)))
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).to(DT)
    with pytest.raises(NotImplementedError, match=r"output of module '0' is modified in place"):
        hesse.KFACOperator(model, CE, ce_data())


def test_module_called_twice_or_never():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(torch.tanh(self.a(x)))

    with pytest.raises(NotImplementedError, match=r"module 'a' runs twice in one forward pass"):
        hesse.KFACOperator(Twice().to(DT), nn.MSELoss(), mse_data(shape=(3,)), params=["a.weight"])
    with pytest.raises(ValueError, match=r"module\(s\) \['unused'\] did not run"):
        hesse.KFACOperator(
            Twice().to(DT), nn.MSELoss(), mse_data(shape=(3,)), params=["unused.weight"]
        )
