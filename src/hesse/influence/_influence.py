"""Influence functions: ``I[i, j] = -g_test_j^T (C + damping I)^{-1} g_train_i``.

# NOTE [influence]
Koh & Liang (2017) approximate the effect of upweighting a training point ``z_i``
by ``eps`` on the loss at a test point ``z_j``, to first order, by
``eps * I_up,loss(z_i, z_j)`` with

.. math:: I_{\\text{up,loss}}(z_i, z_j) = -\\nabla_\\theta \\ell(z_j)^\\top
          (C + \\lambda I)^{-1} \\nabla_\\theta \\ell(z_i),

``C`` the curvature (Hessian, GGN, or a Kronecker-factored approximation) of the
*mean* training loss ``(1/N) sum_i l(z_i)`` at the trained parameters and
``lambda = damping`` (for an objective with the L2 term ``lambda/2 ||theta||^2``,
exactly its Hessian). Removing ``z_i`` is ``eps = -1/N``: the test loss changes by
about ``-I[i, j] / N``.

The computation: per-sample gradients of the test points (``torch.func``,
vectorised in chunks), one inverse application per batch of ``test_batch_size``
test gradients (``V = (C + lambda I)^{-1} G_test^T``: a dense eigendecomposition,
a block-CG/MINRES/LiSSA solve, or a Kronecker-factored inverse), then the
training gradients chunk by chunk against ``V``: ``I = -G_train V``. Training
gradients are never all held at once; the test side holds ``V`` (``P x n_test``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import hesse
from hesse._validation import check_choice, check_generator, describe, fail
from hesse.influence._gradients import PerSampleGradients
from hesse.operators._base import LinearOperator
from hesse.operators._normalization import reduction_of
from hesse.solvers._solve import check_damping, solve
from hesse.spectra._input import check_int, check_positive_float

CURVATURES = ("ggn", "hessian", "kfac", "ekfac")
METHODS = ("exact", "cg", "minres", "lissa", "ekfac")
#: default residual targets: iterative solves to 1e-6; LiSSA (stochastic) to 1e-2.
DEFAULT_RTOL = {"cg": 1e-6, "minres": 1e-6, "lissa": 1e-2}


@dataclass
class InfluenceInfo:
    """What :func:`influence` / :func:`self_influence` did, returned with ``return_info=True``.

    Attributes:
        settings: every option that shaped the scores (curvature, method, damping,
            tolerances, LiSSA scale/depth/repeats, batch sizes, parameter names,
            counts) and the formula.
        num_matvecs: curvature products spent by the solves (0 for ``"exact"``,
            whose dense matrix costs ``P`` products, counted in ``dense_matvecs``).
        dense_matvecs: products spent forming a dense curvature (``"exact"``).
        residual_norm: per test point (per training point for self-influence), the
            true residual ``||g - (C + lambda I) v||`` of the solve (iterative
            methods), else ``None``.
        converged: per solve, whether it met ``rtol`` (iterative methods), else ``None``.
        stderr: for ``"lissa"`` with ``repeats > 1``, the standard error of every
            score over the independent recursions; else ``None``.
        seconds: wall time.
    """

    settings: dict
    num_matvecs: int = 0
    dense_matvecs: int = 0
    residual_norm: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    stderr: torch.Tensor | None = None
    seconds: float = 0.0
    _residuals: list = field(default_factory=list, repr=False)
    _converged: list = field(default_factory=list, repr=False)


def influence(
    model: nn.Module,
    loss_fn: Callable,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_data: tuple[torch.Tensor, torch.Tensor],
    *,
    curvature: str = "ggn",
    method: str = "cg",
    damping: float = 0.0,
    params: Any = None,
    batch_size: int | None = None,
    test_batch_size: int = 64,
    chunk_size: int = 64,
    rtol: float | None = None,
    max_matvecs: int | None = None,
    preconditioner: LinearOperator | None = None,
    scale: float | None = None,
    depth: int | None = None,
    repeats: int = 1,
    generator: torch.Generator | None = None,
    on_failure: str = "warn",
    progress: bool = False,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, InfluenceInfo]:
    """Influence of every training point on the loss at every test point (Koh & Liang 2017).

    .. math:: I_{ij} = -\\nabla_\\theta \\ell(z^{\\text{test}}_j)^\\top
              (C + \\lambda I)^{-1} \\nabla_\\theta \\ell(z^{\\text{train}}_i)

    (see NOTE [influence]): upweighting training point ``i`` by ``eps`` changes
    the loss at test point ``j`` by about ``eps * I[i, j]``; removing it (``eps =
    -1/N``) by about ``-I[i, j] / N``.

    Curvatures ``C`` (of the mean training loss over ``train_data``):
    ``"ggn"`` (:class:`hesse.GGNOperator`), ``"hessian"``
    (:class:`hesse.HessianOperator`; may be indefinite: use ``damping`` or
    ``method="minres"``), ``"kfac"`` / ``"ekfac"`` (hesse's Kronecker-factored
    operators, type-2 factors).

    Methods for ``(C + lambda I)^{-1}``:

    * ``"exact"``: a dense eigendecomposition of ``C`` (``P`` products and
      ``O(P^3)``: small models); for ``"kfac"``/``"ekfac"`` the exact inverse
      ``(K + lambda I)^{-1}`` through the Kronecker eigenbases (cheap; for KFAC
      ``inverse(damping, exact_damping=True)``).
    * ``"cg"`` / ``"minres"``: :func:`hesse.solve` with one block of
      ``test_batch_size`` right-hand sides at a time (``rtol`` default 1e-6).
    * ``"lissa"``: :func:`hesse.solve` with ``method="lissa"``: each step draws one
      training batch (``batch_size``) with ``generator``; ``repeats`` independent
      solves give ``info.stderr`` of every score; ``scale`` and ``depth`` are
      required (``rtol`` default 1e-2, checked on the true residual).
    * ``"ekfac"``: the EKFAC inverse (kronfluence's method): ``curvature="ekfac"``
      with its exact inverse.

    Args:
        model: the trained ``nn.Module`` (its mode is kept: call ``model.eval()``
            for dropout/BatchNorm models).
        loss_fn: ``loss_fn(output, targets) -> scalar``, mean- or sum-reduced (the
            curvature is of the mean loss either way).
        train_data, test_data: ``(inputs, targets)`` tensors with one point per
            row, of matching per-point shapes and dtypes.
        curvature, method: as above.
        damping: ``lambda >= 0``.
        params: parameter subset, as for :class:`hesse.GGNOperator`.
        batch_size: training points per batch of the curvature passes (default:
            all in one batch); LiSSA samples these batches.
        test_batch_size: test gradients per solve (block size).
        chunk_size: points per vectorised per-sample-gradient chunk.
        rtol, max_matvecs, preconditioner, on_failure: for the iterative solves,
            as in :func:`hesse.solve`.
        scale, depth, repeats, generator: LiSSA's (``generator`` required when
            there is more than one training batch).
        progress: tqdm progress bars over the solves and the training chunks.
        return_info: also return an :class:`InfluenceInfo` with the settings,
            products, residuals and (LiSSA) standard errors.

    Returns:
        ``(n_train, n_test)`` scores in the model's dtype (and the info with
        ``return_info=True``).

    Raises:
        TypeError: a non-module model, non-callable loss, data that is not a pair
            of tensors, bad option types.
        ValueError: test and training points of different shapes or dtypes, a
            non-finite gradient (naming the point), ``damping < 0``, a singular
            ``C + damping I`` for ``"exact"`` (raise ``damping``), LiSSA options
            missing, unknown curvature or method.
        NotImplementedError: ``"ekfac"`` method with another curvature.
        hesse.NotConvergedError: an iterative solve missed ``rtol`` with
            ``on_failure="raise"``.

    Cost: ``n_train + n_test`` per-sample gradients (vectorised), plus the
    inverse applications: ``"exact"`` ``P`` products and an ``O(P^3)``
    eigendecomposition; ``"cg"`` about ``sqrt(kappa)`` block products per test
    batch; ``"lissa"`` ``depth * repeats`` mini-batch products per test batch.
    Memory ``O(P * n_test)`` for ``V`` plus one chunk of training gradients.

    Example:
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
        >>> scores = influence(model, torch.nn.CrossEntropyLoss(), (X, y), (X[:4], y[:4]),
        ...                    damping=0.1)
        >>> scores.shape
        torch.Size([20, 4])

    References:
        Koh, P. W. & Liang, P. (2017). Understanding black-box predictions via
        influence functions. ICML. Agarwal, N., Bullins, B. & Hazan, E. (2017).
        Second-order stochastic optimization for machine learning in linear time.
        JMLR. Grosse, R. et al. (2023). Studying large language model
        generalization with influence functions (EK-FAC influence).
    """
    call = "hesse.influence(model, loss_fn, train_data, test_data)"
    start = time.perf_counter()
    options = dict(
        curvature=curvature,
        method=method,
        damping=damping,
        params=params,
        batch_size=batch_size,
        test_batch_size=test_batch_size,
        chunk_size=chunk_size,
        rtol=rtol,
        max_matvecs=max_matvecs,
        preconditioner=preconditioner,
        scale=scale,
        depth=depth,
        repeats=repeats,
        generator=generator,
        on_failure=on_failure,
        progress=progress,
    )
    problem = _Problem(call, model, loss_fn, train_data, options)
    X_test, y_test = _pair(call, "test_data", test_data)
    problem.check_matching(X_test, y_test)
    n_test = X_test.shape[0]
    problem.info.settings["n_test"] = n_test

    # V = (C + lambda I)^{-1} G_test^T, one block of test gradients at a time: (R, P, n_test).
    G_test = problem.grads.map(X_test, y_test, lambda G: G, what="test")
    blocks = range(0, n_test, test_batch_size)
    V = torch.cat(
        [
            problem.apply(G_test[s : s + test_batch_size].T)
            for s in _bar(blocks, progress, "solves")
        ],
        dim=2,
    )
    del G_test
    bar = _Counter(problem.n_train, progress, "training points")
    scores = problem.grads.map(
        problem.X,
        problem.y,
        lambda G: bar.tick(-torch.einsum("cp,rpt->ctr", G, V)),
        what="training",
    )
    bar.close()
    return problem.finish(scores, start, return_info)


def self_influence(
    model: nn.Module,
    loss_fn: Callable,
    train_data: tuple[torch.Tensor, torch.Tensor],
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, InfluenceInfo]:
    """``I[i, i] = -g_i^T (C + lambda I)^{-1} g_i`` for every training point: the diagonal of
    ``influence(model, loss_fn, train_data, train_data, ...)`` without the off-diagonal.

    Large ``|I[i, i]|`` marks points the model fits with effort (mislabelled or
    atypical ones; Koh & Liang 2017, Sec. 5.4). Options and errors as
    :func:`influence` (``test_batch_size`` is the number of training gradients per
    solve). Returns ``(n_train,)`` (and the info with ``return_info=True``).

    Cost: one inverse application per training point (in blocks), plus
    ``n_train`` per-sample gradients.
    """
    call = "hesse.self_influence(model, loss_fn, train_data)"
    start = time.perf_counter()
    return_info = options.pop("return_info", False)
    progress = options.get("progress", False)
    unknown = set(options) - set(_OPTION_DEFAULTS)
    if unknown:
        fail(call, f"unknown option(s) {sorted(unknown)}; see hesse.influence.", TypeError)
    problem = _Problem(call, model, loss_fn, train_data, {**_OPTION_DEFAULTS, **options})
    problem.info.settings["n_test"] = "self"
    bar = _Counter(problem.n_train, progress, "training points")

    def diagonal(G: torch.Tensor) -> torch.Tensor:
        V = problem.apply(G.T)  # (R, P, c)
        return bar.tick(-torch.einsum("cp,rpc->cr", G, V))

    chunked = problem.grads
    saved, chunked.chunk_size = chunked.chunk_size, problem.test_batch_size
    scores = chunked.map(problem.X, problem.y, diagonal, what="training")
    chunked.chunk_size = saved
    bar.close()
    return problem.finish(scores, start, return_info)


_OPTION_DEFAULTS: dict[str, Any] = {
    "curvature": "ggn",
    "method": "cg",
    "damping": 0.0,
    "params": None,
    "batch_size": None,
    "test_batch_size": 64,
    "chunk_size": 64,
    "rtol": None,
    "max_matvecs": None,
    "preconditioner": None,
    "scale": None,
    "depth": None,
    "repeats": 1,
    "generator": None,
    "on_failure": "warn",
    "progress": False,
}


def _pair(call: str, name: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        not isinstance(data, (tuple, list))
        or len(data) != 2
        or not all(isinstance(t, torch.Tensor) for t in data)
    ):
        fail(
            call,
            f"expected {name} to be an (inputs, targets) pair of tensors with one point per "
            f"row, got {describe(data)}.",
            TypeError,
        )
    X, y = data
    for what, t in (("inputs", X), ("targets", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            first = int((~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero()[0, 0])
            fail(
                call,
                f"{name} {what} have non-finite entries (inf or nan), first at point {first}. "
                "Remove or fix those points.",
            )
    if X.dim() == 0 or y.dim() == 0 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        fail(
            call,
            f"expected {name}'s inputs and targets to hold the same number (>= 1) of points "
            f"in their first dimension, got shapes {tuple(X.shape)} and {tuple(y.shape)}.",
        )
    return X, y


class _Counter:
    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"hesse.influence: {desc}", leave=False)

    def tick(self, out: torch.Tensor) -> torch.Tensor:
        if self.bar is not None:
            self.bar.update(out.shape[0])
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _bar(items: range, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=f"hesse.influence: {desc}", leave=False)


class _Problem:
    """The validated options, the curvature operator and the inverse application."""

    def __init__(self, call: str, model: Any, loss_fn: Any, train_data: Any, o: dict) -> None:
        self.call = call
        if not isinstance(model, nn.Module):
            fail(call, f"expected model to be a torch.nn.Module, got {describe(model)}.", TypeError)
        if not callable(loss_fn):
            fail(call, f"expected loss_fn to be callable, got {describe(loss_fn)}.", TypeError)
        check_choice(call, "curvature", o["curvature"], CURVATURES)
        check_choice(call, "method", o["method"], METHODS)
        check_choice(call, "on_failure", o["on_failure"], ("warn", "raise"))
        self.curvature, self.method = o["curvature"], o["method"]
        if self.method == "ekfac" and self.curvature != "ekfac":
            fail(
                call,
                f"method='ekfac' inverts the EKFAC operator, but curvature={self.curvature!r}. "
                "Pass curvature='ekfac' (or choose method='cg' / 'exact').",
                NotImplementedError,
            )
        self.damping = check_damping(call, o["damping"])
        self.X, self.y = _pair(call, "train_data", train_data)
        self.n_train = self.X.shape[0]
        bs = (
            self.n_train
            if o["batch_size"] is None
            else check_int(call, "batch_size", o["batch_size"], 1)
        )
        self.test_batch_size = check_int(call, "test_batch_size", o["test_batch_size"], 1)
        chunk_size = check_int(call, "chunk_size", o["chunk_size"], 1)
        self.rtol = DEFAULT_RTOL.get(self.method) if o["rtol"] is None else o["rtol"]
        if self.rtol is not None:
            self.rtol = check_positive_float(call, "rtol", self.rtol)
        check_generator(call, o["generator"])
        self.options = o
        self.batches = [
            (self.X[s : s + bs], self.y[s : s + bs]) for s in range(0, self.n_train, bs)
        ]
        if self.method == "lissa":
            if o["scale"] is None or o["depth"] is None:
                fail(
                    call,
                    "method='lissa' needs scale (> lambda_max(C + damping I) / 2, e.g. from "
                    "hesse.eigsh) and depth (recursion steps); pass both.",
                )
            check_int(call, "repeats", o["repeats"], 1)
            if len(self.batches) > 1 and o["generator"] is None:
                fail(
                    call,
                    "method='lissa' samples training batches at random, so a generator is "
                    "required. Pass generator=torch.Generator().manual_seed(0).",
                )
        self.op = self._operator(model, loss_fn, self.batches)
        names = list(self.op.param_names)
        self.grads = PerSampleGradients(
            call, model, loss_fn, self.op.layout, names, chunk_size=chunk_size
        )
        # NOTE [influence]: C is the curvature of the *mean* training loss.
        self.sum_loss = reduction_of(call, loss_fn) == "sum"
        self.scaled = self.op * (1.0 / self.n_train) if self.sum_loss else self.op
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None
        self._inverse: LinearOperator | None = None
        settings = {
            "formula": "I[i, j] = -g_test_j^T (C + damping I)^-1 g_train_i",
            "curvature": self.curvature,
            "method": self.method,
            "damping": self.damping,
            "rtol": self.rtol,
            "max_matvecs": o["max_matvecs"],
            "preconditioner": None if o["preconditioner"] is None else repr(o["preconditioner"]),
            "batch_size": bs,
            "test_batch_size": self.test_batch_size,
            "params": names,
            "n_params": self.op.shape[0],
            "n_train": self.n_train,
            "loss_fn": repr(loss_fn),
        }
        if self.method == "lissa":
            settings.update(scale=o["scale"], depth=o["depth"], repeats=o["repeats"])
        self.info = InfluenceInfo(settings=settings)

    def check_matching(self, X: torch.Tensor, y: torch.Tensor) -> None:
        for what, a, b in (("inputs", self.X, X), ("targets", self.y, y)):
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                fail(
                    self.call,
                    f"test {what} must match the training {what} per point: expected shape "
                    f"(n, {', '.join(map(str, a.shape[1:]))}) of {a.dtype}, got "
                    f"{tuple(b.shape)} of {b.dtype}.",
                )

    def _operator(self, model: nn.Module, loss_fn: Callable, batches: list) -> LinearOperator:
        params = self.options["params"]
        if self.curvature == "ggn":
            return hesse.GGNOperator(model, loss_fn, batches, params=params)
        if self.curvature == "hessian":
            return hesse.HessianOperator(model, loss_fn, batches, params=params)
        name = "KFACOperator" if self.curvature == "kfac" else "EKFACOperator"
        cls = getattr(hesse, name, None)
        if cls is None:
            fail(
                self.call,
                f"curvature={self.curvature!r} needs hesse.{name}, which this build lacks. Use "
                "curvature='ggn' or 'hessian'.",
                NotImplementedError,
            )
        return cls(model, loss_fn, batches, params=params)

    # -- (C + lambda I)^{-1} B for B (P, k): returns (R, P, k) --------------------------
    def apply(self, B: torch.Tensor) -> torch.Tensor:
        if self.method in ("exact", "ekfac"):
            return self._exact(B).unsqueeze(0)
        o = self.options
        common = dict(
            damping=self.damping,
            rtol=self.rtol,
            max_matvecs=o["max_matvecs"],
            on_failure=o["on_failure"],
        )
        if self.method in ("cg", "minres"):
            result = solve(
                self.scaled, B, method=self.method, preconditioner=o["preconditioner"], **common
            )
            self._record(result)
            return result.x.unsqueeze(0)
        samples = None
        if len(self.batches) > 1:
            samples = [self._operator_on([batch]) for batch in self.batches]
        result = solve(
            self.scaled,
            B,
            method="lissa",
            scale=o["scale"],
            depth=o["depth"],
            repeats=o["repeats"],
            samples=samples,
            generator=o["generator"],
            **common,
        )
        self._record(result)
        # The repeats' own estimates give the scores' spread (one if the budget ran out).
        return result.x.unsqueeze(0) if result.estimates is None else result.estimates

    def _operator_on(self, batches: list) -> LinearOperator:
        op = type(self.op)(self.op.model, self.op.loss_fn, batches, params=self.op.param_names)
        return op * (1.0 / batches[0][0].shape[0]) if self.sum_loss else op

    def _record(self, result: Any) -> None:
        self.info.num_matvecs += result.num_matvecs
        self.info._residuals.append(result.residual_norm.reshape(-1))
        self.info._converged.append(result.converged.reshape(-1))

    def _exact(self, B: torch.Tensor) -> torch.Tensor:
        if self.curvature in ("kfac", "ekfac"):
            # (K / N + lambda I)^{-1} = N (K + N lambda I)^{-1} for a sum-reduced loss.
            n = self.n_train if self.sum_loss else 1
            if self._inverse is None:
                exact = {"exact_damping": True} if self.curvature == "kfac" else {}
                self._inverse = self.op.inverse(self.damping * n, **exact)
            return n * (self._inverse @ B)
        if self._dense is None:
            C = self.scaled.to_dense()
            self.info.dense_matvecs += C.shape[0]
            if not bool(torch.isfinite(C).all()):
                fail(
                    self.call,
                    "the curvature has non-finite entries (inf or nan). Check the model's "
                    "parameters and the training data.",
                )
            C = (C + C.T) / 2 + self.damping * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
            w, Q = torch.linalg.eigh(C)
            top = float(w.abs().max())
            floor = C.shape[0] * torch.finfo(C.dtype).eps * max(top, torch.finfo(C.dtype).tiny)
            if float(w.abs().min()) <= floor:
                fail(
                    self.call,
                    f"C + damping I is singular (smallest |eigenvalue| {float(w.abs().min()):.3g}, "
                    f"largest {top:.3g}) with damping={self.damping:g}: the influence is not "
                    "defined. Raise damping (e.g. to 1e-3 * the largest eigenvalue).",
                )
            self._dense = (w, Q)
        w, Q = self._dense
        return Q @ ((Q.T @ B) / w.unsqueeze(1))

    def finish(self, scores: torch.Tensor, start: float, return_info: bool):
        """Average over LiSSA repeats (with their standard error) and fill the info."""
        info = self.info
        R = scores.shape[-1]
        if R > 1:
            info.stderr = scores.std(dim=-1) / math.sqrt(R)
        scores = scores.mean(dim=-1)
        if info._residuals:
            info.residual_norm = torch.cat(info._residuals)
            info.converged = torch.cat(info._converged)
        info.seconds = time.perf_counter() - start
        return (scores, info) if return_info else scores
