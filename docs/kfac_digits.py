"""The numbers of docs/kfac.md: KFAC and EKFAC against the exact GGN on the digits MLP.

Run from a source checkout (a few seconds to a minute on a laptop CPU)::

    python docs/kfac_digits.py

It trains the default model of ``hesse analyze`` (64-32-10 tanh MLP on scikit-learn's
digits, 2,410 parameters, float64), builds the exact GGN densely and KFAC / EKFAC, and
prints (1) relative errors and spectrum overlaps, (2) CG matvec counts for
``(GGN + lambda I) x = b`` without and with preconditioners.
"""

from __future__ import annotations

import time

import torch

import hesse
from hesse.cli._default_model import digits_mlp
from hesse.solvers import jacobi


def overlap(U: torch.Tensor, V: torch.Tensor) -> float:
    """``||U^T V||_F^2 / k``: 1 when the spans of the ``k`` columns agree, 0 when orthogonal."""
    return float((U.T @ V).square().sum() / U.shape[1])


def main() -> None:
    torch.set_num_threads(1)
    model, loss_fn, data = digits_mlp(dtype=torch.float64)
    G_op = hesse.GGNOperator(model, loss_fn, data)
    t = time.perf_counter()
    G = G_op.to_dense()
    t_dense = time.perf_counter() - t
    n = G.shape[0]
    print(f"digits MLP: {n} parameters, {sum(x.shape[0] for x, _ in data)} samples")
    print(f"exact GGN, dense: {t_dense:.2f} s ({n} products)\n")

    ops = {}
    for name, cls, kw in [
        ("KFAC type-2", hesse.KFACOperator, {}),
        ("KFAC mc (1 sample)", hesse.KFACOperator, {"fisher_type": "mc"}),
        ("KFAC empirical", hesse.KFACOperator, {"fisher_type": "empirical"}),
        ("EKFAC type-2", hesse.EKFACOperator, {}),
    ]:
        t = time.perf_counter()
        ops[name] = cls(model, loss_fn, data, **kw)
        ops[name + " time"] = time.perf_counter() - t

    evals_G, evecs_G = torch.linalg.eigh(G)
    quantiles = [float(evals_G[int(q * (n - 1))] / evals_G[-1]) for q in (0.5, 0.9, 0.99)]
    print(
        "GGN eigenvalues / largest at the 50th, 90th, 99th percentile: "
        + ", ".join(f"{v:.1e}" for v in quantiles)
        + "\n"
    )
    print(
        "| approximation | build | rel. error (Frobenius) | rel. error (diagonal) "
        "| top-10 overlap | top-50 overlap | lambda_max / GGN's |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ["KFAC type-2", "KFAC mc (1 sample)", "KFAC empirical", "EKFAC type-2"]:
        K = ops[name].to_dense()
        rel = float((K - G).norm() / G.norm())
        rel_diag = float((K.diagonal() - G.diagonal()).norm() / G.diagonal().norm())
        ek, vk = torch.linalg.eigh(K)
        o10 = overlap(vk[:, -10:], evecs_G[:, -10:])
        o50 = overlap(vk[:, -50:], evecs_G[:, -50:])
        ratio = float(ek[-1] / evals_G[-1])
        print(
            f"| {name} | {ops[name + ' time'] * 1e3:.0f} ms | {rel:.3f} | {rel_diag:.3f} "
            f"| {o10:.3f} | {o50:.3f} | {ratio:.3f} |"
        )
    print()

    lam = 1e-3 * float(evals_G[-1])
    b = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    K, E = ops["KFAC type-2"], ops["EKFAC type-2"]
    d = hesse.diagonal(G_op, method="exact")
    preconditioners = {
        "none": None,
        "Jacobi (exact GGN diagonal)": jacobi(d, damping=lam),
        "KFAC, (K + lambda I)^-1 exact damping": K.inverse(lam, exact_damping=True),
        "KFAC, factor damping (heuristic pi)": K.inverse(lam, heuristic_damping=True),
        "EKFAC, (E + lambda I)^-1": E.inverse(lam),
    }
    print(f"CG for (GGN + lambda I) x = b, lambda = 1e-3 lambda_max = {lam:.3g}, rtol 1e-6:\n")
    print("| preconditioner | matvecs | true relative residual | time |")
    print("|---|---|---|---|")
    A = G + lam * torch.eye(n, dtype=torch.float64)
    for name, M in preconditioners.items():
        t = time.perf_counter()
        res = hesse.solve(G_op, b, method="cg", damping=lam, preconditioner=M, rtol=1e-6)
        wall = time.perf_counter() - t
        true = float((b - A @ res.x).norm() / b.norm())
        print(f"| {name} | {res.num_matvecs} | {true:.1e} | {wall:.2f} s |")

    # The same solves over a range of damping, on the dense GGN (the same matvec counts,
    # without the data passes).
    print("\nCG matvecs to rtol 1e-6 against the damping (dense GGN as the operator):\n")
    print("| lambda / lambda_max | none | Jacobi | KFAC exact damping | KFAC heuristic | EKFAC |")
    print("|---|---|---|---|---|---|")
    for rel in (1e-1, 1e-2, 1e-3, 1e-4):
        lam = rel * float(evals_G[-1])
        counts = []
        for M in (
            None,
            jacobi(d, damping=lam),
            K.inverse(lam, exact_damping=True),
            K.inverse(lam, heuristic_damping=True),
            E.inverse(lam),
        ):
            res = hesse.solve(G, b, method="cg", damping=lam, preconditioner=M, rtol=1e-6)
            counts.append(str(res.num_matvecs))
        print(f"| {rel:.0e} | " + " | ".join(counts) + " |")


if __name__ == "__main__":
    main()
