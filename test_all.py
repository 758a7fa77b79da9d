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
    return {"in": _nonzero_rows(layer.mlp.W_in[:, hidden])}, _nonzero_rows(layer.mlp.W_out[hidden].T)


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
