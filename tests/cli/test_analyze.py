"""``hesse analyze``: run as a command; its numbers equal the library's with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import hesse
from hesse.cli import main
from hesse.cli._default_model import digits_mlp

PLOTS = (
    "spectral_density.png",
    "diagonal_histogram.png",
    "layers.png",
    "eigenvalue_convergence.png",
)
SEED = 3


def _hesse(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from hesse.cli import main; raise SystemExit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # bitwise-equal float sums
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


@pytest.fixture(scope="module")
def default_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("default") / "report"
    proc = _hesse("analyze", "--quick", "--seed", str(SEED), "--out", str(out), cwd=out.parent)
    return proc, out


def _check_files(out: Path) -> dict:
    for name in ("report.json", "report.html", *PLOTS):
        assert (out / name).is_file(), name
    for name in PLOTS:
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)  # self-contained
    return json.loads((out / "report.json").read_text())


def test_default_run_writes_every_file_and_a_summary(default_run):
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr
    report = _check_files(out)
    assert "Hessian top 3 eigenvalues" in proc.stdout and "report.html" in proc.stdout
    assert "hesse analyze" in proc.stderr and "8/8" in proc.stderr  # the progress bar ran
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
    assert report["spectral_density"]["density"] == approx(sd.density.tolist())
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
