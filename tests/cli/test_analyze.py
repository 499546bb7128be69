"""``hesse analyze``: run as a command; its numbers equal the library's with the same seed."""

from __future__ import annotations

import json
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image

import hesse
from hesse.cli import main
from hesse.cli._default_model import digits_mlp
from hesse.cli._figures import DPI, PDF, WIDTH, figures
from tests.cli.conftest import SEED
from tests.cli.conftest import hesse_command as _hesse

STEMS = tuple(figures())


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _check_files(out: Path) -> dict:
    """Every file is there and well formed: PNG at print resolution, SVG XML, PDF."""
    for name in ("report.json", "report.html", "layers.csv", PDF):
        assert (out / name).is_file(), name
    pdf = (out / PDF).read_bytes()
    assert pdf[:5] == b"%PDF-"
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf)) == len(STEMS)  # one page per figure
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # TrueType embedded, no Type 3 fonts
    for stem in STEMS:
        with Image.open(out / f"{stem}.png") as img:
            assert img.format == "PNG"
            assert img.size[0] == round(WIDTH * DPI) and DPI >= 200
            assert img.info["dpi"][0] == pytest.approx(DPI, abs=0.5)
            img.verify()
        root = ET.parse(out / f"{stem}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert float(root.get("width").removesuffix("pt")) == pytest.approx(WIDTH * 72)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(STEMS)  # self-contained
    for stem in STEMS:
        assert f'href="{stem}.svg"' in page and f'href="{stem}.png"' in page
    assert page.count(f'href="{PDF}#page=') == len(STEMS)
    return json.loads((out / "report.json").read_text())


def test_default_run_writes_every_file_and_a_summary(default_run):
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr
    report = _check_files(out)
    assert "Hessian top 3 eigenvalues" in proc.stdout and "report.html" in proc.stdout
    # stderr is a pipe: one plain line per step, no bars, no escape codes (NOTE [analyze progress])
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("hesse analyze: [")]
    assert len(steps) == 11 and steps[-1].startswith("hesse analyze: [11/11] write report")
    assert report["settings"]["seed"] == SEED and report["settings"]["eig_matvecs"] == 60
    assert report["model"]["num_parameters"] == 2410


def test_default_report_equals_the_library_called_directly(default_run):
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    s = report["settings"]
    model, loss_fn, data = digits_mlp(seed=SEED, quick=True)
    H = hesse.HessianOperator(model, loss_fn, data)
    G = hesse.GGNOperator(model, loss_fn, data)
    approx = lambda x: pytest.approx(x, rel=1e-8, abs=1e-12)  # noqa: E731

    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        assert report["loss"] == approx(float(loss_fn(model(X), y)))
    eig = hesse.eigsh(H, 3, which="LA", max_matvecs=s["eig_matvecs"], generator=gen())
    assert report["hessian_eigenvalues"]["eigenvalues"] == approx(eig.eigenvalues.tolist())
    assert report["hessian_eigenvalues"]["history"][-1]["num_matvecs"] == eig.num_matvecs
    geig = hesse.eigsh(G, 3, which="LA", max_matvecs=s["eig_matvecs"], generator=gen())
    assert report["ggn_eigenvalues"]["eigenvalues"] == approx(geig.eigenvalues.tolist())
    tr = hesse.trace(H, method="hutch++", num_matvecs=s["trace_matvecs"], generator=gen())
    assert report["trace"]["value"] == approx(float(tr.value))
    assert report["trace"]["ci95"] == approx([float(v) for v in tr.interval(0.95)])
    sd = hesse.spectral_density(
        H, num_probes=s["density_probes"], lanczos_steps=s["lanczos_steps"], generator=gen()
    )
    # NOTE [density support]: the library's curve on [min Ritz, max Ritz], renormalised there
    inside = (sd.grid >= sd.nodes.min()) & (sd.grid <= sd.nodes.max())
    grid, density = sd.grid[inside], sd.density[inside]
    kept = torch.trapezoid(density, grid)
    rep = report["spectral_density"]
    assert rep["grid"] == approx(grid.tolist())
    assert rep["density"] == approx((density / kept).tolist())
    assert rep["mass_cut"] == approx(1 - float(kept)) and 0 < rep["mass_cut"] < 0.2
    assert rep["support"] == approx([float(sd.nodes.min()), float(sd.nodes.max())])
    assert rep["sigma"] == approx(sd.sigma)
    last = report["layers"][-1]
    assert last["parameters"] == ["2.weight", "2.bias"]
    Hl = hesse.HessianOperator(model, loss_fn, data, params=last["parameters"])
    ltr = hesse.trace(Hl, method="hutch++", num_matvecs=s["layer_matvecs"], generator=gen())
    assert last["trace"]["value"] == approx(float(ltr.value))
    ltop = hesse.eigsh(Hl, 1, which="LA", max_matvecs=s["eig_matvecs"], generator=gen())
    assert last["top_eigenvalue"] == approx(float(ltop.eigenvalues[0]))
    hd = hesse.diagonal(H, method="hutchinson", num_matvecs=s["diag_matvecs"], generator=gen())
    assert report["diagonal"]["hessian_hutchinson"]["values"] == approx(hd.value.tolist())
    gd = hesse.diagonal(G, method="exact")
    assert report["diagonal"]["ggn_exact"]["values"] == approx(gd.tolist())
    gap = report["ggn_hessian_gap"]
    assert gap["trace_ggn"] == approx(float(gd.sum()))
    assert gap["trace_difference"] == approx(float(tr.value) - float(gd.sum()))
    assert gap["top_eigenvalue_ggn"] == approx(float(geig.eigenvalues[0]))
    # layer names and types from named_modules
    assert [(lay["layer"], lay["type"]) for lay in report["layers"]] == [
        ("0", "Linear"),
        ("2", "Linear"),
    ]
    # the layers partition the parameters
    assert sum(layer["num_parameters"] for layer in report["layers"]) == H.shape[0]


FACTORY = """
import torch
from torch import nn


def mse(output, target):  # a plain callable: Hessian yes, GGN has no closed form
    return ((output - target) ** 2).mean()


def factory():
    torch.manual_seed(0)  # nn.Linear initialises from the global RNG
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(2)]
    return model, mse, data


def raises():
    raise RuntimeError("boom in the factory")


def two():
    model, loss, data = factory()
    return model, loss


def once():
    model, loss, data = factory()
    return model, loss, iter(data)


def frozen():
    model, loss, data = factory()
    model.requires_grad_(False)
    return model, loss, data


def classifier(inputs=4, classes=3, labels=3, targets=None):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, classes))
    X = torch.randn(8, inputs, generator=g)
    y = torch.arange(8) % labels if targets is None else targets
    return model, nn.CrossEntropyLoss(), [(X, y)]


def wrong_width():
    return classifier(inputs=5)


def labels_out_of_range():
    return classifier(labels=8)


def negative_labels():
    return classifier(targets=torch.arange(8) - 1)


def mse_broadcast():
    model, _, data = factory()
    return model[:2].append(nn.Linear(6, 1)), nn.MSELoss(), [(x, y[:, 0]) for x, y in data]


def fewer_targets():
    model, loss, ((X, y),) = classifier()
    return model, loss, [(X, y[:5])]


def not_pairs():
    model, loss, ((X, y),) = classifier()
    return model, loss, [(X, y, y)]


def no_batches():
    model, loss, _ = classifier()
    return model, loss, []


def nan_data():
    model, loss, ((X, y),) = classifier()
    return model, loss, [(X * float("nan"), y)]


def wrapped(forward):
    model, loss, data = classifier()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return forward(self.inner, x)

    return Wrapped(), loss, data


def dict_output():
    return wrapped(lambda inner, x: {"logits": inner(x)})


def loud():
    import warnings

    def forward(inner, x):
        warnings.warn("loud model: this warning is raised on every forward pass")
        return inner(x)

    return wrapped(forward)
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(FACTORY))
    return path


def test_user_factory_run(user_file, tmp_path):
    out = tmp_path / "rep"
    proc = _hesse(
        "analyze", "--model", f"{user_file}:factory", "--dtype", "float64", "--num-eigenvalues", "2",
        "--eig-matvecs", "40", "--trace-matvecs", "12", "--diag-matvecs", "6", "--density-probes", "2",
        "--lanczos-steps", "10", "--layer-matvecs", "10", "--seed", str(SEED), "--out", str(out),
        "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = _check_files(out)
    assert report["ggn_eigenvalues"]["available"] is False  # a plain callable loss
    spec = {}
    exec(compile(textwrap.dedent(FACTORY), "factory", "exec"), spec)  # noqa: S102
    model, loss_fn, data = spec["factory"]()
    model = model.double()
    data = [(x.double(), y.double()) for x, y in data]
    H = hesse.HessianOperator(model, loss_fn, data)
    dense = H.to_dense()
    eig = hesse.eigsh(H, 2, which="LA", max_matvecs=40, generator=gen())
    assert report["hessian_eigenvalues"]["eigenvalues"] == pytest.approx(
        eig.eigenvalues.tolist(), rel=1e-10
    )
    # and against an independent dense reference
    top = torch.linalg.eigvalsh(dense).flip(0)[:2]
    assert report["hessian_eigenvalues"]["eigenvalues"] == pytest.approx(top.tolist(), rel=1e-5)
    # layer "0" has 30 parameters > 10: Hutch++; layer "2" has 14 > 10 as well
    assert [layer["trace"]["method"] for layer in report["layers"]] == ["hutch++", "hutch++"]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (
            lambda f: ["--model", "does/not/exist.py:factory"],
            "file 'does/not/exist.py' does not exist",
        ),
        (lambda f: ["--model", f"{f}:raises"], "raises() raised RuntimeError: boom in the factory"),
        (
            lambda f: ["--model", f"{f}:two"],
            "two() must return (model, loss_fn, data), got a 2-tuple",
        ),
        (lambda f: ["--model", f"{f}:frozen"], "the model has no trainable parameters"),
        (lambda f: ["--model", f"{f}:nothing"], "has no callable 'nothing'"),
        (lambda f: ["--model", f"{f}:once"], "data is a one-shot iterator"),
        (lambda f: ["--device", "no-such-device"], "--device 'no-such-device' is not usable here"),
        (lambda f: ["--model", str(f)], "expects path/to/file.py:factory"),
        (lambda f: ["--trace-matvecs", "0"], "--trace-matvecs must be a positive integer, got 0"),
        (lambda f: ["--eig-matvecs", "-3"], "--eig-matvecs must be a positive integer, got -3"),
        # budgets below what the method needs: the flag, the minimum and why (NOTE [analyze errors])
        (
            lambda f: ["--eig-matvecs", "2"],
            "--eig-matvecs must be at least 5, got 2: Lanczos needs at least one product per "
            "eigenvalue (--num-eigenvalues 5). Pass --eig-matvecs 5 or more.",
        ),
        (
            lambda f: ["--quick", "--num-eigenvalues", "100"],
            "--eig-matvecs must be at least 100, got 60",
        ),
        (lambda f: ["--trace-matvecs", "3"], "--trace-matvecs must be at least 4, got 3: Hutch++"),
        (lambda f: ["--layer-matvecs", "1"], "--layer-matvecs must be at least 4, got 1"),
        (lambda f: ["--diag-matvecs", "1"], "--diag-matvecs must be at least 2, got 1"),
        # model, data and loss checked against each other (hesse.cli._check)
        (
            lambda f: ["--model", f"{f}:wrong_width"],
            "the model cannot take the first batch's inputs (8, 5) float32: its first layer 0 "
            "(Linear) expects 4 input features, the inputs have 5. Make data yield inputs with 4 "
            "features or change that layer.",
        ),
        (
            lambda f: ["--model", f"{f}:labels_out_of_range"],
            "CrossEntropyLoss targets of the first batch range over [0, 7], but the model outputs "
            "3 classes (8, 3) float32: class labels must lie in [0, 2]. Give the last layer 8 "
            "outputs or remap the labels.",
        ),
        (lambda f: ["--model", f"{f}:negative_labels"], "range over [-1, 6]"),
        (
            lambda f: ["--model", f"{f}:mse_broadcast"],
            "MSELoss needs targets shaped like the output (8, 1) float32, got (8,) float32; torch "
            "would broadcast them and compute a different loss. Reshape the targets to the "
            "output's shape (e.g. y.reshape(8, 1)).",
        ),
        (
            lambda f: ["--model", f"{f}:fewer_targets"],
            "the first batch has 5 targets but the model returns 8 outputs",
        ),
        (
            lambda f: ["--model", f"{f}:not_pairs"],
            "expected each batch to be an (inputs, targets) pair",
        ),
        (lambda f: ["--model", f"{f}:no_batches"], "data yielded no batches"),
        (lambda f: ["--model", f"{f}:nan_data"], "the loss on the first batch is nan"),
        (lambda f: ["--model", f"{f}:dict_output"], "the model returns a dict, but the loss"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(user_file, tmp_path, capsys, make_args, message):
    code = main(["analyze", *make_args(user_file), "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"hesse analyze: {err.strip().split(': ', 1)[1]}"]
    assert message in err
    assert not (tmp_path / "x").exists()


def test_bad_input_in_a_subprocess_has_no_traceback_unless_debug(user_file, tmp_path):
    proc = _hesse("analyze", "--model", f"{user_file}:raises", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "hesse analyze: --model: raises() raised RuntimeError: boom in the factory"
    )
    proc = _hesse("analyze", "--model", f"{user_file}:raises", "--debug", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "boom in the factory" in proc.stderr
