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


# ==============================================================================================
# llc.py


# ==============================================================================================
# explain.py
