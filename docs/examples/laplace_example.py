"""The numbers in docs/laplace.md: hesse as laplace-torch's curvature backend.

Run: python docs/examples/laplace_example.py   (a few seconds on a CPU)
"""

import time
import warnings

import torch
from torch import nn

import hesse.testing

hesse.testing.torchvision_cpu_shim()  # only needed where torchvision does not match torch
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackGGN  # noqa: E402

from hesse.cli._default_model import digits_mlp  # noqa: E402
from hesse.integrations.laplace import HesseGGN, HesseHessian  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook")
torch.manual_seed(0)
F64 = torch.float64

# -- regression: a noisy sine, a 1-32-1 tanh MLP ---------------------------------------
X = torch.rand(120, 1, dtype=F64) * 8 - 4
y = torch.sin(X) + 0.1 * torch.randn_like(X)
model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).to(F64)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(2000):
    opt.zero_grad()
    nn.functional.mse_loss(model(X), y).backward()
    opt.step()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=40)
grid = torch.tensor([[-6.0], [-2.0], [0.0], [2.0], [6.0]], dtype=F64)

print(
    "regression (1-32-1 MLP, 120 points, sigma 0.1): structure, backend, log marglik, "
    "predictive std of f at x = -6, -2, 0, 2, 6"
)
for structure in ("full", "kron", "diag"):
    for backend in (HesseGGN, BackPackGGN):
        la = Laplace(
            model, "regression", hessian_structure=structure, backend=backend, sigma_noise=0.1
        )
        la.fit(loader)
        la.optimize_prior_precision(method="marglik", pred_type="glm", n_steps=100)
        mean, var = la(grid, pred_type="glm")
        std = var.squeeze().sqrt()  # the epistemic part: grows away from the data in [-4, 4]
        print(
            f"  {structure:5s} {backend.__name__:12s} "
            f"{float(la.log_marginal_likelihood()):10.4f}  "
            + " ".join(f"{float(s):.3f}" for s in std)
        )

# -- classification: the digits MLP -----------------------------------------------------
model, loss_fn, data = digits_mlp()
Xd = torch.cat([b[0] for b in data])
yd = torch.cat([b[1] for b in data])
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xd, yd), batch_size=256)
print(
    "\nclassification (digits MLP 64-32-10, 1797 images): structure, backend, fit CPU s, log marglik, "
    "mean max prob"
)
for subset, structure in (("all", "diag"), ("all", "kron"), ("last_layer", "full")):
    for backend in (HesseGGN, BackPackGGN):
        la = Laplace(
            model,
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
            backend=backend,
            prior_precision=1.0,
        )
        start = time.process_time()
        la.fit(loader)
        seconds = time.process_time() - start
        probs = la(Xd[:200], pred_type="glm", link_approx="probit")
        print(
            f"  {subset:10s} {structure:4s} {backend.__name__:12s} {seconds:6.2f} "
            f"{float(la.log_marginal_likelihood()):12.4f} {float(probs.max(-1).values.mean()):.4f}"
        )

# The exact Hessian diagonal (no other backend has it) next to the GGN's.
la_h = Laplace(
    model, "classification", subset_of_weights="all", hessian_structure="diag", backend=HesseHessian
)
la_h.fit(loader)
la_g = Laplace(
    model, "classification", subset_of_weights="all", hessian_structure="diag", backend=HesseGGN
)
la_g.fit(loader)
H, G = la_h.H, la_g.H
print(
    f"\nexact Hessian diagonal vs GGN diagonal: relative difference "
    f"{float((H - G).norm() / G.norm()):.3f}, negative Hessian entries {int((H < 0).sum())} of {H.numel()}"
)
