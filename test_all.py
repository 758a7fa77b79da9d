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
