"""The test suite: `make test` (or `.venv/bin/python -m pytest -q test_all.py`).

Values are checked against tracr's own forward pass, RASP's own evaluation and analytic results.
Compiled programs are cached per process (tracr_load caches compiles), so the suite stays within
a few minutes on 2 CPU cores. Each file's tests live in their own section below.
"""

import pytest
import torch

import model as model_lib
import tracr_load as tl

torch.set_num_threads(1)  # make test runs two pytest workers (-n 2) on 2 cores


@pytest.fixture(scope="session")
def tmp_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


# ==============================================================================================
# model.py and tracr_load.py

import subprocess  # noqa: E402
import sys  # noqa: E402

MODES = [(name, causal) for name in tl.PROGRAMS
         for causal in ((False, True) if tl.PROGRAMS[name].causal_ok else (False,))]
EXACT = 1e-5  # residual stream agreement with tracr, every stage, every real position


def inputs_for(task, n_sample=300):
    """Every input where the space is small, else a fixed sample that still covers every length."""
    if task.n_inputs() <= 2000:
        return task.all_inputs()
    return task.sample(n_sample, seed=0)


@pytest.mark.parametrize("name,causal", MODES, ids=[f"{n}-{'causal' if c else 'bidir'}"
                                                    for n, c in MODES])
def test_exact_against_tracr_and_rasp(name, causal):
    model, task = tl.load_program(name, causal=causal)
    assembled = tl.compile_program(name, causal=causal)
    inputs = inputs_for(task)
    # Mixed lengths in one right-padded batch on our side; tracr runs each length unpadded.
    errors, ours, theirs = tl.compare_with_tracr(model, assembled, task, inputs, jit=False)
    assert len(errors) == 1 + 2 * model.cfg.n_layers  # embeddings + every attention and MLP
    worst = max(errors, key=errors.get)
    assert errors[worst] < EXACT, f"{worst}: {errors[worst]:.2e}"
    targets = task.targets(inputs)
    # Where RASP gives None the output is undefined (both read float noise): compare the rest.
    defined = lambda out, tgt: [o for o, t in zip(out, tgt) if t is not None]  # noqa: E731
    assert all(tl.same_outputs(defined(a, t), defined(b, t))
               for a, b, t in zip(ours, theirs, targets))
    ok = task.correct(ours, targets)
    wrong = [inputs[i] for i, row in enumerate(ok) if not all(row)]
    assert not wrong, f"{len(wrong)} inputs wrong against RASP, e.g. {wrong[:3]}"
    # The inference path (all-zero heads, units and blocks left out) gives the same output.
    tokens, mask = task.encode(inputs)
    with torch.no_grad():
        full, _ = model.run_with_cache(tokens, mask)
        assert torch.allclose(model(tokens, mask), full, atol=1e-5, rtol=1e-5)


def test_inference_plan_follows_weight_changes():
    model, task = tl.load_program("reverse")
    tokens, mask = task.encode(task.sample(16, seed=0))
    with torch.no_grad():
        before = model(tokens, mask)
        dead = [i for i, (a, m) in enumerate(model._inference_plan()) if m is None]
        assert dead, "reverse has all-zero MLP blocks"
        model.blocks[dead[0]].mlp.b_out.add_(1.0)  # in place, as an optimizer step would
        after = model(tokens, mask)
        full, _ = model.run_with_cache(tokens, mask)
    assert not torch.allclose(before, after) and torch.allclose(after, full, atol=1e-5)


@pytest.mark.parametrize("name,causal", [("reverse", False), ("sort", False),
                                         ("frac_prevs", True), ("shuffle_dyck2", False)])
def test_padded_batch_equals_single_sequences(name, causal):
    model, task = tl.load_program(name, causal=causal)
    inputs = task.sample(24, seed=1) + [task.sample(1, seed=2)[0][:1]]
    tokens, mask = task.encode(inputs)
    assert (tokens == task.pad_id).any(), "the batch should be padded"
    with torch.no_grad():
        _, batch_cache = model.run_with_cache(tokens, mask)
        for b, seq in enumerate(inputs):
            t1, m1 = task.encode([seq])
            _, single = model.run_with_cache(t1, m1)
            n = len(seq) + 1
            for key, value in single.items():
                if key.endswith("pattern"):
                    got = batch_cache[key][b, :, :n, :n]
                    # No attention to padded keys from any real query.
                    assert (batch_cache[key][b, :, :n, n:] == 0).all()
                else:
                    got = batch_cache[key][b, :n]
                assert torch.allclose(got, value[0], atol=1e-5, rtol=1e-5), key


def test_padding_matters_without_the_mask():
    """Without the key mask, padding leaks into count_less_freq's selectors (tracr's behaviour)."""
    model, task = tl.load_program("count_less_freq")
    tokens, mask = task.encode([["b", "a", "b", "c"], ["a", "b", "c", "a", "a"]])
    with torch.no_grad():
        masked = task.decode(model(tokens, mask), mask)
        unmasked = task.decode(model(tokens, torch.ones_like(mask)), mask)
    assert masked[0] == task.targets([["b", "a", "b", "c"]])[0] == [4, 4, 4, 4]
    assert unmasked[0] == [5, 5, 5, 5]


def test_unembedding_reads_output_directions_by_label():
    model, task = tl.load_program("frac_prevs")
    labels = model.residual_labels
    col = model.W_U[:, 0]
    assert col.sum().item() == 1.0 and labels[int(col.argmax())] == task.program.label
    model, task = tl.load_program("sort")
    labels = model.residual_labels
    name = task.program.label  # "sort_<id>": tracr makes labels unique
    assert not labels[0].startswith(name)  # the output is not first: it is found by label
    for j, v in enumerate(task.output_vocab):
        assert model.W_U[:, j].sum().item() == 1.0
        assert labels[int(model.W_U[:, j].argmax())] == f"{name}:{v}"


def test_known_miscompilation_is_reported_not_hidden(capsys):
    from tracr.rasp import rasp
    # A numerical map with negative outputs: tracr's MLP clips them to 0.
    program = rasp.numerical(rasp.Map(lambda x: x - 2, rasp.tokens))
    model, task = tl.load_rasp(program, {1, 2, 3}, 3)
    assembled = tl.compile_rasp(program, {1, 2, 3}, 3)
    n_wrong = tl.check("minus_two", model, assembled, task)
    out = capsys.readouterr().out
    assert n_wrong > 0 and f"wrong against RASP: {n_wrong} of" in out
    # Every input with a 1 in it is wrong (1 - 2 = -1 is clipped), and only those.
    assert n_wrong == sum(1 for s in task.all_inputs() if 1 in s)


def test_load_rasp_user_program_exact():
    """A program written here, not in tracr's library: how many tokens are smaller than mine,
    plus one, as a numerical-free categorical chain (Select, SelectorWidth, Map)."""
    from tracr.rasp import rasp
    smaller = rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.LT).named("smaller")
    rank = rasp.Map(lambda n: n + 1, rasp.SelectorWidth(smaller).named("n_smaller")).named("rank")
    model, task = tl.load_rasp(rank, {0, 1, 2}, 4)
    assembled = tl.compile_rasp(rank, {0, 1, 2}, 4)
    inputs = task.all_inputs()
    errors, ours, theirs = tl.compare_with_tracr(model, assembled, task, inputs, jit=False)
    assert max(errors.values()) < EXACT
    assert ours == theirs == task.targets(inputs)
    assert task.targets([[2, 0, 1, 2]]) == [[3, 1, 2, 3]]


def test_task_targets_and_masks():
    task = tl.Task.from_name("shift_by")
    assert task.targets([["a", "b", "c"]]) == [[None, "a", "b"]]
    y, valid = task.target_tensors([["a", "b", "c"], ["c"]])
    assert valid.tolist() == [[False, False, True, True], [False, False, False, False]]
    causal = tl.Task.from_name("length", causal=True)
    assert causal.targets([["a", "b", "c"]]) == [[1, 2, 3]]
    su = tl.Task.from_name("sort_unique")
    assert len(su.all_inputs()) == su.n_inputs() == 325
    assert all(len(set(s)) == len(s) for s in su.sample(50, seed=0))
    assert tl.Task.from_name("reverse").n_inputs() == 363


def test_save_load_roundtrip(tmp_runs):
    model, task = tl.load_program("sort")
    path = str(tmp_runs / "sort_tracr.pt")
    model_lib.save(path, model, task, "tracr", residual_labels=model.residual_labels, note="x")
    raw = torch.load(path, weights_only=True)  # a plain dict: no pickled objects
    assert raw["kind"] == "tracr"
    loaded, task2, meta = model_lib.load(path)
    assert meta["note"] == "x" and meta["kind"] == "tracr"
    assert task2.vocab == task.vocab and task2.output_vocab == task.output_vocab
    inputs = task.all_inputs()[:200]
    tokens, mask = task.encode(inputs)
    with torch.no_grad():
        assert torch.equal(model(tokens, mask), loaded(tokens, mask))
    assert task2.targets(inputs) == task.targets(inputs)
    model_lib.update_meta(path, extra=[1, 2])
    assert model_lib.load(path)[2]["extra"] == [1, 2]


def run_cli(*args):
    return subprocess.run([sys.executable, "tracr_load.py", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_input_and_check():
    r = run_cli("sort", "--input", "3 1 2")
    assert r.returncode == 0 and r.stdout.strip() == "1 2 3"
    r = run_cli("length", "--max-seq-len", "12", "--check")
    assert r.returncode == 1, r.stdout  # tracr's known miscount of long inputs, reported
    assert "wrong against RASP: 0 of" not in r.stdout and "wrong against RASP:" in r.stdout


@pytest.mark.parametrize("args,expect", [
    (["nosuchprogram", "--input", "a"], "known programs: length"),
    (["reverse", "--input", "a z"], "'z' is not in the vocab"),
    (["reverse", "--input", "a a a a a a"], "longer than max_seq_len=5"),
    (["reverse", "--input", ""], "empty input"),
    (["sort_unique", "--input", "1 1"], "needs distinct tokens"),
    (["reverse", "--max-seq-len", "0"], "max_seq_len=0"),
    (["sort", "--causal"], "no causal form"),
])
def test_cli_bad_input(args, expect, tmp_runs):
    out = tmp_runs / "never.pt"
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("content", [None, b"", b"not a torch file", "truncated", "other"])
def test_load_bad_run_files(content, tmp_runs):
    path = tmp_runs / f"bad_{content!s:.8}.pt"
    if content == "truncated":
        model, task = tl.load_program("hist")
        model_lib.save(str(path), model, task, "tracr")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "other":
        torch.save({"weights": torch.zeros(3)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="run file"):
        model_lib.load(str(path))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="act_fn"):
        model_lib.Config(4, 1, 1, 2, 4, 5, 3, 6, act_fn="tanh")
    with pytest.raises(ValueError, match="d_model"):
        model_lib.Config(0, 1, 1, 2, 4, 5, 3, 6)


# ==============================================================================================
# train.py

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
    assert abs(len(ho) - 0.2 * count_task.n_inputs()) < 4 and len(tr) + len(ho) == 120
    assert {tuple(s) for s in tr}.isdisjoint({tuple(s) for s in ho})
    assert sorted(map(tuple, tr + ho)) == sorted(map(tuple, count_task.all_inputs()))
    assert train_lib.split(count_task, seed=3) == (tr, ho)
    assert train_lib.split(count_task, seed=4)[1] != ho
    # Stratified by rarest output value: count's answer 5 comes only from "a a a a a", which
    # stays in training; hist's 5 (three inputs: all a, all b, all c) is held out once.
    task = tl.Task.from_name("count")
    tr, ho = train_lib.split(task, seed=0)
    assert ["a"] * 5 in tr and abs(len(ho) - 0.2 * len(task.all_inputs())) < 8
    assert train_lib.unseen_outputs(task, tr, ho) == 0
    hist = tl.Task.from_name("hist")
    tr, ho = train_lib.split(hist, seed=0)
    fives = [s for s in ho if 5 in hist.targets([s])[0]]
    assert len(fives) == 1 and len(set(fives[0])) == 1


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


def test_train_restarts_are_chosen_without_the_heldout_set(count_task):
    tr, ho = train_lib.split(count_task, seed=0)
    base = _tiny(count_task).cfg
    cfg = train_lib.TrainConfig(steps=60, eval_every=20, seed=0, restarts=2)
    m1, h1, rows1 = train_lib.train_restarts(count_task, base, tr, ho, cfg, progress=False)
    m2, h2, rows2 = train_lib.train_restarts(count_task, base, tr, ho[:3], cfg, progress=False)
    assert [r["seed"] for r in rows1] == [0, 1000] and len(rows2) == 2  # 60 steps: unsolved
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert [r["val_exact"] for r in h1] == [r["val_exact"] for r in h2]


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


@pytest.mark.parametrize("name", ["frac_prevs", "count"])
def test_compress_at_the_stream_span_is_exact_before_any_step(name):
    """From d = r (the rank of the live compiled stream) up, the fit starts exact: every stage,
    read back through W, equals the compiled stream on every dimension a block or W_U reads."""
    compiled, task = tl.load_program(name)
    ref = compress.Reference(compiled, task)
    live = compress.live_dims(compiled, task.pad_id)
    span = compress.stream_span(ref, live)
    r = len(span)
    assert r < int(live.sum()) < compiled.cfg.d_model  # one-hot groups are dependent
    W, history = compress.fit_projection(compiled, task, ref, r, compress.CompressConfig(),
                                         progress=False)
    assert history[-1]["step"] == 0 and history[-1]["exact"] == 1.0
    with torch.no_grad():
        f = compress.stream_forward(compiled, ref.tokens, ref.mask, W)
    for small, big in zip(f["resid"], ref.resid):  # [N, T, r] read back vs [N, T, D]
        err = ((small @ W - big) * live)[ref.mask].abs().max().item()
        assert err < 1e-4 * max(big.abs().max().item(), 1.0)
    # One dimension short, W cannot span the stream: the start is no longer exact.
    W_short = span[:r - 1]
    with torch.no_grad():
        g = compress.stream_forward(compiled, ref.tokens, ref.mask, W_short)
    assert (((g["resid"][0] @ W_short - ref.resid[0]) * live)[ref.mask].abs().max() > 1e-3)


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


def _reg_model(**kw):
    cfg = model_lib.Config(d_model=8, n_layers=2, n_heads=2, d_head=3, d_mlp=5, d_vocab=5,
                           d_vocab_out=3, n_ctx=6, **kw)
    torch.manual_seed(0)
    return model_lib.Transformer(cfg)


def test_regularize_weight_penalties_analytic():
    import regularize as rg
    m = _reg_model()
    n_w = sum(p.numel() for _, p in rg.weight_matrices(m))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(0.0)
    assert rg.l1_weights(m).item() == 0.0 and rg.l2_weights(m).item() == 0.0
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(0.5 if name.rsplit(".", 1)[-1].startswith("W_") else 7.0)  # biases ignored
    assert rg.l1_weights(m).item() == pytest.approx(0.5 * n_w)
    assert rg.l2_weights(m).item() == pytest.approx(0.25 * n_w)
    with torch.no_grad():
        for _, p in rg.weight_matrices(m):
            p.mul_(-3.0)
    assert rg.l1_weights(m).item() == pytest.approx(1.5 * n_w)  # linear in |w|
    assert rg.l2_weights(m).item() == pytest.approx(2.25 * n_w)  # quadratic


def test_regularize_activation_penalty():
    import regularize as rg
    m = _reg_model()
    tokens = torch.tensor([[0, 1, 2, 4, 4], [0, 3, 2, 1, 2]])
    mask = tokens != 4
    _, cache = m.run_with_cache(tokens, mask)
    names = rg.activation_names(2, "both", "all")
    assert names == ["blocks.0.resid_post", "blocks.0.mlp.hidden",
                     "blocks.1.resid_post", "blocks.1.mlp.hidden"]
    assert rg.activation_names(2, "mlp", "last") == ["blocks.1.mlp.hidden"]
    zero = {k: torch.zeros_like(v) for k, v in cache.items()}
    assert rg.l1_acts(zero, mask, names).item() == 0.0
    # Mean over real positions of sum_d |act_d|, by hand; padded positions do not count.
    by_hand = sum(cache[n][mask].abs().sum(-1).mean() for n in names)
    assert rg.l1_acts(cache, mask, names).item() == pytest.approx(by_hand.item(), rel=1e-6)
    doubled = {k: 2 * v for k, v in cache.items()}
    doubled["blocks.0.mlp.hidden"][~mask] = 1e6
    assert rg.l1_acts(doubled, mask, names).item() == pytest.approx(2 * by_hand.item(), rel=1e-6)
    with pytest.raises(ValueError, match="SITE"):
        rg.parse_acts("attn:all")


def test_regularize_dropout_off_in_eval_and_on_in_training():
    m0, m1 = _reg_model(), _reg_model(dropout=0.5)
    m1.load_state_dict(m0.state_dict())
    tokens = torch.tensor([[0, 1, 2, 3, 1]])
    m0.eval(), m1.eval()
    assert torch.equal(m0(tokens), m1(tokens))
    m1.train()
    torch.manual_seed(1)
    assert not torch.allclose(m0(tokens), m1(tokens))


def test_regularize_dropout_samples_is_the_mean_over_masks():
    import regularize as rg
    import train as train_lib
    _, task = tl.load_program("reverse")
    inputs = task.all_inputs()[:40]
    m = train_lib.model_like(task, _reg_model().cfg, seed=0, dropout=0.3, d_model=8)
    m.train()
    data = train_lib.Data(task, inputs)
    tokens, mask, y, valid = data.batch(torch.arange(8))
    K = 3
    extra = rg.DropoutSamples(task, inputs, K)
    torch.manual_seed(5)
    cache = {}
    loss1 = train_lib.loss_fn(m, task, tokens, mask, y, valid, cache)
    total = loss1 + extra(m, cache, tokens, mask)
    torch.manual_seed(5)  # the same draws again, one by one
    draws = [train_lib.loss_fn(m, task, tokens, mask, y, valid)]
    draws.append(train_lib.loss_fn(m, task, tokens.repeat(K - 1, 1), mask.repeat(K - 1, 1),
                                   y.repeat(K - 1, 1), valid.repeat(K - 1, 1)))
    assert total.item() == pytest.approx((draws[0] + (K - 1) * draws[1]).item() / K, rel=1e-5)


def test_regularize_likeness_compiled_vs_random():
    import regularize as rg
    compiled, task = tl.load_program("reverse")
    inputs = task.all_inputs()
    own = rg.compiled_likeness(compiled, task, compiled, inputs)
    assert all(v == 1.0 for v in own["r2"].values())
    nonzero = sum(int((p != 0).sum()) for _, p in rg.weight_matrices(compiled))
    assert own["weights_above"] == nonzero  # tracr's weights are 0, or >= 1 with max 100
    assert own["heads_fire"] == [1, 0, 0, 1]  # reverse uses attention in layers 0 and 3 only
    rand = model_lib.Transformer(compiled.cfg)
    other = rg.compiled_likeness(rand, task, compiled, inputs)
    assert other["r2"]["blocks.3.resid_post"] < 0.95 and other["r2_mean"] < 1.0
    assert other["weights_above"] > 10 * own["weights_above"]
    # Heads' outputs, summed with b_O, are the attention block's output.
    tokens, mask = task.encode(inputs[:50])
    _, cache = rand.run_with_cache(tokens, mask)
    for layer in range(rand.cfg.n_layers):
        heads = rg.head_outputs(rand, cache, layer).sum(1) + rand.blocks[layer].attn.b_O
        assert torch.allclose(heads, cache[f"blocks.{layer}.attn.out"], atol=1e-5)


def test_regularize_run_writes_a_regularized_run(tmp_runs):
    import regularize as rg
    import train as train_lib
    out = str(tmp_runs / "reverse_regularized_test.pt")
    reg = rg.default_reg(l1_weights=1e-4, dropout=0.1, dropout_samples=2)
    cfg = train_lib.TrainConfig(steps=10, eval_every=5, early_stop=False)
    _, _, meta = rg.regularized_run("reverse", reg, cfg, out, progress=False)
    m, task, saved = model_lib.load(out)
    assert saved["kind"] == "regularized" and saved["regularization"] == reg
    assert m.cfg.dropout == 0.1 and saved["history"][-1]["step"] == 10
    assert 0 <= saved["heldout_exact"] <= 1 and "dropout_after" in saved
    assert rg.run_name(reg) == "l1-weights-0.0001_dropout-0.1_x2"


@pytest.mark.parametrize("argv, says", [
    (["reverse", "--l1-acts", "attn"], "SITE"),
    (["reverse", "--from-tracr"], "--dropout"),
    (["reverse", "--dropout", "1.5"], "--dropout"),
    (["nosuch"], "unknown program"),
    (["reverse", "--l1-weights", "-1"], "--l1-weights"),
])
def test_regularize_cli_bad_input(argv, says, capsys):
    import regularize as rg
    assert rg.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


# ==============================================================================================
# plot.py


@pytest.fixture(scope="module")
def plot_runs(tmp_path_factory):
    """A compiled reverse run (with its explanation) and a trained one of another shape, trained
    for a few real Adam steps so that it has a history."""
    import explain as explain_lib
    import torch.nn.functional as F
    from dataclasses import replace

    folder = tmp_path_factory.mktemp("plot_runs")
    model, task = tl.load_program("reverse")
    compiled = folder / "reverse_tracr.pt"
    model_lib.save(compiled, model, task, "tracr", residual_labels=model.residual_labels,
                   explain=explain_lib.explain(model, task))

    torch.manual_seed(0)
    net = model_lib.Transformer(replace(model.cfg, d_model=24, n_layers=2, n_heads=2, d_head=6,
                                        d_mlp=16))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = task.sample(64, seed=1)
    tokens, mask = task.encode(data)
    y, valid = task.target_tensors(data, tokens.shape[1])
    history = []
    for step in range(6):
        out = net(tokens, mask)
        loss = F.cross_entropy(out[valid], y[valid])
        acc = (out[valid].argmax(-1) == y[valid]).float().mean().item()
        history.append({"step": step, "loss": loss.item(), "train_acc": acc})
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = folder / "reverse_trained.pt"
    model_lib.save(trained, net.eval(), task, "trained", history=history)
    return compiled, trained


def _pngs(folder):
    return {p.name: p for p in folder.glob("*.png")}


def test_plot_compiled_and_trained_runs(plot_runs, tmp_path):
    import plot
    compiled, trained = plot_runs
    assert plot.main([str(compiled), str(trained), "--out", str(tmp_path),
                      "--input", "a b c"]) == 0
    pngs = _pngs(tmp_path)
    # Figures of the models are named after both; figures from meta after the runs that have it.
    names = [f"reverse_{what}_reverse_tracr+reverse_trained.png" for what in ("resid", "attn",
                                                                             "mlp")]
    names += ["reverse_history_reverse_trained.png", "reverse_graph_reverse_tracr.png"]
    assert sorted(pngs) == sorted(names)
    for name in names:
        assert pngs[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pngs[name].stat().st_size > 10_000
    # Run again: existing figures are kept unless --force.
    before = pngs["reverse_history_reverse_trained.png"].stat().st_mtime_ns
    assert plot.main([str(compiled), str(trained), "--out", str(tmp_path), "--what",
                      "history"]) == 1
    assert pngs["reverse_history_reverse_trained.png"].stat().st_mtime_ns == before
    assert plot.main([str(compiled), str(trained), "--out", str(tmp_path), "--what", "history",
                      "--force"]) == 0


def test_plot_bad_file_is_named_and_the_rest_plotted(plot_runs, tmp_path, capsys):
    import plot
    compiled, _ = plot_runs
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a run file")
    missing = tmp_path / "missing.pt"
    assert plot.main([str(garbage), str(compiled), str(missing), "--out", str(tmp_path / "f"),
                      "--what", "graph"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2
    assert str(garbage) in err[0] and str(missing) in err[1]
    assert list(_pngs(tmp_path / "f")) == ["reverse_graph_reverse_tracr.png"]


def test_plot_bad_arguments_one_line(plot_runs, tmp_path, capsys):
    import plot
    compiled, _ = plot_runs
    assert plot.main([str(compiled), "--what", "nonsense", "--out", str(tmp_path)]) == 1
    assert plot.main([str(compiled), "--input", "a z", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nonsense" in err[0] and "'z'" in err[1]
    assert _pngs(tmp_path) == {}


def test_plot_named_grid_shape():
    import plot
    # Attention patterns [1, H, T, T] of two models with 2 and 3 heads: rows of 2 and 3 cells.
    a, b = torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4)
    fig = plot.plot_named("blocks.0.attn.pattern", [("a", a), ("b", b)])
    shapes = [ax.images[0].get_array().shape for ax in fig.axes if ax.images]
    assert shapes == [(4, 4)] * 5
    # [1, T, D] squeezes to one heatmap per model.
    fig = plot.plot_named("embed", [("a", torch.rand(1, 5, 7))])
    assert [ax.images[0].get_array().shape for ax in fig.axes if ax.images] == [(5, 7)]


def test_plot_groups_tasks_and_reads_sweep_and_llc(plot_runs, tmp_path, capsys):
    import plot
    _, trained = plot_runs
    # Another task's run, and meta a compression sweep and an LLC estimate would leave.
    task = tl.Task.from_name("count")
    cfg = model_lib.Config(d_model=8, n_layers=1, n_heads=1, d_head=4, d_mlp=8,
                           d_vocab=task.d_vocab, d_vocab_out=task.d_vocab_out,
                           n_ctx=task.max_seq_len + 1)
    other = tmp_path / "count_trained.pt"
    model_lib.save(other, model_lib.Transformer(cfg), task, "trained",
                   sweep=[{"d_model": d, "acc": d / 8} for d in (2, 4, 8)],
                   llc={"mean": 1.5, "std": 0.2, "init_loss": 0.1,
                        "traces": [[0.1 + 0.01 * i for i in range(20)]] * 2})
    out = tmp_path / "figs"
    assert plot.main([str(trained), str(other), "--out", str(out),
                      "--what", "resid,sweep,llc"]) == 0
    assert "2 tasks" in capsys.readouterr().out
    assert sorted(_pngs(out)) == ["count_llc_count_trained.png", "count_resid_count_trained.png",
                                  "count_sweep_count_trained.png",
                                  "reverse_resid_reverse_trained.png"]


# ==============================================================================================
# llc.py

import math  # noqa: E402
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


def test_llc_choose_eps_takes_the_largest_healthy_step():
    # Rank-1 5-3-5 teacher: eps = 1 diverges, 0.1 is far too coarse; the choice must be the
    # largest grid value whose pilot acceptance reaches the target, and the estimate there
    # must still land near the closed form (8.0).
    net, data = _linear_net((5, 3, 5), 1, 5000, seed=0)
    grid = (1.0, 1e-1, 1e-2, 1e-3, 3e-4, 1e-4)
    eps, pilots = llc.choose_eps(net, _half_sq, data, gamma=5.0, batch_size=500, grid=grid)
    assert pilots[0] == (1.0, "diverged")
    assert all(a == "diverged" or a < llc.EPS_TARGET for _, a in pilots[:-1])
    assert pilots[-1] == (eps, pilots[-1][1]) and pilots[-1][1] >= llc.EPS_TARGET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = llc.estimate_llc(net, _half_sq, data, eps=eps, gamma=5.0, chains=4, draws=1000,
                             burnin=400, batch_size=500, seed=0)
    assert abs(r["mean"] - 8.0) < 0.2 * 8.0, (eps, r["mean"])


def test_llc_warns_when_w0_is_not_a_minimum():
    net, data = _linear_net((5, 3, 5), 1, 1000, seed=1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)  # far from the teacher: the chains slide downhill below L(w0)
    with pytest.warns(UserWarning, match="below L\\(w0\\)"):
        r = llc.estimate_llc(net, _half_sq, data, eps=5e-4, gamma=5.0, chains=2, draws=200,
                             burnin=50, batch_size=100)
    assert r["mean"] < 0


def test_llc_diagnose_flags_rising_and_falling_traces_not_flat_ones():
    g = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(1, 400, generator=g)
    base = dict(nbeta=10.0, init_loss=0.0, burnin=0, chains=1, acceptance=0.95)
    for trace, expect in ((1.0 + noise, None), (torch.linspace(2.0, 1.0, 400) + noise, "falling"),
                          (torch.linspace(1.0, 2.0, 400) + noise, "rising")):
        llc_value = 10.0 * float(trace.mean())
        msgs = llc.diagnose(dict(base, traces=trace, per_chain=[llc_value]))
        if expect is None:
            assert msgs == []
        else:
            assert len(msgs) == 1 and f"still {expect}" in msgs[0]


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


def test_llc_cli_diverged_run_fails_or_is_recorded(tmp_runs):
    model, task = tl.load_program("reverse")
    path = str(tmp_runs / "reverse_llc_diverged.pt")
    model_lib.save(path, model, task, "tracr")
    cmd = [sys.executable, "llc.py", path, "--chains", "1", "--draws", "20", "--burnin", "0",
           "--eps", "10", "--figure", str(tmp_runs / "llc_diverged.png"), "--force"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1 and "diverged at step" in out.stderr
    assert "llc" not in model_lib.load(path)[2]
    out = subprocess.run(cmd + ["--record-diverged"], capture_output=True, text=True)
    assert out.returncode == 0 and "diverged at step" in out.stderr
    assert "diverged at step" in model_lib.load(path)[2]["llc"]["diverged"]
    import report
    assert report.fmt_llc(model_lib.load(path)[2]) == "diverged"


def test_llc_cli_bad_input_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "llc.py", "runs/no_such_run.pt", "--figure",
                          str(tmp_path / "traces.png")], capture_output=True, text=True)
    assert out.returncode == 1 and "does not exist" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ==============================================================================================
# explain.py


def _nonzero_rows(w):  # [D, *] -> set of residual indices with a non-zero row
    return set(torch.nonzero((w != 0).any(dim=1)).flatten().tolist())


def _block_weight_dims(model, b):
    """(reads, writes) of an explained block, straight from the model's weights."""
    layer = model.blocks[b["layer"]]
    if b["type"] == "attn":
        h = b["head"]
        reads = {"query": _nonzero_rows(layer.attn.W_Q[h]), "key": _nonzero_rows(layer.attn.W_K[h]),
                 "value": _nonzero_rows(layer.attn.W_V[h])}
        return reads, _nonzero_rows(layer.attn.W_O[h].T)
    hidden = b["hidden"]
    reads = {"in": _nonzero_rows(layer.mlp.W_in[:, hidden])}
    return reads, _nonzero_rows(layer.mlp.W_out[hidden].T)


def _stage(b):  # attn 0, mlp 0, attn 1, ...: the order blocks run in
    return 2 * b["layer"] + (b["type"] == "mlp")


def _check_explanation(model, task):
    import explain as explain_lib
    from tracr.compiler import rasp_to_graph

    info = explain_lib.explain(model, task)
    labels = model.residual_labels
    index = {lab: i for i, lab in enumerate(labels)}
    ops = {op["label"]: op for op in info["ops"]}

    # Every operation of the program is named exactly once, in the list and in the printed tree.
    graph = rasp_to_graph.extract_rasp_graph(task.program).graph
    assert sorted(ops) == sorted(graph.nodes) and len(ops) == len(info["ops"])
    text = explain_lib.format_explanation(info)
    for label in ops:
        assert sum(line.lstrip().startswith(f"{label} = ") for line in text.splitlines()) == 1

    # Every computing operation has its blocks: one head or one MLP; SelectorWidth a head and the
    # MLP of the same layer. tokens, indices and Selects have none.
    used = [b for b in info["blocks"] if not b["unused"]]
    for label, op in ops.items():
        mine = [b for b in used if b["op"] == label]
        if op["kind"] in ("tokens", "indices", "Select"):
            assert mine == []
        elif op["kind"] == "SelectorWidth":
            assert sorted(b["type"] for b in mine) == ["attn", "mlp"]
            assert mine[0]["layer"] == mine[1]["layer"]
        else:
            assert len(mine) == 1

    # Data order: an operation runs after everything it depends on (through its Select).
    stages = {label: [_stage(b) for b in used if b["op"] == label] for label in ops}
    for label, op in ops.items():
        deps = [d for c in op["children"] for d in
                (ops[c]["children"] if ops[c]["kind"] == "Select" else [c])]
        for d in deps:
            if stages[label] and stages[d]:
                assert max(stages[d]) < min(stages[label]), (label, d)

    # Reported dims are the weights' non-zero rows and columns; nothing is read before it is
    # written (the embedding writes W_E's and W_pos's non-zero columns).
    written = _nonzero_rows(model.W_E.T) | _nonzero_rows(model.W_pos.T)
    for stage in range(2 * model.cfg.n_layers):
        blocks = [b for b in used if _stage(b) == stage]
        for b in blocks:
            reads, writes = _block_weight_dims(model, b)
            assert {k: {index[d] for d in v} for k, v in b["reads"].items()} == reads, b["name"]
            assert {index[d] for d in b["writes"]} == writes, b["name"]
            assert set().union(*reads.values()) <= written, b["name"]
        for b in blocks:
            written |= _block_weight_dims(model, b)[1]

    # Blocks marked unused are all zero; used hidden units and heads cover the rest exactly.
    for layer in range(model.cfg.n_layers):
        mlp = [b for b in info["blocks"] if b["layer"] == layer and b["type"] == "mlp"]
        hidden = sorted(h for b in mlp for h in b.get("hidden", []))
        if any(b.get("hidden") for b in mlp):
            assert hidden == list(range(model.cfg.d_mlp))
        for b in info["blocks"]:
            if b["unused"] and b["layer"] == layer and b["type"] == "attn":
                w = model.blocks[layer].attn
                sl = slice(None) if b["head"] is None else b["head"]
                assert all((x[sl] == 0).all() for x in (w.W_Q, w.W_K, w.W_V, w.W_O))
    assert "DISAGREE" not in text and "MISMATCH" not in text
    assert explain_lib.data_order_violations(info) == []
    return info


@pytest.mark.parametrize("name", ["reverse", "sort", "frac_prevs"])
def test_explain_library_programs(name):
    info = _check_explanation(*tl.load_program(name))
    assert info["output"] == tl.load_program(name)[1].program.label


def test_explain_user_program_with_parallel_mlps():
    # Two Maps of the tokens land in one MLP layer side by side; a SequenceMap combines them.
    from tracr.rasp import rasp
    plus = rasp.categorical(rasp.Map(lambda x: x + 1, rasp.tokens)).named("plus")
    double = rasp.categorical(rasp.Map(lambda x: 2 * x, rasp.tokens)).named("double")
    both = rasp.categorical(rasp.SequenceMap(lambda a, b: a + b, plus, double)).named("both")
    model, task = tl.load_rasp(both, [1, 2, 3], 4)
    info = _check_explanation(model, task)
    layer0 = [b for b in info["blocks"] if b["name"] == "blocks.0.mlp" and not b["unused"]]
    assert sorted(b["op"] for b in layer0) == sorted([double.label, plus.label])
    assert not set(layer0[0]["hidden"]) & set(layer0[1]["hidden"])


def test_explain_cli_prints_and_stores(tmp_runs, capsys):
    out = tmp_runs / "reverse_explained.pt"
    assert tl.main(["reverse", "--explain", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Layer 0" in text and "computes" in text and "DISAGREE" not in text
    run = torch.load(out, weights_only=True)  # plain data only
    titles = run["meta"]["explain"]["titles"]
    assert any("Aggregate" in t for t in titles.values())
