"""KFAC and EKFAC against curvlinops and BackPACK on the same definitions (float64, 1e-10).

Correspondences (from the peers' documentation):

* curvlinops ``KFACLinearOperator(..., fisher_type, kfac_approx,
  separate_weight_and_bias)`` equals ``hesse.KFACOperator(..., fisher_type,
  kfac_approx, separate_bias)``, loss scaling included (curvlinops rescales MSE and
  BCE to hesse's count of output entries). For models whose samples have several
  loss terms, curvlinops' type-2 backpropagates the ``C`` factor columns summed over
  a sample's terms; hesse backpropagates the columns of its per-sample output
  factor (``T * C`` for an ``(N, T, C)`` MSE output), so type-2 is compared only
  where each sample has one loss term; the empirical and forward-only variants
  agree everywhere.
* curvlinops ``EKFACLinearOperator`` with ``kfac_approx="expand"`` corrects with
  per-sample gradients, as hesse does (its ``"reduce"`` corrections differ).
* curvlinops ``KFACInverseLinearOperator(K, damping, use_exact_damping=True)`` and
  ``use_heuristic_damping=True`` equal ``K.inverse(damping, exact_damping=True)``
  and ``heuristic_damping=True``.
* BackPACK ``KFLR`` (one batch) is type-2 KFAC with ``separate_bias=True``: per
  weight ``[G, A]``, per bias ``[G]``.
"""

import pytest
import torch
from torch import nn

import hesse
from tests.kfac.test_kfac import DT, Seq, ce_data, cnn, mlp, mse_data

TOL = dict(rtol=1e-10, atol=1e-12)


def _dense(op, n):
    return torch.stack([torch.as_tensor(op @ e) for e in torch.eye(n, dtype=DT)], 1)


CASES = {
    "mlp-ce": (
        mlp,
        lambda: ce_data(),
        nn.CrossEntropyLoss,
        ("type-2", "empirical", "forward-only"),
    ),
    "mlp-mse": (mlp, lambda: mse_data(), nn.MSELoss, ("type-2", "empirical")),
    "cnn-ce": (cnn, lambda: ce_data(shape=(2, 6, 6)), nn.CrossEntropyLoss, ("type-2", "empirical")),
    "seq-mse": (
        lambda: Seq().to(DT),
        lambda: mse_data(shape=(5, 4), out=(5, 3)),
        nn.MSELoss,
        ("empirical", "forward-only"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_equals_curvlinops(case, kfac_approx):
    cl = pytest.importorskip("curvlinops")
    make, data_fn, loss_cls, fisher_types = CASES[case]
    model, data, loss_fn = make(), data_fn(), loss_cls()
    for fisher_type in fisher_types:
        for sep in (False, True):
            K = hesse.KFACOperator(
                model, loss_fn, data, fisher_type=fisher_type, kfac_approx=kfac_approx,
                separate_bias=sep,
            )  # fmt: skip
            C = cl.KFACLinearOperator(
                model, loss_fn, list(model.parameters()), data, fisher_type=fisher_type,
                kfac_approx=kfac_approx, separate_weight_and_bias=sep, check_deterministic=False,
            )  # fmt: skip
            D = K.to_dense()
            torch.testing.assert_close(D, _dense(C, K.shape[0]), **TOL)
            if fisher_type == "type-2" and not sep and case == "mlp-mse":  # CE: G is singular
                torch.testing.assert_close(K.logdet(), torch.as_tensor(C.logdet), **TOL)
                torch.testing.assert_close(K.trace(), torch.as_tensor(C.trace), **TOL)


def test_kfac_inverse_equals_curvlinops():
    cl = pytest.importorskip("curvlinops")
    model, data, ce = cnn(), ce_data(shape=(2, 6, 6)), nn.CrossEntropyLoss()
    K = hesse.KFACOperator(model, ce, data)
    C = cl.KFACLinearOperator(
        model, ce, list(model.parameters()), data, fisher_type="type-2",
        separate_weight_and_bias=False, check_deterministic=False,
    )  # fmt: skip
    n = K.shape[0]
    for kw, ckw in [
        ({}, {}),
        ({"exact_damping": True}, {"use_exact_damping": True}),
        ({"heuristic_damping": True}, {"use_heuristic_damping": True, "min_damping": 0.0}),
    ]:
        inv = K.inverse(1e-2, **kw).to_dense()
        ref = _dense(cl.KFACInverseLinearOperator(C, damping=1e-2, **ckw), n)
        torch.testing.assert_close(inv, ref, **TOL)


@pytest.mark.parametrize("case", ["mlp-ce", "cnn-ce"])
def test_ekfac_equals_curvlinops(case):
    cl = pytest.importorskip("curvlinops")
    make, data_fn, loss_cls, _ = CASES[case]
    model, data, loss_fn = make(), data_fn(), loss_cls()
    for fisher_type in ("type-2", "empirical"):
        E = hesse.EKFACOperator(model, loss_fn, data, fisher_type=fisher_type)
        C = cl.EKFACLinearOperator(
            model, loss_fn, list(model.parameters()), data, fisher_type=fisher_type,
            separate_weight_and_bias=False, check_deterministic=False,
        )  # fmt: skip
        torch.testing.assert_close(E.to_dense(), _dense(C, E.shape[0]), **TOL)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_kflr_equals_backpack(loss):
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFLR

    model = mlp()
    (X, y), _ = ce_data() if loss == "ce" else mse_data()
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    K = hesse.KFACOperator(model, loss_fn, [(X, y)], separate_bias=True)
    ext_model, ext_loss = backpack.extend(model), backpack.extend(loss_fn)
    with backpack.backpack(KFLR()):
        ext_loss(ext_model(X), y).backward()
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        Gb, Ab = layer.weight.kflr
        A, G = K.factors[f"{name}.weight"]
        torch.testing.assert_close(torch.kron(G, A), torch.kron(Gb, Ab), **TOL)
        torch.testing.assert_close(K.factors[f"{name}.bias"].G, layer.bias.kflr[0], **TOL)
