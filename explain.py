"""Explain a compiled model: what every attention head and MLP computes, in RASP terms.

    python tracr_load.py reverse --explain              # prints the walk-through below
    python tracr_load.py reverse --out runs/reverse_tracr.pt   # keeps it in meta['explain']

    from explain import explain, format_explanation, draw_graph
    info = explain(model, task)          # plain dicts, lists and strings
    print(format_explanation(info))
    draw_graph(info, "figures/reverse_graph.png")

tracr compiles a RASP program in four passes (tracr/compiler/compiling.py): the program becomes a
graph of operations (rasp_to_graph), every operation gets its value set and residual directions
(basis_inference), every operation gets a craft block, an attention head or an MLP
(expr_to_craft_graph), and the blocks are placed into layers by the longest path from the input
(craft_graph_to_model). This file runs those passes again on the program the model was compiled
from and reads the compiler's own answer: which block computes which operation, and which residual
directions it reads and writes. It then confirms that answer from the loaded model's weights:

    attention head h of layer l reads  the non-zero rows of W_Q[h], W_K[h], W_V[h]   [D, E]
                                writes the non-zero columns of W_O[h]             [E, D]
    MLP part of an operation    reads  the non-zero rows of W_in[:, its hidden units]
                                writes the non-zero columns of W_out[its hidden units, :]

What the compiler declares and what the weights use can differ on purpose: a categorical head's
query space contains the BOS direction although its row of W_QK is zero. So the compiler side
is taken from the craft blocks' matrices (a direction counts when its row or column there is
non-zero), which is exactly what assemble.py writes into the weights; the directions declared
but never used are listed separately as `declared_unused`.

Layers are numbered from 0 as in the model's cache (`blocks.0.attn`, `blocks.0.mlp`, ...).
"""

import networkx as nx

SOURCES = ("tokens", "indices")


# ----------------------------------------------------------------------------------------------
# Running tracr's compiler passes (no weights are assembled: that is what the loaded model has).


def compile_passes(program, vocab, max_seq_len, mlp_exactness=100):
    """tracr's passes up to the craft model -> (graph, craft_model, module_names, labels).

    module_names[i] is where craft_model.blocks[i] lives in the weights, e.g.
    'transformer/layer_1/attn'; labels are the residual labels in tracr's order.
    """
    from tracr.compiler import (assemble, basis_inference, craft_graph_to_model,
                                expr_to_craft_graph, nodes, rasp_to_graph)
    from tracr.craft import bases
    from tracr.rasp import rasp
    from tracr_load import BOS, PAD

    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, set(vocab), max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph, bos_dir=bases.BasisDirection(rasp.tokens.label, BOS), mlp_exactness=mlp_exactness)
    craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
    # The same helper assemble.py uses to map craft blocks onto layer slots: consecutive blocks
    # of one type skip a slot, which then stays all zero.
    _, module_names = assemble._get_model_config_and_module_names(craft_model)

    # The residual space exactly as craft_model_to_transformer and assemble.py build it.
    tokens_space = bases.VectorSpaceWithBasis.from_values(
        rasp.tokens.label, graph.nodes[rasp.tokens.label][nodes.VALUE_SET] | {BOS, PAD})
    indices_space = bases.VectorSpaceWithBasis.from_values(rasp.indices.label,
                                                           range(max_seq_len))
    output_space = bases.VectorSpaceWithBasis(sink[nodes.OUTPUT_BASIS])
    residual = bases.join_vector_spaces(craft_model.residual_space, tokens_space, indices_space,
                                        output_space)
    return graph, craft_model, module_names, [str(d) for d in residual.basis]


# ----------------------------------------------------------------------------------------------
# Describing operations and blocks as plain data.


def _sorted_values(values):
    from tracr_load import _sort_key
    return sorted(values, key=_sort_key)


def _value_text(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _op_info(expr, node):
    """One operation of the program as a plain dict."""
    from tracr.compiler import nodes
    from tracr.rasp import rasp

    kind = {"TokensType": "tokens", "IndicesType": "indices"}.get(type(expr).__name__,
                                                                  type(expr).__name__)
    info = {"label": expr.label, "kind": kind,
            "children": [c.label for c in expr.children], "encoding": None, "values": None,
            "layer": None, "blocks": []}
    if isinstance(expr, rasp.SOp):
        info["encoding"] = "numerical" if rasp.is_numerical(expr) else "categorical"
        info["values"] = [_value_text(v) for v in _sorted_values(node[nodes.VALUE_SET])]
    if isinstance(expr, rasp.Select):
        info["keys"], info["queries"] = expr.keys.label, expr.queries.label
        p = expr.predicate
        if isinstance(p, rasp.Comparison):
            info["predicate"] = p.value if p.name in ("TRUE", "FALSE") else \
                f"key {p.value} query"
        else:  # a Python function of (key, query); only its name can be shown
            name = getattr(p, "__name__", "predicate")
            info["predicate"] = f"{'a custom predicate' if name == '<lambda>' else name}" \
                "(key, query)"
    return info


def _matrix_dirs(space, matrix, axis):
    """Directions of `space` whose row (axis=1) or column (axis=0) of matrix is non-zero."""
    nonzero = (abs(matrix) > 0).any(axis=axis)
    return [str(d) for d, used in zip(space.basis, nonzero) if used]


def _weight_dirs(w, labels, axis):
    """Residual labels whose row (axis=1) or column (axis=0) of a [D, *] / [*, D] tensor is
    non-zero in the loaded model's weights."""
    nonzero = (w.abs() > 0).any(dim=axis).tolist()
    return [lab for lab, used in zip(labels, nonzero) if used]


def _in_order(dirs, labels):
    """Residual labels in the residual stream's order (the compiler's spaces have their own)."""
    index = {lab: i for i, lab in enumerate(labels)}
    return sorted(dirs, key=lambda d: index.get(d, len(labels)))


def _declared(spaces):
    return sorted({str(d) for s in spaces for d in s.basis})


def _head_block(head, h, layer, model, labels):
    """A compiled attention head: the compiler's reads/writes and the weights' ones."""
    attn = model.blocks[layer].attn
    qk, ov = head.w_qk, head.w_ov
    # W_QK lives in W_Q (W_K is a plain projection onto the key space), and W_OV lives in W_V
    # (W_O a plain projection from the output space), as assemble.py lays them out.
    compiler = {"query": _matrix_dirs(qk.left_space, qk.matrix, 1),
                "key": [str(d) for d in qk.right_space.basis],
                "value": _matrix_dirs(ov.input_space, ov.matrix, 1),
                "writes": [str(d) for d in ov.output_space.basis]}
    compiler = {k: _in_order(v, labels) for k, v in compiler.items()}
    weights = {"query": _weight_dirs(attn.W_Q[h], labels, 1),  # W_Q[h]: [D, E]
               "key": _weight_dirs(attn.W_K[h], labels, 1),
               "value": _weight_dirs(attn.W_V[h], labels, 1),
               "writes": _weight_dirs(attn.W_O[h], labels, 0)}  # W_O[h]: [E, D]
    used = set(sum(compiler.values(), []))
    declared = _declared([qk.left_space, qk.right_space, ov.input_space, ov.output_space])
    return {"name": f"blocks.{layer}.attn", "layer": layer, "type": "attn", "head": h,
            "reads": {k: compiler[k] for k in ("query", "key", "value")},
            "writes": compiler["writes"], "weights": weights,
            "confirmed": compiler == weights,
            "declared_unused": _in_order([d for d in declared if d not in used], labels)}


def _mlp_block(part, combined, layer, model, labels):
    """One operation's share of a (possibly combined) MLP layer: its hidden units, reads, writes."""
    mlp = model.blocks[layer].mlp
    hidden_dirs = list(combined.fst.output_space.basis)
    hidden = [hidden_dirs.index(d) for d in part.fst.output_space.basis]
    compiler = {"in": _matrix_dirs(part.fst.input_space, part.fst.matrix, 1),
                "writes": _matrix_dirs(part.snd.output_space, part.snd.matrix, 0)}
    compiler = {k: _in_order(v, labels) for k, v in compiler.items()}
    weights = {"in": _weight_dirs(mlp.W_in[:, hidden], labels, 1),  # [D, hidden]
               "writes": _weight_dirs(mlp.W_out[hidden, :], labels, 0)}  # [hidden, D]
    used = set(compiler["in"] + compiler["writes"])
    declared = _declared([part.fst.input_space, part.snd.output_space])
    return {"name": f"blocks.{layer}.mlp", "layer": layer, "type": "mlp", "head": None,
            "hidden": hidden, "reads": {"in": compiler["in"]}, "writes": compiler["writes"],
            "weights": weights, "confirmed": compiler == weights,
            "declared_unused": _in_order([d for d in declared if d not in used], labels)}


def _unused_block(model, layer, kind, head=None):
    """A padding block: tracr fills every layer with both blocks and every layer with H heads."""
    if kind == "attn":
        a = model.blocks[layer].attn
        ws = [a.W_Q, a.W_K, a.W_V, a.W_O] if head is None else [a.W_Q[head], a.W_K[head],
                                                                 a.W_V[head], a.W_O[head]]
    else:
        ws = [model.blocks[layer].mlp.W_in, model.blocks[layer].mlp.W_out]
    zero = all(bool((w == 0).all()) for w in ws)
    return {"name": f"blocks.{layer}.{kind}", "layer": layer, "type": kind, "head": head,
            "op": None, "unused": True, "reads": {}, "writes": [], "confirmed": zero}


def explain(model, task, labels=None, mlp_exactness=None):
    """What every block of a compiled model computes -> a dict of plain lists and strings.

    model: the Transformer loaded by tracr_load (load_program or load_rasp); task: its Task (its
    `program` must be the compiled instance: residual labels carry its ids). Keys:
      program, output, n_layers, n_heads, d_model, d_mlp
      ops       every operation of the program, sources first, in an order the data allows:
                label, kind, encoding, values, children, layer, blocks (names of its blocks)
      edges     [child, parent] pairs of the program's graph
      residual  the residual stream's groups of directions: name, kind, first, last, values
      blocks    every head and MLP in layer order, used or not: name, layer, type, head, op,
                unused, reads, writes (residual labels), confirmed (the weights agree)
      titles    short per-stage descriptions for plots, e.g. {'blocks.0.attn': '...'}
    """
    from tracr.compiler import nodes
    from tracr.craft import transformers

    if task.program is None:
        raise ValueError(f"task {task.name!r} has no RASP program; explain needs the program the "
                         "model was compiled from (tl.load_program or tl.load_rasp)")
    if mlp_exactness is None:
        mlp_exactness = (task.settings or {}).get("mlp_exactness", 100)
    labels = list(labels or getattr(model, "residual_labels", None) or [])
    graph, craft_model, module_names, tracr_labels = compile_passes(
        task.program, task.vocab, task.max_seq_len, mlp_exactness)
    if labels and labels != tracr_labels:
        raise ValueError(f"the model's residual labels differ from a fresh compile of "
                         f"{task.program.label!r}: was it compiled from another program object?")
    labels = tracr_labels
    if len(labels) != model.cfg.d_model:
        raise ValueError(f"model has d_model={model.cfg.d_model}, the program compiles to "
                         f"{len(labels)} residual directions: is this a compiled model?")

    # Operations, sources first: topological order with ties broken by label.
    order = list(nx.lexicographical_topological_sort(graph, key=str))
    ops = {n: _op_info(graph.nodes[n][nodes.EXPR], graph.nodes[n]) for n in order}

    # Which operation owns each craft block (identity: the layers hold the nodes' own blocks).
    owner = {}
    for n in order:
        block = graph.nodes[n].get(nodes.MODEL_BLOCK)
        parts = block.blocks if isinstance(block, transformers.SeriesWithResiduals) else [block]
        for part in parts:
            if part is None:
                continue
            heads = part.as_multi().heads() if not isinstance(part, transformers.MLP) else [part]
            for p in heads:
                owner[id(p)] = n

    # Walk the layer slots in order; a slot without a craft block is padding.
    by_slot = {name: blk for name, blk in zip(module_names, craft_model.blocks)}
    blocks = []
    for layer in range(model.cfg.n_layers):
        attn = by_slot.get(f"transformer/layer_{layer}/attn")
        if attn is None:
            blocks.append(_unused_block(model, layer, "attn"))
        else:
            heads = list(attn.as_multi().heads())
            for h in range(model.cfg.n_heads):
                if h < len(heads):
                    b = _head_block(heads[h], h, layer, model, labels)
                    b.update(op=owner[id(heads[h])], unused=False)
                    blocks.append(b)
                else:
                    blocks.append(_unused_block(model, layer, "attn", h))
        mlp = by_slot.get(f"transformer/layer_{layer}/mlp")
        if mlp is None:
            blocks.append(_unused_block(model, layer, "mlp"))
            continue
        parts = [(n, p) for n in order for p in _mlp_parts(graph.nodes[n].get(nodes.MODEL_BLOCK))
                 if set(p.fst.output_space.basis) <= set(mlp.fst.output_space.basis)]
        for n, part in parts:
            b = _mlp_block(part, mlp, layer, model, labels)
            b.update(op=n, unused=False)
            blocks.append(b)
        n_hidden = mlp.fst.output_space.num_dims
        if n_hidden < model.cfg.d_mlp:  # hidden units tracr pads to the widest MLP layer
            w_in = model.blocks[layer].mlp.W_in[:, n_hidden:]
            w_out = model.blocks[layer].mlp.W_out[n_hidden:]
            blocks.append({"name": f"blocks.{layer}.mlp", "layer": layer, "type": "mlp",
                           "head": None, "op": None, "unused": True,
                           "hidden": list(range(n_hidden, model.cfg.d_mlp)), "reads": {},
                           "writes": [], "confirmed": bool((w_in == 0).all() and
                                                           (w_out == 0).all())})

    for b in blocks:
        if b["op"] is not None:
            ops[b["op"]]["blocks"].append(b["name"] + (f".head{b['head']}"
                                                       if b["head"] is not None else ""))
            ops[b["op"]]["layer"] = b["layer"] if ops[b["op"]]["layer"] is None else \
                min(ops[b["op"]]["layer"], b["layer"])

    return {"program": task.name, "output": task.program.label, "n_layers": model.cfg.n_layers,
            "n_heads": model.cfg.n_heads, "d_model": model.cfg.d_model, "d_mlp": model.cfg.d_mlp,
            "vocab": [str(v) for v in task.vocab], "max_seq_len": task.max_seq_len,
            "ops": [ops[n] for n in order], "edges": [[a, b] for a, b in graph.edges],
            "residual": residual_groups(labels, ops), "blocks": blocks,
            "titles": _titles(blocks, ops)}


def _mlp_parts(block):
    from tracr.craft import transformers
    if isinstance(block, transformers.MLP):
        return [block]
    if isinstance(block, transformers.SeriesWithResiduals):
        return [b for b in block.blocks if isinstance(b, transformers.MLP)]
    return []


def residual_groups(labels, ops):
    """Contiguous groups of residual labels that share a name (labels are sorted by name)."""
    groups = []
    for i, lab in enumerate(labels):
        name, _, value = lab.partition(":")
        if groups and groups[-1]["name"] == name:
            groups[-1]["last"] = i
            groups[-1]["values"].append(value)
            continue
        if name in SOURCES or name == "one":
            kind = name
        elif name.endswith("_selector_width_attn_output"):
            kind = "selector width helper"
        elif name in ops:
            kind = f"{ops[name]['kind']} ({ops[name]['encoding']})"
        else:
            kind = "other"
        groups.append({"name": name, "kind": kind, "first": i, "last": i,
                       "values": [value] if value else []})
    return groups


def _titles(blocks, ops):
    """'blocks.0.attn' -> 'SelectorWidth -> length', for plot titles (one line per block)."""
    titles = {}
    for b in blocks:
        if b["op"] is None:
            continue
        op = ops[b["op"]]
        if op["kind"] == "SelectorWidth":
            what = f"selector width ({'count' if b['type'] == 'attn' else 'decode'})"
        else:
            what = op["kind"]
        text = f"{what} -> {op['label']}"
        if text not in titles.get(b["name"], []):
            titles.setdefault(b["name"], []).append(text)
    return {name: "; ".join(t) for name, t in titles.items()}


# ----------------------------------------------------------------------------------------------
# Checks a reader (and the tests) can rely on.


def data_order_violations(info):
    """Blocks that read a direction no earlier stage wrote -> list of strings (empty: fine).

    The embedding writes tokens, indices and one; stages run attn 0, mlp 0, attn 1, ...; blocks of
    one stage run in parallel, so a block may only read what earlier stages wrote.
    """
    written = {lab for g in info["residual"] if g["name"] in SOURCES + ("one",)
               for lab in _group_labels(g)}
    problems = []
    for layer in range(info["n_layers"]):
        for kind in ("attn", "mlp"):
            stage = [b for b in info["blocks"] if b["layer"] == layer and b["type"] == kind]
            for b in stage:
                missing = set(sum(b["reads"].values(), [])) - written
                if missing:
                    problems.append(f"{b['name']} ({b['op']}) reads {sorted(missing)} before "
                                    "anything writes them")
            for b in stage:
                written |= set(b["writes"])
    return problems


def _group_labels(g):
    return [f"{g['name']}:{v}" for v in g["values"]] if g["values"] else [g["name"]]


# ----------------------------------------------------------------------------------------------
# Text.


def _dims_text(dirs, index):
    """['indices:0', 'indices:1', 'one'] -> 'indices{0,1} one' with their dim numbers."""
    if not dirs:
        return "-"
    groups = {}
    for d in dirs:
        name, _, value = d.partition(":")
        groups.setdefault(name, []).append(value)
    parts = []
    for name, values in groups.items():
        dims = sorted(index[f"{name}:{v}" if v else name] for v in values)
        where = f"[{dims[0]}]" if len(dims) == 1 else (
            f"[{dims[0]}-{dims[-1]}]" if dims[-1] - dims[0] == len(dims) - 1 else
            "[" + ",".join(map(str, dims)) + "]")
        vals = "{" + ",".join(values) + "}" if any(values) else ""
        parts.append(f"{name}{vals}{where}")
    return " ".join(parts)


def _expr_text(op):
    k, c = op["kind"], op["children"]
    if k in SOURCES:
        return "input" if k == "tokens" else "position"
    if k == "Select":
        return f"Select(keys={op['keys']}, queries={op['queries']}, {op['predicate']})"
    return f"{k}({', '.join(c)})"


def _tree_lines(info):
    """The program as an indented tree from its output; shared subtrees are printed once."""
    ops = {op["label"]: op for op in info["ops"]}
    lines, seen = [], set()

    def walk(label, depth):
        op = ops[label]
        head = f"{'  ' * depth}{label} = {_expr_text(op)}"
        if label in seen:
            lines.append(f"{'  ' * depth}{label} (shown above)")
            return
        seen.add(label)
        tail = ""
        if op["encoding"]:
            vals = op["values"]
            vals = vals if len(vals) <= 8 else vals[:3] + ["..."] + vals[-2:]
            tail = f"{op['encoding']:<11} {{{', '.join(vals)}}}"
        where = "embedding" if op["kind"] in SOURCES else (
            f"layer {op['layer']}" if op["layer"] is not None else "")
        lines.append(f"{head:<60} {tail:<36} {where}".rstrip())
        for child in dict.fromkeys(op["children"]):
            walk(child, depth + 1)

    walk(info["output"], 1)
    return lines


def format_explanation(info):
    """The explanation as a short walk-through (a string)."""
    labels = [lab for g in info["residual"] for lab in _group_labels(g)]
    index = {lab: i for i, lab in enumerate(labels)}
    ops = {op["label"]: op for op in info["ops"]}
    out = [f"{info['program']}: vocab {{{', '.join(info['vocab'])}}}, max_seq_len "
           f"{info['max_seq_len']}; compiled to {info['n_layers']} "
           f"layer{'s' if info['n_layers'] > 1 else ''}, {info['n_heads']} "
           f"head{'s' if info['n_heads'] > 1 else ''} per layer, d_model {info['d_model']}, "
           f"d_mlp {info['d_mlp']}", "",
           f"RASP program (output: {info['output']}), with each operation's encoding, values and "
           "layer.", "A Select has no block of its own: the attention head of the operation "
           "that uses it computes it.", *_tree_lines(info), "",
           f"Residual stream ({info['d_model']} dimensions):"]
    for g in info["residual"]:
        dims = f"{g['first']}" if g["first"] == g["last"] else f"{g['first']}-{g['last']}"
        vals = " ".join(g["values"]) if g["values"] else (
            "always 1" if g["name"] == "one" else "a number")
        out.append(f"  {dims:>6}  {g['name']:<36} {g['kind']:<28} {vals}")

    for layer in range(info["n_layers"]):
        out += ["", f"Layer {layer}"]
        for b in [b for b in info["blocks"] if b["layer"] == layer]:
            slot = f"attn head {b['head']}" if b["type"] == "attn" and b["head"] is not None \
                else b["type"]
            if b["unused"]:
                extra = f" {b['hidden'][0]}-{b['hidden'][-1]}" if b.get("hidden") else ""
                zero = "all-zero" if b["confirmed"] else "NOT all zero in the weights"
                what = f"hidden units{extra} unused" if extra else "unused"
                out.append(f"  {slot:<12} {what} (padding tracr adds to make layers equal; "
                           f"{zero})")
                continue
            op = ops[b["op"]]
            out.append(f"  {slot:<12} computes {b['op']} = {_expr_text(op)}" +
                       (" (attention part)" if op["kind"] == "SelectorWidth" and
                        b["type"] == "attn" else "") +
                       (" (MLP part)" if op["kind"] == "SelectorWidth" and b["type"] == "mlp"
                        else ""))
            if b["type"] == "attn":
                sel = ops.get(op["children"][0]) if op["children"] else None
                if sel is not None and sel["kind"] == "Select":
                    out.append(f"  {'':<12}   attends where {sel['predicate']} "
                               f"({sel['label']})")
                for k in ("query", "key", "value"):
                    out.append(f"  {'':<12}   {k + ' reads':<11} "
                               f"{_dims_text(b['reads'][k], index)}")
            else:
                h = b["hidden"]
                units = f"unit {h[0]}" if len(h) == 1 else f"units {h[0]}-{h[-1]}"
                out.append(f"  {'':<12}   {'hidden':<11} {units} of {info['d_mlp']}")
                out.append(f"  {'':<12}   {'reads':<11} {_dims_text(b['reads']['in'], index)}")
            out.append(f"  {'':<12}   {'writes':<11} {_dims_text(b['writes'], index)}")
            if b["declared_unused"]:
                out.append(f"  {'':<12}   {'(declared, zero weight)':<11} "
                           f"{_dims_text(b['declared_unused'], index)}")
            if not b["confirmed"]:
                out.append(f"  {'':<12}   MISMATCH: the weights read/write "
                           f"{b['weights']}")

    out_group = [g for g in info["residual"] if g["name"] == info["output"]][0]
    first, last = out_group["first"], out_group["last"]
    dims = f"dimension {first}" if first == last else f"dimensions {first}-{last}"
    out += ["", f"Output: the model's prediction is read from {info['output']}'s {dims}" + (
                " (argmax over its values)." if out_group["values"] else " (its value).")]

    bad = [b for b in info["blocks"] if not b["confirmed"]]
    order = data_order_violations(info)
    out += ["", "Checked against the loaded weights: " +
            ("every block's non-zero rows and columns are the directions the compiler assigned, "
             "and every unused block is all zero." if not bad else
             f"{len(bad)} block(s) DISAGREE with the compiler (marked MISMATCH above)."),
            "Data order: " + ("every block reads only directions written by the embedding or an "
                              "earlier stage." if not order else "; ".join(order))]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# The program's graph, coloured by layer.


def draw_graph(info, path=None, ax=None):
    """Draw the program's graph with each node coloured by the layer that computes it.

    Data flows left to right (columns are topological generations). Sources are grey; a Select
    takes the colour of the layer whose head uses it, drawn as a square. Returns the figure.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    g = nx.DiGraph()
    ops = {op["label"]: op for op in info["ops"]}
    g.add_nodes_from(ops)
    g.add_edges_from(tuple(e) for e in info["edges"])
    for gen, names in enumerate(nx.topological_generations(g)):
        for n in names:
            g.nodes[n]["gen"] = gen
    pos = nx.multipartite_layout(g, subset_key="gen", align="vertical", scale=1.0)

    cmap = matplotlib.colormaps["tab10"]

    def layer_of(n):
        op = ops[n]
        if op["kind"] == "Select":  # the layer of the head that uses it
            users = [ops[s]["layer"] for s in g.successors(n) if ops[s]["layer"] is not None]
            return min(users) if users else None
        return op["layer"]

    n_gen = 1 + max(nx.get_node_attributes(g, "gen").values())
    widest = max(sum(1 for n in g if g.nodes[n]["gen"] == k) for k in range(n_gen))
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.9 * n_gen + 1.5, 0.9 * widest + 1.6),
                               layout="constrained")
    else:
        fig = ax.figure
    boxes = {}
    for n, (x, y) in pos.items():
        layer = layer_of(n)
        colour = (0.85,) * 3 if layer is None else cmap(layer % 10)[:3]
        square = ops[n]["kind"] == "Select"
        if square:  # a Select is lighter: it is computed inside its user's head
            colour = tuple(0.55 + 0.45 * c for c in colour)
        kind = ops[n]["kind"]
        text = n if kind == n else f"{n}\n{kind}"  # tokens and indices are their own kind
        boxes[n] = ax.text(x, y, text, ha="center", va="center", fontsize=8,
                           zorder=3, bbox=dict(boxstyle="square,pad=0.35" if square else
                                               "round,pad=0.4", fc=colour, ec="0.3"))
    mid = sum(p[1] for p in pos.values()) / len(pos)
    for a, b in g.edges:
        # Edges that skip generations bow away from the middle so they pass around the nodes.
        skip = g.nodes[b]["gen"] - g.nodes[a]["gen"] > 1
        bow = (-0.25 if pos[a][1] >= mid else 0.25) if skip else 0.0
        ax.annotate("", xy=pos[b], xytext=pos[a], zorder=4,
                    arrowprops=dict(arrowstyle="-|>", color="0.4", lw=1.0,
                                    connectionstyle=f"arc3,rad={bow}",
                                    patchA=boxes[a].get_bbox_patch(),
                                    patchB=boxes[b].get_bbox_patch()))
    layers = sorted({layer_of(n) for n in g if layer_of(n) is not None})
    handles = [Patch(fc="0.85", ec="0.3", label="embedding")] + [
        Patch(fc=cmap(k % 10), ec="0.3", label=f"layer {k}") for k in layers]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              frameon=False)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    pad_x = (max(xs) - min(xs)) / max(2 * n_gen, 2) + 0.15
    ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    ax.set_ylim(min(ys) - 0.3, max(ys) + 0.3)
    ax.set_axis_off()
    ax.set_title(f"{info['program']}: RASP graph, coloured by the layer that computes each "
                 "operation (square: Select, done by its user's head)", fontsize=9)
    if path is not None:
        import model as model_lib
        model_lib.save_figure(fig, path, dpi=130)
    return fig


# ----------------------------------------------------------------------------------------------
# Bench rows for bench.py.


def bench(programs=("reverse", "sort", "frac_prevs")):
    """Per program: how many blocks the weights confirm, how many read out of order, and the
    explanation's time (the compile itself is tracr_load's and cached per process)."""
    import time

    import tracr_load as tl
    rows = []
    for name in programs:
        model, task = tl.load_program(name)
        t0 = time.perf_counter()
        info = explain(model, task)
        seconds = time.perf_counter() - t0
        used = [b for b in info["blocks"] if not b["unused"]]
        rows.append({"name": f"explain {name}", "blocks_used": len(used),
                     "blocks_unused": len(info["blocks"]) - len(used),
                     "confirmed_by_weights": sum(b["confirmed"] for b in info["blocks"]) /
                     len(info["blocks"]),
                     "data_order_violations": len(data_order_violations(info)),
                     "seconds": round(seconds, 3)})
    return rows
