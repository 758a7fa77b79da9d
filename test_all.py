"""The test suite: `make test` (or `.venv/bin/python -m pytest -q test_all.py`).

Values are checked against tracr's own forward pass, RASP's own evaluation and analytic results.
Compiled programs are cached per process (tracr_load caches compiles), so the suite stays within
a few minutes on 2 CPU cores. Each file's tests live in their own section below.
"""

import pytest
import torch

import model as model_lib
import tracr_load as tl

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tmp_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


# ==============================================================================================
# model.py and tracr_load.py


# ==============================================================================================
# train.py


# ==============================================================================================
# compress.py


# ==============================================================================================
# regularize.py


# ==============================================================================================
# plot.py


# ==============================================================================================
# llc.py

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import llc  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(request):
    """The llc tests use tiny models, for which a second thread only adds overhead."""
    if "llc" not in request.node.name:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _half_sq(model, batch):
    """Gaussian negative log-likelihood per sample (noise s.d. 1), up to a constant."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def _linear_net(widths, rank, n, seed):
    """A bias-free linear network whose teacher has `rank` nonzero singular directions, placed
    on the same axes in every layer (the most singular factorisation), and data from it."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(*[torch.nn.Linear(a, b, bias=False)
                                for a, b in zip(widths[:-1], widths[1:])])
    with torch.no_grad():
        for layer in net:
            layer.weight.zero_()
            for k in range(rank):
                layer.weight[k, k] = 1.0 + 0.5 * k
    x = torch.randn(n, widths[0], generator=g)
    y = net(x).detach() + torch.randn(n, widths[-1], generator=g)
    return net, (x, y)


def test_llc_regular_linear_regression_matches_closed_form():
    # w0 at the least-squares minimum: the local posterior is Gaussian with precision
    # n*beta*H + gamma, so the exact value at finite n*beta is
    # (1/2) sum_i n*beta*h_i / (n*beta*h_i + gamma).
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, gamma = 500, 3, 3, 50.0
    x = torch.randn(n, d_in, generator=g)
    y = x @ torch.randn(d_in, d_out, generator=g) + torch.randn(n, d_out, generator=g)
    net = torch.nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    h = torch.linalg.eigvalsh(x.T @ x / n).repeat(d_out)  # Hessian eigenvalues, one per weight
    nbeta = n / math.log(n)
    exact = 0.5 * float((nbeta * h / (nbeta * h + gamma)).sum())
    r = llc.estimate_llc(net, _half_sq, (x, y), eps=3e-4, gamma=gamma, chains=4, draws=1000,
                         burnin=300, batch_size=n, seed=0)
    assert abs(r["mean"] - exact) < 0.1 * exact, (r["mean"], exact)
    assert r["nbeta"] == pytest.approx(nbeta)
    assert r["traces"].shape == (4, 1300) and r["warnings"] == []
    assert ACCEPT_OK(r["acceptance"])


def ACCEPT_OK(a):
    return llc.ACCEPT_LOW <= a <= llc.ACCEPT_HIGH


@pytest.mark.parametrize("rank,expected", [(0, 6.5), (1, 8.0)])
def test_llc_reduced_rank_regression_aoyagi_watanabe(rank, expected):
    # Input 5, hidden 3, output 5 (Aoyagi and Watanabe 2005): rank 0 -> 6.5, rank 1 -> 8.0.
    net, data = _linear_net((5, 3, 5), rank, 5000, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = llc.estimate_llc(net, _half_sq, data, eps=5e-4, gamma=5.0, chains=4, draws=1000,
                             burnin=400, batch_size=500, seed=0)
    assert abs(r["mean"] - expected) < 0.2 * expected, (r["mean"], expected)


def test_llc_repeats_with_one_seed_and_vectorised_chains_agree():
    net, data = _linear_net((5, 3, 5), 1, 1000, seed=1)
    kw = dict(eps=5e-4, gamma=5.0, chains=3, draws=60, burnin=20, batch_size=100)
    w0 = [p.detach().clone() for p in net.parameters()]
    a = llc.estimate_llc(net, _half_sq, data, seed=3, **kw)
    b = llc.estimate_llc(net, _half_sq, data, seed=3, **kw)
    v = llc.estimate_llc(net, _half_sq, data, seed=3, vectorize=True, **kw)
    c = llc.estimate_llc(net, _half_sq, data, seed=4, **kw)
    assert a["per_chain"] == b["per_chain"]  # bit for bit
    assert torch.allclose(a["traces"], v["traces"], rtol=1e-4, atol=1e-5)
    assert a["mean"] == pytest.approx(v["mean"], rel=1e-3)
    assert a["per_chain"] != c["per_chain"]
    assert len(set(a["per_chain"])) == 3  # chains are independent
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), w0))  # model left at w0


def test_llc_divergence_names_chain_and_step():
    net, data = _linear_net((5, 3, 5), 1, 1000, seed=1)
    with pytest.raises(llc.LLCDiverged, match=r"chain \d+ diverged at step \d+.*smaller eps"):
        llc.estimate_llc(net, _half_sq, data, eps=1.0, gamma=5.0, chains=2, draws=100,
                         burnin=0, batch_size=100)


def test_llc_warns_when_w0_is_not_a_minimum():
    net, data = _linear_net((5, 3, 5), 1, 1000, seed=1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)  # far from the teacher: the chains slide downhill below L(w0)
    with pytest.warns(UserWarning, match="below L\\(w0\\)"):
        r = llc.estimate_llc(net, _half_sq, data, eps=5e-4, gamma=5.0, chains=2, draws=200,
                             burnin=50, batch_size=100)
    assert r["mean"] < 0


@pytest.mark.parametrize("bad", [dict(eps=0.0), dict(eps=-1.0), dict(chains=0),
                                 dict(burnin=-1), dict(nbeta=-2.0)])
def test_llc_rejects_bad_settings(bad):
    net, data = _linear_net((5, 3, 5), 1, 100, seed=1)
    kw = dict(eps=1e-4, gamma=1.0, chains=1, draws=5, burnin=0, batch_size=10)
    kw.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        llc.estimate_llc(net, _half_sq, data, **kw)


def test_llc_cli_on_a_compiled_run(tmp_runs):
    model, task = tl.load_program("reverse")
    path = str(tmp_runs / "reverse_llc.pt")
    model_lib.save(path, model, task, "tracr")
    fig = str(tmp_runs / "llc.png")
    cmd = [sys.executable, "llc.py", path, "--chains", "2", "--draws", "20", "--burnin", "10",
           "--eps", "1e-6", "--figure", fig]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "W_U scale" in out.stdout and "|grad| at w0" in out.stdout and "tracr" in out.stdout
    _, _, meta = model_lib.load(path)
    r = meta["llc"]
    assert r["traces"].shape == (2, 30) and r["unembed"]["mode"] == "scale"
    assert r["unembed"]["scale"] > 1  # a compiled model's logits need scaling up
    assert math.isfinite(r["mean"]) and 0 <= r["acceptance"] <= 1
    import os
    assert os.path.getsize(fig) > 0
    again = subprocess.run(cmd, capture_output=True, text=True)  # the figure exists: refused
    assert again.returncode == 1 and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_llc_cli_bad_input_is_one_line():
    out = subprocess.run([sys.executable, "llc.py", "runs/no_such_run.pt"], capture_output=True,
                         text=True)
    assert out.returncode == 1 and "does not exist" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ==============================================================================================
# explain.py
