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

import subprocess  # noqa: E402
import sys  # noqa: E402

import train as train_lib  # noqa: E402


def _tiny(task, seed=0, **kw):
    """A small model for fast tests (not the compiled shape: compiling costs seconds)."""
    cfg = model_lib.Config(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=16, d_vocab=1,
                           d_vocab_out=1, n_ctx=1)
    return train_lib.model_like(task, cfg, seed=seed, **kw)


@pytest.fixture(scope="module")
def count_task():
    return tl.Task.from_name("count", max_seq_len=4)  # 120 inputs; output: how many 'a's


def test_train_split_is_a_seeded_partition(count_task):
    tr, ho = train_lib.split(count_task, seed=3, holdout=0.2)
    assert len(ho) == round(0.2 * count_task.n_inputs()) and len(tr) + len(ho) == 120
    assert {tuple(s) for s in tr}.isdisjoint({tuple(s) for s in ho})
    assert sorted(map(tuple, tr + ho)) == sorted(map(tuple, count_task.all_inputs()))
    assert train_lib.split(count_task, seed=3) == (tr, ho)
    assert train_lib.split(count_task, seed=4)[1] != ho


def test_train_small_task_reaches_full_heldout_accuracy(count_task):
    # count at max_seq_len 4: 96 train / 24 held-out inputs; a 1-layer model finds it fast.
    tr, ho = train_lib.split(count_task, seed=0)
    model = _tiny(count_task)
    cfg = train_lib.TrainConfig(steps=1500, lr=1e-2, eval_every=25, warmup=20, seed=0)
    history = train_lib.train(model, count_task, tr, ho, cfg, progress=False)
    assert history[-1]["heldout_exact"] == 1.0 and history[-1]["step"] < 1500
    # evaluate agrees with decoding through the Task and comparing with RASP.
    tokens, mask = count_task.encode(ho)
    with torch.no_grad():
        decoded = count_task.decode(model(tokens, mask), mask)
    ok = count_task.correct(decoded, count_task.targets(ho))
    assert all(all(row) for row in ok)
    assert train_lib.evaluate(model, count_task, ho)["exact"] == 1.0


class _Fixed(torch.nn.Module):
    """Returns a fixed output tensor (a leaf), so the loss's gradient on it can be read."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, tokens, mask=None, cache=None):
        return self.out


@pytest.mark.parametrize("name", ["shift_by", "frac_prevs"])
def test_train_loss_ignores_bos_padding_and_none_positions(name):
    task = tl.Task.from_name(name)
    inputs = [task.vocab[:1], task.vocab[:3], (task.vocab * 3)[:5]]  # three lengths: padding
    data = train_lib.Data(task, inputs)
    tokens, mask, y, valid = data.batch(slice(None))
    assert not valid[:, 0].any() and not valid[~mask].any()
    if name == "shift_by":  # RASP gives None at the first position of each input
        assert not valid[:, 1].any() and valid.any()
    g = torch.Generator().manual_seed(0)
    out = torch.randn(len(inputs), tokens.shape[1], task.d_vocab_out, generator=g)
    fixed = _Fixed(out.clone())
    loss = train_lib.loss_fn(fixed, task, tokens, mask, y, valid)
    loss.backward()
    grad = fixed.out.grad
    assert (grad[~valid] == 0).all()  # nothing flows from BOS, padding or None positions
    assert (grad[valid].abs().sum(-1) > 0).all()
    # The same loss computed one valid position at a time, by hand.
    terms = []
    for b, t in valid.nonzero().tolist():
        if task.output_kind == "numerical":
            terms.append((out[b, t, 0] - y[b, t]) ** 2)
        else:
            terms.append(-out[b, t].log_softmax(-1)[y[b, t]])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    # Garbage targets at positions that are not valid change nothing.
    y2 = y.clone()
    y2[~valid] = 2 if task.output_kind == "categorical" else 1e6
    assert torch.equal(train_lib.loss_fn(fixed, task, tokens, mask, y2, valid), loss)


def _run(task, cfg, out=None, until=None, resume=None, model=None):
    tr, ho = train_lib.split(task, seed=cfg.seed)
    model = model if model is not None else _tiny(task, seed=cfg.seed)
    hist = train_lib.train(model, task, tr, ho, cfg, out=out, progress=False, until=until,
                           resume=resume)
    return model, hist


def test_train_same_seed_same_result_bit_for_bit(count_task):
    cfg = train_lib.TrainConfig(steps=120, eval_every=40, seed=5, early_stop=False)
    (m1, h1), (m2, h2) = _run(count_task, cfg), _run(count_task, cfg)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(h1) == strip(h2)
    m3, _ = _run(count_task, train_lib.TrainConfig(steps=120, seed=6, early_stop=False))
    assert not torch.equal(m1.W_E, m3.W_E)


def test_train_resumed_run_matches_uninterrupted(count_task, tmp_runs):
    cfg = train_lib.TrainConfig(steps=120, eval_every=30, seed=2, early_stop=False)
    full, h_full = _run(count_task, cfg)
    path = str(tmp_runs / "count_resume.pt")
    _run(count_task, cfg, out=path, until=60)
    model, _, meta = model_lib.load(path)
    assert meta["resume"]["step"] == 60
    resumed, h_res = _run(count_task, cfg, out=path, resume=meta["resume"], model=model)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in h_full] == [r["loss"] for r in h_res]


def test_train_divergence_stops_and_keeps_last_good_state(count_task, tmp_runs):
    calls = []

    def poison(model, cache, tokens, mask):  # NaN at the 50th step, after the eval at step 40
        calls.append(1)
        assert "blocks.0.attn.pattern" in cache
        return torch.tensor(float("nan")) if len(calls) == 50 else cache["embed"].sum() * 0
    path = str(tmp_runs / "count_nan.pt")
    cfg = train_lib.TrainConfig(steps=200, eval_every=20, seed=1, early_stop=False)
    reference, _ = _run(count_task, train_lib.TrainConfig(steps=200, eval_every=20, seed=1,
                                                          early_stop=False), until=40)
    tr, ho = train_lib.split(count_task, seed=1)
    model = _tiny(count_task, seed=1)
    with pytest.raises(train_lib.Diverged, match="step 49"):
        train_lib.train(model, count_task, tr, ho, cfg, extra_loss=poison, out=path,
                        progress=False)
    saved, _, meta = model_lib.load(path)
    assert meta["resume"]["step"] == 40 and len(meta["history"]) == 2
    for (k, a), b in zip(reference.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_train_cli_bad_input_one_line_exit_1(tmp_runs, capsys):
    existing = tmp_runs / "exists.pt"
    existing.write_bytes(b"x")
    for args in (["nosuch"], ["count", "--lr", "-1"], ["count", "--out", str(existing)],
                 ["count", "--normalization", "batchnorm"], ["count", "--steps", "0"]):
        try:
            code = train_lib.main(args)
        except SystemExit as e:  # argparse's own errors (bad choice) exit here
            code = e.code
        err = capsys.readouterr().err
        assert code == 1, args
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, args
    assert existing.read_bytes() == b"x"
    # One real process, for the exit status a shell sees.
    r = subprocess.run([sys.executable, "train.py", "count", "--batch-size", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ==============================================================================================
# compress.py

import compress  # noqa: E402


@pytest.fixture(scope="module")
def frac_prevs():
    return tl.load_program("frac_prevs")


@pytest.mark.parametrize("name", ["frac_prevs", "count"])
def test_compress_identity_reproduces_compiled_at_every_layer(name):
    compiled, task = tl.load_program(name)
    inputs = task.all_inputs()
    tokens, mask = task.encode(inputs)
    D = compiled.cfg.d_model
    small = compress.compressed_model(compiled, torch.eye(D))
    with torch.no_grad():
        out0, c0 = compiled.run_with_cache(tokens, mask)
        out1, c1 = small.run_with_cache(tokens, mask)
        f = compress.stream_forward(compiled, tokens, mask, torch.eye(D))
    names, ours = tl.our_residuals(c1, compiled.cfg.n_layers)
    _, theirs = tl.our_residuals(c0, compiled.cfg.n_layers)
    m = mask[..., None]
    for n, a, b, c in zip(names, ours, theirs, f["resid"]):
        assert torch.equal(a * m, b * m), n
        assert torch.equal(c * m, b * m), n
    assert torch.equal(out0[mask], out1[mask])
    y, valid = task.target_tensors(inputs, tokens.shape[1])
    assert compress.accuracy(task, out1, y, valid)[0] == 1.0


def test_compress_saved_model_equals_training_forward(frac_prevs):
    compiled, task = frac_prevs
    tokens, mask = task.encode(task.sample(64, seed=1))
    W = torch.randn(5, compiled.cfg.d_model, generator=torch.Generator().manual_seed(0)) / 5
    small = compress.compressed_model(compiled, W)
    assert small.cfg.d_model == 5
    with torch.no_grad():
        f = compress.stream_forward(compiled, tokens, mask, W)
        out, cache = small.run_with_cache(tokens, mask)
    assert torch.allclose(f["out"][mask], out[mask], atol=1e-5)
    assert torch.allclose(f["resid"][-1][mask], cache["blocks.1.resid_post"][mask], atol=1e-5)


def test_compress_short_projection_run_lowers_the_loss(frac_prevs):
    compiled, task = frac_prevs
    ref = compress.Reference(compiled, task, task.sample(200, seed=0))
    cfg = compress.CompressConfig(steps=40, batch_size=64)
    W, history = compress.fit_projection(compiled, task, ref, 5, cfg, progress=False)
    assert W.shape == (5, compiled.cfg.d_model)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_compress_relearn_runs_and_saves_a_small_model(frac_prevs, tmp_runs):
    compiled, task = frac_prevs
    ref = compress.Reference(compiled, task, task.sample(100, seed=0))
    cfg = compress.CompressConfig(method="relearn", steps=20, batch_size=50)
    small, W, meta = compress.compress_once(compiled, task, ref, 6, cfg, progress=False)
    assert small.cfg.d_model == 6 and meta["method"] == "relearn" and meta["d"] == 6
    assert len(meta["cosine"]) == len(meta["recon_error"]) == 1 + 2 * compiled.cfg.n_layers
    path = str(tmp_runs / "frac_prevs_compressed_d6.pt")
    model_lib.save(path, small, task, "compressed", **meta)
    loaded, _, m = model_lib.load(path)
    tokens, mask = ref.tokens, ref.mask
    with torch.no_grad():
        assert torch.equal(loaded(tokens, mask), small(tokens, mask))
    assert m["accuracy"] == meta["accuracy"]


def test_compress_accuracy_counts_one_wrong_position_as_wrong():
    for name, bad in (("count", 0), ("frac_prevs", None)):
        compiled, task = tl.load_program(name)
        inputs = [s for s in task.all_inputs() if len(s) == 3][:10]
        tokens, mask = task.encode(inputs)
        y, valid = task.target_tensors(inputs, tokens.shape[1])
        if task.output_kind == "categorical":
            out = torch.nn.functional.one_hot(y, task.d_vocab_out).float()  # [N, T, O]
            out[4, 2] = torch.roll(out[4, 2], 1)  # one position of one sequence wrong
        else:
            out = y[..., None].clone()
            out[:, :, 0] += 0.049  # inside the tolerance everywhere
            out[4, 2, 0] += 0.002  # just outside at one position
        exact, per_pos = compress.accuracy(task, out, y, valid)
        assert exact == pytest.approx(9 / 10)
        assert per_pos == pytest.approx(1 - 1 / int(valid.sum()))
        ok = task.correct(task.decode(out, mask), task.targets(inputs))
        assert sum(all(r) for r in ok) / len(ok) == pytest.approx(exact)


def test_compress_expanded_model_keeps_outputs(frac_prevs):
    compiled, task = frac_prevs
    small = train_lib.model_like(task, compiled.cfg, seed=0, d_model=4)
    Q = torch.linalg.qr(torch.randn(14, 4, generator=torch.Generator().manual_seed(0))).Q.T
    big = compress.expanded_model(small, Q.contiguous())
    tokens, mask = task.encode(task.sample(50, seed=2))
    with torch.no_grad():
        assert torch.allclose(small(tokens, mask)[mask], big(tokens, mask)[mask], atol=1e-5)


def test_compress_cli_bad_input_one_line_exit_1(tmp_runs):
    for args in (["frac_prevs", "--method", "squash", "--dims", "4"],
                 ["frac_prevs", "--dims", "4,x"], ["nope", "--dims", "4"]):
        p = subprocess.run([sys.executable, "compress.py", *args, "--out", str(tmp_runs)],
                           capture_output=True, text=True)
        assert p.returncode == 1, args
        assert len(p.stderr.strip().splitlines()) == 1 and "error" in p.stderr, p.stderr


# ==============================================================================================
# regularize.py


# ==============================================================================================
# plot.py


# ==============================================================================================
# llc.py


# ==============================================================================================
# explain.py
