"""The numbers in docs/influence.md: influence vs leave-one-out retraining on a convex problem.

L2-regularised logistic regression on two digit classes (3 vs 8) of scikit-learn's
bundled digits. Run: python docs/examples/influence_example.py   (under a minute)
"""

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import hesse

F64 = torch.float64
LAM = 1e-2  # the L2 term LAM/2 ||theta||^2 of the objective: its Hessian is LAM I = damping

digits = load_digits()
keep = (digits.target == 3) | (digits.target == 8)
X = torch.tensor(digits.data[keep], dtype=F64) / 16.0
y = torch.tensor(digits.target[keep] == 8, dtype=F64)
perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
X, y = X[perm], y[perm]
Xtr, ytr, Xte, yte = X[:300], y[:300], X[300:350], y[300:350]
N, D = Xtr.shape
A = torch.cat([Xtr, torch.ones(N, 1, dtype=F64)], dim=1)


def train(weights: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    """argmin (1/N) sum_i w_i bce_i + LAM/2 ||theta||^2 (Newton's method, to rounding)."""
    theta = torch.zeros(D + 1, dtype=F64) if theta is None else theta.clone()
    for _ in range(100):
        p = torch.sigmoid(A @ theta)
        grad = A.T @ (weights * (p - ytr)) / N + LAM * theta
        hess = (A.T * (weights * p * (1 - p))) @ A / N + LAM * torch.eye(D + 1, dtype=F64)
        step = torch.linalg.solve(hess, grad)
        theta -= step
        if float(step.norm()) < 1e-14:
            break
    return theta


def test_losses(theta: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(
        Xte @ theta[:D] + theta[D], yte, reduction="none"
    )


theta = train(torch.ones(N, dtype=F64))
model = nn.Linear(D, 1).to(F64)
with torch.no_grad():
    model.weight.copy_(theta[:D])
    model.bias.copy_(theta[D])
loss_fn = nn.BCEWithLogitsLoss()
train_data, test_data = (Xtr, ytr[:, None]), (Xte, yte[:, None])

# -- influence by three methods -----------------------------------------------------------
C = hesse.GGNOperator(model, loss_fn, [train_data])
top = float(hesse.eigsh(C, 1).eigenvalues[0]) + LAM
scale = top  # LiSSA needs scale > lambda_max / 2; its error contracts by 1 - LAM / scale per step
print(
    f"lambda_max(C + LAM I) = {top:.3f}, lambda_min >= LAM = {LAM}: LiSSA's truncation after "
    f"300 steps leaves up to (1 - LAM/scale)^301 = {(1 - LAM / scale) ** 301:.2f} of the solution"
)
rows = []
for method, options in (
    ("exact", {}),
    ("cg", {"rtol": 1e-10}),
    (
        "lissa",
        {
            "batch_size": 50,
            "scale": scale,
            "depth": 300,
            "repeats": 8,
            "rtol": 0.5,
            "generator": torch.Generator().manual_seed(0),
        },
    ),
):
    start = time.process_time()
    scores, info = hesse.influence(
        model,
        loss_fn,
        train_data,
        test_data,
        method=method,
        damping=LAM,
        return_info=True,
        **options,
    )
    rows.append((method, scores, info, time.process_time() - start))
exact = rows[0][1]
print("method  CPU s  products  max |I - I_exact| / max |I_exact|  (lissa: mean stderr / max |I|)")
for method, scores, info, seconds in rows:
    err = float((scores - exact).abs().max() / exact.abs().max())
    extra = "" if info.stderr is None else f"  {float(info.stderr.mean() / exact.abs().max()):.2e}"
    print(
        f"{method:6s} {seconds:6.2f} {info.num_matvecs + info.dense_matvecs:9d}  {err:.2e}{extra}"
    )

# -- against leave-one-out retraining -------------------------------------------------------
removed = 100
start = time.process_time()
actual = torch.empty(removed, len(Xte), dtype=F64)
for i in range(removed):
    w = torch.ones(N, dtype=F64)
    w[i] = 0.0  # Koh & Liang's eps = -1/N: the others keep their 1/N weight
    actual[i] = test_losses(train(w, theta)) - test_losses(theta)
loo_seconds = time.process_time() - start
predicted = -exact[:removed] / N
r = [
    float(torch.corrcoef(torch.stack([actual[:, j], predicted[:, j]]))[0, 1])
    for j in range(len(Xte))
]
rs = torch.tensor(r)
print(
    f"\nleave-one-out for {removed} training points x {len(Xte)} test points "
    f"({loo_seconds:.1f} CPU s of Newton retraining):"
)
print(f"  Pearson r per test point: min {float(rs.min()):.4f}, median {float(rs.median()):.4f}")
print(
    f"  pooled r {float(torch.corrcoef(torch.stack([actual.flatten(), predicted.flatten()]))[0, 1]):.4f}, "
    f"largest |actual change| {float(actual.abs().max()):.2e}"
)

# -- self-influence finds flipped labels ----------------------------------------------------
flipped = torch.arange(0, 300, 20)  # 15 labels flipped
ybad = ytr.clone()
ybad[flipped] = 1 - ybad[flipped]
Atmp, ytmp = A, ytr
ytr = ybad
theta_bad = train(torch.ones(N, dtype=F64))
with torch.no_grad():
    model.weight.copy_(theta_bad[:D])
    model.bias.copy_(theta_bad[D])
selfinf = hesse.self_influence(model, loss_fn, (Xtr, ybad[:, None]), method="exact", damping=LAM)
top = torch.argsort(selfinf)[:30]  # most negative I[i, i]: the hardest points to fit
found = len(set(top.tolist()) & set(flipped.tolist()))
print(
    f"\nself-influence: {found} of the 15 flipped labels among the 30 most self-influential "
    f"points (random choice: 1.5 expected)"
)
