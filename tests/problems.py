"""A registry of scalar test problems with independently known Hessians.

Each :class:`Problem` builds its arguments for a dtype and carries a reference
Hessian (flat ``(n, n)`` over the differentiated arguments) computed WITHOUT hesse:
a closed form where one exists, else central finite differences in float64.
Shared by the core, sparse and operator tests.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from hesse.testing import finite_difference_hessian


def double_backward_hessian(f, x):
    """Dense Hessian by plain autograd double backward, one row per call."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    rows = [torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(x.numel())]
    return torch.stack(rows)


@dataclass(frozen=True)
class Problem:
    name: str
    f: Callable[..., torch.Tensor]
    make_args: Callable[[torch.dtype], tuple[Any, ...]]
    argnums: int | tuple[int, ...]
    reference: Callable[[tuple[Any, ...]], torch.Tensor]  # flat (n, n), float64


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# -- quadratic form x^T A x: H = A + A^T --------------------------------------------
_A = torch.randn(7, 7, generator=_gen(), dtype=torch.float64)


def quadratic(x: torch.Tensor) -> torch.Tensor:
    return x @ _A.to(x.dtype) @ x


# -- extended Rosenbrock: closed form --------------------------------------------------
def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def rosenbrock_hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    n = x.numel()
    H = torch.zeros(n, n, dtype=torch.float64)
    i = torch.arange(n - 1)
    H[i, i] += 1200 * x[:-1] ** 2 - 400 * x[1:] + 2
    H[i + 1, i + 1] += 200
    H[i, i + 1] = -400 * x[:-1]
    H[i + 1, i] = -400 * x[:-1]
    return H


# -- separable sum(sin(x)) on a 2-D tensor: diag(-sin x) ------------------------------
def sum_sin(x: torch.Tensor) -> torch.Tensor:
    return x.sin().sum()


# -- a small MLP loss, w.r.t. its input and w.r.t. its parameters (dict) ---------------
torch.manual_seed(0)
_MLP32 = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
# One module per dtype: converting a module inside f (module.to) would mutate it under a transform.
_MLPS = {torch.float32: _MLP32, torch.float64: copy.deepcopy(_MLP32).double()}
_X = torch.randn(6, 4, generator=_gen())
_Y = torch.tensor([0, 2, 1, 1, 0, 2])


def mlp_input_loss(x: torch.Tensor) -> torch.Tensor:
    model = _MLPS[x.dtype]
    return torch.nn.functional.cross_entropy(model(x), _Y)


def mlp_param_loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = functional_call(_MLPS[x.dtype], params, (x,))
    return torch.nn.functional.cross_entropy(out, _Y)


def _mlp_params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).clone() for k, v in _MLPS[dtype].named_parameters()}


# -- two arguments (tuple argnums): f(x, y) = sum(x^2) * sum(sin(y)) + x . y ----------
def two_args(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x**2).sum() * y.sin().sum() + (x * y).sum()


def _fd(f: Callable, argnums: int | tuple[int, ...]) -> Callable[[tuple[Any, ...]], torch.Tensor]:
    def ref(args: tuple[Any, ...]) -> torch.Tensor:
        args64 = tuple(
            {k: v.double() for k, v in a.items()} if isinstance(a, dict) else a.double()
            for a in args
        )
        return finite_difference_hessian(f, *args64, argnums=argnums)

    return ref


PROBLEMS: list[Problem] = [
    Problem(
        "quadratic",
        quadratic,
        lambda dt: (torch.randn(7, generator=_gen(), dtype=dt),),
        0,
        lambda args: _A + _A.T,
    ),
    Problem(
        "rosenbrock",
        rosenbrock,
        lambda dt: (torch.randn(9, generator=_gen(), dtype=dt),),
        0,
        lambda args: rosenbrock_hessian(args[0]),
    ),
    Problem(
        "sum_sin_2d",
        sum_sin,
        lambda dt: (torch.randn(3, 4, generator=_gen(), dtype=dt),),
        0,
        lambda args: torch.diag(-args[0].double().sin().reshape(-1)),
    ),
    Problem(
        "mlp_input",
        mlp_input_loss,
        lambda dt: (_X.to(dt).clone(),),
        0,
        _fd(mlp_input_loss, 0),
    ),
    Problem(
        "mlp_params",
        mlp_param_loss,
        lambda dt: (_mlp_params(dt), _X.to(dt).clone()),
        0,
        _fd(mlp_param_loss, 0),
    ),
    Problem(
        "two_args",
        two_args,
        lambda dt: (
            torch.randn(3, generator=_gen(), dtype=dt),
            torch.randn(3, generator=_gen(), dtype=dt) + 1,
        ),
        (0, 1),
        _fd(two_args, (0, 1)),
    ),
]

PROBLEM_IDS = [p.name for p in PROBLEMS]


class Residual(torch.nn.Module):
    """Linear -> LayerNorm -> tanh in a residual branch, then Linear: the case where
    ``torch.func.hessian`` is wrong on torch 2.13 (references use double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.out = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + torch.tanh(self.norm(self.inp(x))))
