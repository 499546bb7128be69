"""The result type of every stochastic estimator: a value, its standard error, its interval.

# NOTE [calibrated intervals]
An interval ``value -+ 1.96 * stderr`` covers the truth 95 % of the time only if
``stderr`` is unbiased for the estimator's spread and the estimate is close to
normal. Neither holds at the sample sizes people use (a few dozen probes), so
every estimator states how its ``stderr`` was obtained through ``dof``, the
degrees of freedom of its variance estimate, and :meth:`Estimate.interval` uses
Student-t quantiles with them:

* independent draws (Hutchinson, the deflated probes of Hutch++ given the
  sketch, Monte-Carlo diagonals): the sample variance of ``m`` draws, ``m - 1``
  degrees of freedom;
* exchangeable but dependent terms (the leave-one-out estimates of XTrace and
  XDiag share all but one column of their sketch): their sample variance (the
  error estimate of Epperly, Tropp & Webber 2024) misses the covariance between
  terms and is too small (83-90 % coverage measured on a network GGN); the
  delete-one jackknife over the columns overshoots (99-100 %: it counts the
  columns' interactions more than once; Efron & Stein 1981). The covariance
  itself has an unbiased estimate from the terms recomputed without one more
  column (:func:`exchangeable_stderr`); ``s - 1`` degrees of freedom.

The remaining error is skewness: draws ``z^T A z`` of a positive semi-definite
``A`` with a decaying spectrum, or squared gradients (Monte-Carlo diagonals), are
right-skewed, and a symmetric t interval then covers less than nominal (about
93 % for Hutchinson with 24 draws on such a matrix). Its two-sided coverage
error is, to order ``1/m`` (Hall 1992, Sec. 3.5, the Edgeworth expansion of the
Studentized mean, whose normal-theory part the t quantile already absorbs),

.. math:: \frac{2}{m}\\, x \\phi(x) \\Big[\frac{\\kappa (x^2 - 3)}{12}
          - \frac{\\gamma^2 (x^4 + 2x^2 - 3)}{18}\\Big]

with skewness ``gamma`` and excess kurtosis ``kappa`` of the draws. Estimates from
independent draws therefore carry the draws' sample ``skewness`` and ``kurtosis``,
and :meth:`Estimate.interval` widens the quantile ``x`` by the amount that
cancels this term (never narrowing it, and at most doubling it).

References:
    Efron, B. & Stein, C. (1981). The jackknife estimate of variance. Ann. Statist. 9(3).
    Hall, P. (1992). The Bootstrap and Edgeworth Expansion. Springer (Sec. 3.5).
    Epperly, E. N., Tropp, J. A. & Webber, R. J. (2024). XTrace: Making the most of
    every sample in stochastic trace estimation. SIAM J. Matrix Anal. Appl.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hesse._validation import fail


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its error bar.

    Attributes:
        value: the estimate (a scalar tensor for traces, a tensor shaped like the
            diagonal for diagonals).
        stderr: the estimated standard error of ``value`` (same shape); 0 when
            ``exact``, NaN when it cannot be estimated (a single draw).
        num_matvecs: operator products spent.
        dof: degrees of freedom of the variance estimate behind ``stderr`` (see
            NOTE [calibrated intervals]); ``math.inf`` for a normal interval.
        exact: ``True`` when ``value`` was computed exactly (the budget reached
            the dimension), not estimated.
        skewness, kurtosis: sample skewness and excess kurtosis of the
            independent draws behind ``value`` (shaped like it), or ``None``
            where the estimate is not a mean of independent draws.
    """

    value: torch.Tensor
    stderr: torch.Tensor
    num_matvecs: int
    dof: float = math.inf
    exact: bool = False
    skewness: torch.Tensor | None = None
    kurtosis: torch.Tensor | None = None

    def interval(self, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-sided ``level`` confidence interval ``value -+ t * stderr``.

        ``t`` is the Student-t quantile ``t_{dof}((1 + level) / 2)`` (the normal
        quantile for ``dof = inf``; e.g. 2.01 instead of 1.96 for 50 draws),
        widened for skewed draws when ``skewness`` is known (NOTE [calibrated
        intervals]). An exact estimate has a zero-width interval.

        Args:
            level: the nominal coverage, in ``(0, 1)``.

        Returns:
            ``(low, high)``, tensors shaped like ``value``.

        Raises:
            ValueError: ``level`` outside ``(0, 1)``.

        Example:
            >>> est = Estimate(torch.tensor(1.0), torch.tensor(0.1), num_matvecs=10, dof=9)
            >>> [round(float(v), 3) for v in est.interval(0.95)]
            [0.774, 1.226]
        """
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            fail("Estimate.interval(level)", f"expected level in (0, 1), got {level!r}.")
        if self.exact:
            return self.value.clone(), self.value.clone()
        x = t_quantile((1 + level) / 2, self.dof)
        q = torch.full_like(self.stderr, x)
        if self.skewness is not None and self.kurtosis is not None:
            m = self.dof + 1
            g2, k = self.skewness.square(), self.kurtosis
            extra = x / m * (g2 * (x**4 + 2 * x**2 - 3) / 18 - k * (x**2 - 3) / 12)
            q = q + extra.clamp(0.0, x)
        half = q * self.stderr
        return self.value - half, self.value + half


def t_quantile(p: float, dof: float) -> float:
    """The ``p``-quantile of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy.stats import norm, t

    if dof <= 0 or math.isnan(dof):
        return math.nan
    return float(norm.ppf(p) if math.isinf(dof) else t.ppf(p, dof))


def from_moments(
    mean: torch.Tensor,
    m2: torch.Tensor,
    m3: torch.Tensor,
    m4: torch.Tensor,
    count: int,
    num_matvecs: int,
) -> Estimate:
    """The Estimate of a mean of ``count`` independent draws from their central sums.

    ``m2, m3, m4`` are the sums of squared, cubed and fourth-power deviations from
    ``mean``. ``stderr`` = sample standard deviation / ``sqrt(count)`` with
    ``count - 1`` degrees of freedom (NaN for one draw).
    """
    if count < 2:
        nan = torch.full_like(mean, float("nan"))
        return Estimate(mean, nan, num_matvecs, dof=math.nan)
    stderr = (m2 / (count - 1) / count).sqrt()
    var = m2 / count
    tiny = torch.finfo(mean.dtype).tiny
    skew = torch.where(var > tiny, m3 / count / var.clamp_min(tiny) ** 1.5, 0.0)
    kurt = torch.where(var > tiny, m4 / count / var.clamp_min(tiny).square() - 3, 0.0)
    return Estimate(mean, stderr, num_matvecs, dof=float(count - 1), skewness=skew, kurtosis=kurt)


def from_draws(
    draws: torch.Tensor, num_matvecs: int, offset: torch.Tensor | float = 0.0
) -> Estimate:
    """The Estimate ``offset + mean`` of ``(m, ...)`` independent unbiased draws.

    One draw with no offset is returned as is (a view of ``draws``, no copy): its
    spread is unknown (NaN error bars), and a sample-sized copy would be a fixed
    cost on small problems (the MC GGN diagonal of one batch).
    """
    if draws.shape[0] < 2:  # one draw has no spread (NaN error bars): skip the moments
        mean = draws[0] if draws.shape[0] == 1 else draws.mean(0)
        est = from_moments(mean, mean, mean, mean, draws.shape[0], num_matvecs)
    else:
        mean = draws.mean(0)
        dev = draws - mean
        m2, m3, m4 = (dev**p for p in (2, 3, 4))
        est = from_moments(mean, m2.sum(0), m3.sum(0), m4.sum(0), draws.shape[0], num_matvecs)
    value = est.value if isinstance(offset, float) and offset == 0.0 else est.value + offset
    return Estimate(value, est.stderr, num_matvecs, est.dof, False, est.skewness, est.kurtosis)


def merge_moments(a: tuple, b: tuple) -> tuple:
    """Combine ``(count, mean, m2, m3, m4)`` of two groups of draws (Pebay 2008)."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    n = na + nb
    d = mb - ma
    mean = ma + d * nb / n
    m2 = m2a + m2b + d**2 * na * nb / n
    m3 = m3a + m3b + d**3 * na * nb * (na - nb) / n**2 + 3 * d * (na * m2b - nb * m2a) / n
    m4 = (
        m4a
        + m4b
        + d**4 * na * nb * (na**2 - na * nb + nb**2) / n**3
        + 6 * d**2 * (na**2 * m2b + nb**2 * m2a) / n**2
        + 4 * d * (na * m3b - nb * m3a) / n
    )
    return n, mean, m2, m3, m4


#: at most this many leave-one-out sketches (see :func:`exchangeable_stderr`): bounds the cost.
MAX_PAIRS_COLUMNS = 40


def exchangeable_stderr(terms: torch.Tensor, without: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Standard error of the mean of ``s`` exchangeable leave-one-out terms, and its dof.

    ``terms[i]`` (``(s, ...)``) is column ``i``'s unbiased estimate from the sketch of
    the other columns (XTrace, XDiag), so ``t_i = tau + e_i`` with ``E[e_i | the
    other columns] = 0``. ``without[j, i]`` (``(g, g, ...)``, ``2 <= g <= s``) is the
    same term computed without column ``j`` in the sketch (any value where ``i == j``).

    The variance of ``sum_i e_i`` is :math:`\\sum_i E e_i^2 + \\sum_{i \ne j} E[e_i e_j]`.
    The terms' spread estimates the first sum only (the error estimate of Epperly,
    Tropp & Webber 2024, which is why it is too small). For the second, write
    :math:`e_i = e_i^{(-j)} + \\delta_{ij}` with :math:`\\delta_{ij} = t_i - t_i^{(-j)}`
    (computable: ``tau`` cancels). :math:`e_i^{(-j)}` does not depend on column ``j``
    and has mean zero over column ``i`` given the rest, and the same holds for
    :math:`e_j`, :math:`e_j^{(-i)}` with ``i`` and ``j`` swapped, so every product
    but one has mean zero and :math:`E[e_i e_j] = E[\\delta_{ij} \\delta_{ji}]`. With
    :math:`SS = \\sum_i (t_i - \bar t)^2` (expectation :math:`\\sum_i E e_i^2 - V/s`),

    .. math:: \\widehat{\\mathrm{var}}(\bar t) = \frac{SS + s(s-1)\\,
              \\mathrm{mean}_{i \ne j < g}\\, \\delta_{ij}\\delta_{ji}}{s (s - 1)},

    unbiased (exchangeability makes every pair alike, so ``g`` columns suffice;
    ``benchmarks/interval_coverage.py`` checks the intervals). The pair term is noisy: a total
    below the terms' spread alone is replaced by that spread (a conservative floor),
    and terms that agree to rounding (every sketch holds the range: the estimate is
    exact) give 0. Degrees of freedom: ``s - 1``.
    """
    s, g = terms.shape[0], without.shape[0]
    ss = (terms - terms.mean(0)).square().sum(0)
    delta = terms[:g].unsqueeze(0) - without  # delta[j, i] = t_i - t_i^(-j)
    pairs = delta * delta.transpose(0, 1)
    off = ~torch.eye(g, dtype=torch.bool, device=terms.device)
    cross = pairs[off].mean(0) * s * (s - 1)
    var = (ss + cross) / (s * (s - 1))
    var = torch.maximum(var, ss / (s * (s - 1)))
    # Terms that agree to rounding mean every leave-one-out sketch already captured the
    # range: the estimate is exact and the (noisy) pair term is dropped.
    scale = terms.abs().amax(0)
    agree = terms.amax(0) - terms.amin(0) <= 1e3 * torch.finfo(terms.dtype).eps * scale
    return torch.where(agree, 0.0, var).sqrt(), float(s - 1)
