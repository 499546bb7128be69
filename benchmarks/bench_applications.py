"""Applications: laplace-torch fit time per backend, and influence scores vs kronfluence / pyDVL.

Workloads (scikit-learn's bundled digits data, no download):

- ``laplace/<model>/<structure>``: ``Laplace(model, "classification",
  hessian_structure=structure, backend=B).fit(loader)`` on 512 digits (256 with
  ``--quick``) in batches of 128, float32, for ``B`` in ``HesseGGN`` and laplace's
  own ``BackPackGGN``, ``CurvlinopsGGN`` and ``AsdlGGN`` (a row with a note where a
  backend is missing or fails). Models: the digits MLP 64-32-10 (2,410 parameters)
  and a CNN (Conv2d(1, 4, 3, padding=1), Tanh, Linear(256, 10): 2,610 parameters;
  ``full`` on a 64-16-10 MLP / Conv2d(1, 2, 3) CNN with ``--quick``). ``max_abs_diff``:
  the largest difference of the posterior precision from HesseGGN's (for
  ``kron``, BackPACK's KFLR uses another convention for convolutions).
- ``influence/digits-mlp``: ``hesse.influence`` of 1,000 training points on 100 test
  points (200 x 20 with ``--quick``) of the trained digits MLP, float64, damping
  1e-3 (relative to a GGN whose largest eigenvalue is ~1): ``curvature="ekfac",
  method="ekfac"`` and ``curvature="ggn", method="cg"`` (rtol 1e-6); against
  pyDVL's ``CgInfluence`` (block CG on the Hessian, same regularisation) and
  ``EkfacInfluence`` (pyDVL 0.9.2 needs dask's ``distributed`` and ``zarr`` and
  then fails under NumPy 2: a note where it does not import), and kronfluence's EK-FAC (``Analyzer``, factors written to a
  temporary folder). ``pearson``: correlation of the scores with hesse's GGN-CG
  scores (the same quantity for CG up to Hessian vs GGN; EK-FAC approximates it).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

import hesse
from hesse.testing import torchvision_cpu_shim

try:  # as a package (benchmarks.run) or as a script folder on sys.path
    from benchmarks._measure import measure, prepare_process
except ImportError:  # pragma: no cover
    from _measure import measure, prepare_process  # type: ignore[no-redef]

DAMPING = 1e-3


def _digits(count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data[:count], dtype=dtype) / 16.0
    return X, torch.tensor(data.target[:count], dtype=torch.long)


def _mlp(hidden: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)


class _Image(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


def _cnn(channels: int, padding: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    side = 8 if padding else 6
    return nn.Sequential(
        _Image(),
        nn.Conv2d(1, channels, 3, padding=padding),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(channels * side * side, 10),
    ).to(dtype)


# -- laplace-torch -------------------------------------------------------------------
def _laplace_rows(quick: bool) -> list[dict[str, Any]]:
    torchvision_cpu_shim()
    try:
        from laplace import Laplace
        from laplace.curvature import BackPackGGN, CurvlinopsGGN

        from hesse.integrations.laplace import HesseGGN
    except Exception as err:  # noqa: BLE001
        return [_note("laplace", "laplace-torch", f"not available ({type(err).__name__}: {err})")]
    backends: dict[str, Any] = {
        "hesse HesseGGN": HesseGGN,
        "laplace BackPackGGN": BackPackGGN,
        "laplace CurvlinopsGGN": CurvlinopsGGN,
    }
    try:
        from laplace.curvature import AsdlGGN

        backends["laplace AsdlGGN"] = AsdlGGN
    except Exception as err:  # noqa: BLE001
        asdl_missing = f"not available ({type(err).__name__}: {str(err)[:80]})"
    else:
        asdl_missing = None
    X, y = _digits(256 if quick else 512, torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=128)
    models = {
        "mlp": lambda full: _mlp(16 if quick and full else 32, torch.float32),
        "cnn": lambda full: _cnn(
            2 if quick and full else 4, 0 if quick and full else 1, torch.float32
        ),
    }
    rows = []
    for model_name, make in models.items():
        for structure in ("diag", "kron", "full"):
            workload = f"laplace/{model_name}/{structure}"
            fitted: dict[str, torch.Tensor] = {}

            def fit(backend: Any, make=make, structure=structure) -> Any:
                la = Laplace(
                    make(structure == "full"),
                    "classification",
                    hessian_structure=structure,
                    backend=backend,
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    la.fit(loader)
                return la

            def precision(name: str, la: Any, fitted=fitted) -> dict[str, Any]:
                P = la.posterior_precision  # outside the timed call
                fitted[name] = (P.to_matrix() if hasattr(P, "to_matrix") else P).detach()
                return {}

            calls = {}
            for name, backend in backends.items():
                try:  # a backend that cannot run this structure gets a note instead
                    fit(backend)
                    calls[name] = lambda backend=backend: fit(backend)
                except Exception as err:  # noqa: BLE001
                    rows.append(
                        _note(workload, name, f"failed ({type(err).__name__}: {str(err)[:80]})")
                    )
            timed = measure(calls, repeats=1 if quick else 3, max_seconds=20.0, summarize=precision)
            ref = fitted.get("hesse HesseGGN")
            for name, stats in timed.items():
                diff = None if ref is None else float((fitted[name] - ref).abs().max())
                rows.append({"workload": workload, "method": name, **stats, "max_abs_diff": diff})
            if asdl_missing:
                rows.append(_note(workload, "laplace AsdlGGN", asdl_missing))
    return rows


# -- influence -----------------------------------------------------------------------
def _influence_rows(quick: bool) -> list[dict[str, Any]]:
    from hesse.cli._default_model import digits_mlp

    model, loss_fn, _ = digits_mlp(quick=False)
    n_train, n_test = (200, 20) if quick else (1000, 100)
    X, y = _digits(1797, torch.float64)
    train, test = (X[:n_train], y[:n_train]), (X[-n_test:], y[-n_test:])
    workload = f"influence/digits-mlp/{n_train}x{n_test}"
    results: dict[str, torch.Tensor] = {}

    def keep(name: str, scores: torch.Tensor) -> None:
        results[name] = scores.detach()

    calls: dict[str, Any] = {
        "hesse ggn cg": lambda: keep(
            "hesse ggn cg",
            hesse.influence(
                model, loss_fn, train, test, method="cg", damping=DAMPING, batch_size=500
            ),
        ),
        "hesse ekfac": lambda: keep(
            "hesse ekfac",
            hesse.influence(
                model, loss_fn, train, test, curvature="ekfac", method="ekfac", damping=DAMPING
            ),
        ),
    }
    notes = []
    for name, make in (
        ("pyDVL CgInfluence (block, Hessian)", _pydvl_cg),
        ("pyDVL EkfacInfluence", _pydvl_ekfac),
        ("kronfluence ekfac", _kronfluence),
    ):
        try:
            fn = make(model, train, test)
            fn()  # a peer that fails gets a note, not a time
            calls[name] = lambda fn=fn, name=name: keep(name, fn())
        except Exception as err:  # noqa: BLE001
            notes.append(_note(workload, name, f"failed ({type(err).__name__}: {str(err)[:100]})"))
    timed = measure(calls, repeats=1, max_seconds=60.0)
    ref = results["hesse ggn cg"].flatten()
    rows = []
    for name, stats in timed.items():
        scores = results[name].flatten()
        r = float(torch.corrcoef(torch.stack([ref, scores.to(ref.dtype)]))[0, 1])
        rows.append({"workload": workload, "method": name, **stats, "pearson": r})
    return rows + notes


def _pydvl_cg(model: nn.Module, train, test):
    from pydvl.influence.torch import CgInfluence

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=500)
    loss = nn.functional.cross_entropy

    def run() -> torch.Tensor:
        inf = CgInfluence(
            model, loss, hessian_regularization=DAMPING, rtol=1e-6, atol=0.0, use_block_cg=True
        ).fit(loader)
        # pyDVL: <H^-1 g_test, g_train> (test x train); Koh & Liang's I is minus its transpose.
        return -inf.influences(test[0], test[1], train[0], train[1]).T

    return run


def _pydvl_ekfac(model: nn.Module, train, test):
    from pydvl.influence.torch import EkfacInfluence

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=500)

    def run() -> torch.Tensor:
        inf = EkfacInfluence(model, hessian_regularization=DAMPING, update_diagonal=True).fit(
            loader
        )
        return -inf.influences(test[0], test[1], train[0], train[1]).T

    return run


def _kronfluence(model: nn.Module, train, test):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return nn.functional.cross_entropy(model(inputs), labels, reduction="sum")

    def run() -> torch.Tensor:
        import copy

        task = Classification()
        prepared = prepare_model(copy.deepcopy(model), task)
        with tempfile.TemporaryDirectory() as out:
            analyzer = Analyzer(
                "bench", prepared, task, cpu=True, disable_tqdm=True, output_dir=out
            )
            train_set = torch.utils.data.TensorDataset(*train)
            analyzer.fit_all_factors(
                "ekfac",
                train_set,
                per_device_batch_size=500,
                factor_args=FactorArguments(strategy="ekfac"),
            )
            analyzer.compute_pairwise_scores(
                "scores", "ekfac", torch.utils.data.TensorDataset(*test), train_set,
                per_device_query_batch_size=len(test[0]), per_device_train_batch_size=500,
                score_args=ScoreArguments(damping_factor=DAMPING),
            )  # fmt: skip
            scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        return -scores.T

    return run


def _note(workload: str, method: str, note: str) -> dict[str, Any]:
    return {
        "workload": workload,
        "method": method,
        "time_s": None,
        "peak_mem_bytes": None,
        "note": note,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    prepare_process(threads=None)  # default threads, as the issue asks
    return _laplace_rows(quick) + _influence_rows(quick)


if __name__ == "__main__":  # pragma: no cover
    for row in run(quick=True):
        print(
            {
                k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in row.items()
            }
        )
