"""Figures from saved runs: N models side by side, layer by layer.

    python plot.py runs/*.pt                                   # every figure that applies
    python plot.py runs/reverse_*.pt --input "a b c" --what resid,attn --out figures/
    python plot.py runs/reverse_tracr.pt --what blocks.0.attn.pattern   # any cache entry

Every model of a task runs on the same input (--input, or a default drawn from the task with
--seed) and each figure has one row per model. Runs of different tasks go to separate figures.

What (--what, comma-separated; default: every kind below that the runs allow):
    resid    the residual stream [T, D] after the embedding and after every attention and MLP
             block; compiled models' axes carry tracr's residual labels and their columns name
             the RASP operation each block computes (meta['explain'], from explain.py)
    attn     every head's attention pattern [T, T]: one column per (layer, head)
    mlp      every layer's MLP hidden activations [T, d_mlp]
    history  training curves                        (runs with meta['history'])
    sweep    compression sweeps                     (runs with meta['sweep'])
    llc      SGLD loss traces of LLC estimates      (runs with meta['llc'])
    graph    the RASP program's graph, coloured by layer   (compiled runs with meta['explain'])
    NAME     any entry of model.run_with_cache, e.g. blocks.1.mlp.out, drawn by plot_named: size-1
             dimensions squeezed away, then one row per model and one column per first dimension

Meta keys read (all optional; a run without one is skipped quietly for that figure):
    residual_labels  list of D strings: tracr's residual labels (compiled runs)
    explain          dict from explain.explain: 'titles' {'blocks.0.attn': text}, 'blocks', 'ops',
                     'edges', 'program'
    history          list of dicts, one per evaluation: 'step' and numeric fields; fields with
                     'loss' in their name go on a log-scale panel, with 'acc', 'exact',
                     'per_position' or 'correct' on a [0, 1] panel, 'lr' on its own, any other
                     numeric field on a last one ('seconds', 'time', 'epoch' are left out)
    sweep            list of dicts, one per setting: the x field is the first of SWEEP_X present
                     (else the first numeric field); the other numeric fields are plotted as in
                     history
    llc              dict from llc.estimate_llc ('mean', 'std', 'traces' [chains, steps],
                     optional 'init_loss'), or a list of such dicts, or a dict of them by name

Colour scales are centred at zero (white = 0, red > 0, blue < 0). The residual stream's scale is
shared along each row, so stages of one model compare directly; MLP cells each have their own (a
compiled model's MLPs differ by orders of magnitude); both are set by the real positions, so BOS
may saturate. Attention patterns use the same map on [-1, 1].
PNGs are named PROGRAM_WHAT_MODELS.png; the paths written are printed at the end.
"""

import hashlib
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import model as model_lib  # noqa: E402

FIGURES = ("resid", "attn", "mlp", "history", "sweep", "llc", "graph")
SWEEP_X = ("d_model", "d_resid", "d_compressed", "d", "width", "dim", "size")
CMAP = "RdBu_r"
MAX_COLS = 12  # cells per figure row before a model's row wraps


# ----------------------------------------------------------------------------------------------
# Loading and running.


class Run:
    """One run file: its model, task, meta and (after run_on) its cache on the shared input."""

    def __init__(self, path):
        self.path = path
        self.model, self.task, self.meta = model_lib.load(path)
        self.kind = self.meta["kind"]
        self.name = os.path.splitext(os.path.basename(path))[0]
        labels = self.meta.get("residual_labels")
        self.labels = list(labels) if labels and len(labels) == self.model.cfg.d_model else None
        self.explain = self.meta.get("explain") if self.labels else None
        self.cache = None

    @property
    def title(self):
        return f"{self.kind}: {self.path}"

    def run_on(self, seq):
        tokens, mask = self.task.encode([seq])
        with torch.no_grad():
            _, cache = self.model.run_with_cache(tokens, mask)
        self.cache = {k: v[0] for k, v in cache.items()}  # batch of one: [T, D], [H, T, T], ...


def load_runs(paths):
    """-> (runs, errors): a file that cannot be read gives one line in errors, not an exception."""
    runs, errors = [], []
    for path in paths:
        try:
            runs.append(Run(path))
        except Exception as e:  # a truncated or foreign file, or a state dict of another shape
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            errors.append(f"skipping {path}: {msg}")
    return runs, errors


def group_by_task(runs):
    """Runs of the same program, vocab and length go together, in the order given."""
    groups = {}
    for r in runs:
        key = (r.task.name, tuple(str(v) for v in r.task.vocab), r.task.max_seq_len)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def default_input(task, seed=0):
    """A longest valid input, drawn reproducibly: every position has something to show."""
    samples = task.sample(200, seed)
    longest = max(len(s) for s in samples)
    return next(s for s in samples if len(s) == longest)


# ----------------------------------------------------------------------------------------------
# Drawing: one heatmap cell, a grid of them, and the general helper.


def heatmap(ax, arr, vmax, title=None, xlabels=None, ylabels=None, xticks=None):
    """arr [rows, cols] on a zero-centred colour scale of half-width vmax -> the image."""
    arr = torch.as_tensor(arr, dtype=torch.float32)
    if arr.ndim == 1:
        arr = arr[None]
    im = ax.imshow(arr.numpy(), cmap=CMAP, vmin=-vmax, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=8)
    fs = 7 if arr.shape[1] <= 24 else 5.5
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=fs)
    elif xticks is not None:  # [(position, text)] for ranges, e.g. an operation's hidden units
        ax.set_xticks([p for p, _ in xticks], [t for _, t in xticks], rotation=90, fontsize=6)
    else:
        ax.tick_params(axis="x", labelsize=6)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7)
    else:
        ax.tick_params(axis="y", labelsize=6)
    return im


def _vmax(arrays, skip_bos=False):
    """Half-width of a zero-centred scale; skip_bos sets it from the real positions (rows 1..):
    compiled MLPs reach ~80 at BOS and ~1 elsewhere, so BOS may saturate instead."""
    def top(a):
        a = torch.as_tensor(a).float()
        if skip_bos and a.ndim == 2 and a.shape[0] > 1 and a[1:].abs().max() > 0:
            a = a[1:]
        return float(a.abs().max())
    m = max((top(a) for a in arrays), default=0.0)
    return m if m > 0 else 1.0


def grid(rows, suptitle, cell_w=2.6, cell_h=2.0, fixed_vmax=None, per_cell=False,
         skip_bos=False):
    """rows: [(row title, [cell dict | None])], a cell dict holding heatmap's arguments ('arr',
    'title', 'xlabels', 'ylabels', 'xticks'). One subfigure per row with one colour bar shared
    along the row, or one per cell (per_cell: for cells whose scales differ by orders). Rows of
    more than MAX_COLS cells wrap onto further rows (a model with many heads stays readable)."""
    # One scale per model row, kept across its wrapped parts.
    rows = [(title if k == 0 else f"{title} (continued)", cells[k:k + MAX_COLS],
             fixed_vmax or _vmax([c["arr"] for c in cells if c is not None], skip_bos))
            for title, cells in rows for k in range(0, max(1, len(cells)), MAX_COLS)]
    ncols = max(1, max(len(cells) for _, cells, _ in rows))
    fig = plt.figure(figsize=(cell_w * ncols + 1.2, (cell_h + 0.45) * len(rows) + 0.5),
                     layout="constrained")
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sub, (row_title, cells, vmax) in zip(subfigs, rows):
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        im = None
        for ax, cell in zip(axes, cells + [None] * (ncols - len(cells))):
            if cell is None:
                ax.set_axis_off()
                continue
            im = heatmap(ax, vmax=_vmax([cell["arr"]], skip_bos) if per_cell else vmax, **cell)
            if per_cell:
                sub.colorbar(im, ax=ax, shrink=0.9, pad=0.02, aspect=25)
        if im is not None and not per_cell:
            sub.colorbar(im, ax=axes.tolist(), shrink=0.9, pad=0.01, aspect=30)
        sub.suptitle(row_title, fontsize=9, x=0.01, ha="left", fontweight="bold")
    fig.suptitle(suptitle, fontsize=10)
    return fig


def plot_named(name, entries, suptitle=None):
    """The same named activation from N models -> a figure with an (N x first dimension) grid.

    entries: [(row title, tensor)]. Size-1 dimensions are squeezed away; a 3-d result [K, A, B]
    gives K heatmaps [A, B] per row, a 2-d one a single heatmap, a 1-d one a single strip.
    Limitation: more than 3 dimensions after squeezing are flattened into the first.
    """
    rows = []
    for row_title, t in entries:
        t = torch.as_tensor(t).detach().float().squeeze()
        if t.ndim == 0:
            t = t.reshape(1, 1)
        if t.ndim > 3:
            t = t.reshape(-1, *t.shape[-2:])
        cells = [{"arr": t[k], "title": f"{name}[{k}]"} for k in range(t.shape[0])] \
            if t.ndim == 3 else [{"arr": t, "title": name}]
        rows.append((row_title, cells))
    widest = max(c["arr"].shape[-1] if c["arr"].ndim > 1 else 1 for _, cs in rows for c in cs)
    return grid(rows, suptitle or name, cell_w=min(6.0, max(2.4, 0.12 * widest)))


# ----------------------------------------------------------------------------------------------
# The figures of a task group. Each returns a figure or None (nothing to draw).


def _positions(run, seq):
    return ["BOS"] + [str(t) for t in seq]


def _block_text(run, layer, kind, head=None):
    """The RASP operation a compiled block computes (from meta['explain']), or ''."""
    if not run.explain:
        return ""
    if head is not None:
        for b in run.explain["blocks"]:
            if b["layer"] == layer and b["type"] == kind and b["head"] == head:
                return "unused" if b["op"] is None else _short(b, run.explain)
    return run.explain["titles"].get(f"blocks.{layer}.{kind}", "unused")


def _short(b, info):
    op = next(o for o in info["ops"] if o["label"] == b["op"])
    return f"{op['kind']} -> {op['label']}"


def fig_resid(runs, seq):
    rows = []
    for r in runs:
        names = ["embed"] + [f"blocks.{l}.{s}" for l in range(r.model.cfg.n_layers)
                             for s in ("resid_mid", "resid_post")]
        cells = []
        for n in names:
            layer, kind = (None, None) if n == "embed" else (int(n.split(".")[1]),
                                                             "attn" if "mid" in n else "mlp")
            title = "embedding" if n == "embed" else f"after layer {layer} {kind}"
            op = _block_text(r, layer, kind) if layer is not None else ""
            cells.append({"arr": r.cache[n], "title": title + (f"\n{op}" if op else ""),
                          "xlabels": r.labels, "ylabels": _positions(r, seq)})
        rows.append((r.title, cells))
    widest = max(r.model.cfg.d_model for r in runs)
    labelled = any(r.labels for r in runs)
    return grid(rows, f"{runs[0].task.name}: residual stream after each stage, input "
                f"'{' '.join(map(str, seq))}' (rows: positions; columns: residual dimensions; "
                "colour scale per row, set by the real positions: BOS may saturate)",
                cell_w=max(2.6, 0.085 * widest), cell_h=2.0 + (1.9 if labelled else 0.3),
                skip_bos=True)


def fig_attn(runs, seq):
    rows = []
    for r in runs:
        cells = []
        for l in range(r.model.cfg.n_layers):
            pattern = r.cache[f"blocks.{l}.attn.pattern"]  # [H, T, T]
            for h in range(pattern.shape[0]):
                op = _block_text(r, l, "attn", h)
                pos = _positions(r, seq)
                cells.append({"arr": pattern[h], "title": f"layer {l} head {h}" +
                              (f"\n{op}" if op else ""), "xlabels": pos, "ylabels": pos})
        rows.append((r.title + "   (rows: query position; columns: key position)", cells))
    return grid(rows, f"{runs[0].task.name}: attention patterns, input "
                f"'{' '.join(map(str, seq))}'", cell_w=2.3, cell_h=2.4, fixed_vmax=1.0)


def _hidden_ticks(run, layer):
    """Compiled MLPs: a tick at the middle of each operation's hidden units, named after it."""
    if not run.explain:
        return None
    ticks = []
    for b in run.explain["blocks"]:
        if b["layer"] == layer and b["type"] == "mlp" and b.get("hidden"):
            h = b["hidden"]
            ticks.append(((h[0] + h[-1]) / 2, b["op"] or "unused"))
    return ticks


def fig_mlp(runs, seq):
    rows = []
    for r in runs:
        cells = []
        for l in range(r.model.cfg.n_layers):
            op = _block_text(r, l, "mlp")
            cells.append({"arr": r.cache[f"blocks.{l}.mlp.hidden"], "ylabels": _positions(r, seq),
                          "title": f"layer {l} MLP hidden" + (f"\n{op}" if op else ""),
                          "xticks": _hidden_ticks(r, l)})
        rows.append((r.title + "   (rows: positions; columns: hidden units)", cells))
    widest = max(r.model.cfg.d_mlp for r in runs)
    labelled = any(r.explain for r in runs)
    return grid(rows, f"{runs[0].task.name}: MLP hidden activations, input "
                f"'{' '.join(map(str, seq))}' (one colour scale per cell, set by the real "
                "positions: BOS may saturate)",
                cell_w=max(3.0, min(6.0, 0.1 * widest)), cell_h=2.0 + (1.0 if labelled else 0.3),
                per_cell=True, skip_bos=True)


def _numeric_fields(rows, skip):
    fields = []
    for row in rows:
        for k, v in row.items():
            if k not in skip and k not in fields and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                fields.append(k)
    return fields


ACCURACY_WORDS = ("acc", "exact", "per_position", "correct")
SKIP_FIELDS = ("seconds", "time", "epoch")


def _panel(field):
    """Which panel a numeric field of a history or sweep row goes on (None: not plotted)."""
    if any(w in field for w in SKIP_FIELDS):
        return None
    if "loss" in field:
        return "loss"
    if any(w in field for w in ACCURACY_WORDS):
        return "accuracy"
    return "learning rate" if field in ("lr", "learning_rate") else "other"


def _curves(runs, key, x_of, xlabel, title):
    """Lines of the numeric fields of meta[key] (a list of dicts) on loss / accuracy / learning
    rate / other panels; one colour per run, one line style per field (a single run: one colour
    per field as well)."""
    have = [r for r in runs if isinstance(r.meta.get(key), list) and r.meta[key]
            and all(isinstance(row, dict) for row in r.meta[key])]
    if not have:
        return None
    panels = {"loss": [], "accuracy": [], "learning rate": [], "other": []}
    for i, r in enumerate(have):
        rows = r.meta[key]
        x = x_of(rows)
        fields = [f for f in _numeric_fields(rows, {x}) if _panel(f)]
        for f in fields:
            pts = [(row[x] if x else n, row[f]) for n, row in enumerate(rows) if f in row]
            j = sum(1 for line in panels[_panel(f)] if line[0] is r)  # line style within panel
            panels[_panel(f)].append((r, i, j, f, pts))
    panels = {k: v for k, v in panels.items() if v}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False,
                             layout="constrained")
    styles = ["-", "--", ":", "-."]
    for ax, (kind, lines) in zip(axes[0], panels.items()):
        for r, i, j, f, pts in lines:
            colour = f"C{(j if len(have) == 1 else i) % 10}"  # one run: a colour per field
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[j % 4], color=colour,
                    label=f"{r.name}: {f}", marker="o" if len(pts) < 15 else None, ms=3)
        if kind in ("loss", "learning rate") and all(p[1] > 0 for *_, pts in lines for p in pts):
            ax.set_yscale("log")
        if kind == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_title(kind, fontsize=9)
        ax.legend(fontsize=7, handlelength=3.5)  # long enough to show each line style
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


def fig_history(runs, seq):
    return _curves(runs, "history", lambda rows: "step" if "step" in rows[0] else None, "step",
                   f"{runs[0].task.name}: training history")


def fig_sweep(runs, seq):
    def x_of(rows):
        x = next((k for k in SWEEP_X if k in rows[0]), None)
        return x or (_numeric_fields(rows, set()) or [None])[0]
    have = [r for r in runs if isinstance(r.meta.get("sweep"), list) and r.meta["sweep"]]
    xlabel = x_of(have[0].meta["sweep"]) if have else ""
    return _curves(runs, "sweep", x_of, xlabel, f"{runs[0].task.name}: compression sweep")


def _llc_results(meta):
    """meta['llc'] as [(name, result dict)] whatever its shape (one, a list, a dict by name)."""
    llc = meta.get("llc")
    if isinstance(llc, dict) and "traces" in llc:
        return [("", llc)]
    if isinstance(llc, list):
        return [(str(i), d) for i, d in enumerate(llc) if isinstance(d, dict) and "traces" in d]
    if isinstance(llc, dict):
        return [(k, d) for k, d in llc.items() if isinstance(d, dict) and "traces" in d]
    return []


def fig_llc(runs, seq):
    panels = [(r, name, res) for r in runs for name, res in _llc_results(r.meta)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False,
                             layout="constrained")
    for ax, (r, name, res) in zip(axes[0], panels):
        traces = torch.as_tensor(res["traces"], dtype=torch.float32).reshape(
            -1, torch.as_tensor(res["traces"]).shape[-1])  # [chains, steps]
        for c, trace in enumerate(traces):
            ax.plot(trace.numpy(), lw=0.8, color=f"C{c % 10}", label=f"chain {c}")
        if res.get("init_loss") is not None:
            ax.axhline(float(res["init_loss"]), color="k", ls="--", lw=1, label="initial loss")
        mean, std = res.get("mean"), res.get("std")
        head = f"{r.name}{' ' + name if name else ''}"
        stat = f"LLC {float(mean):.3g} ± {float(std):.2g}" if mean is not None and std is not \
            None else ""
        ax.set_title(f"{r.kind}: {head}\n{stat}", fontsize=8)
        ax.set_xlabel("SGLD step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{runs[0].task.name}: SGLD loss traces of the LLC estimates", fontsize=10)
    return fig


def fig_graph(runs, seq):
    import explain
    have = [r for r in runs if r.explain and r.explain.get("ops")]
    if not have:
        return None
    return explain.draw_graph(have[0].explain)  # one program: every compiled run has one graph


NEEDS = {"history": lambda r: isinstance(r.meta.get("history"), list) and r.meta["history"],
         "sweep": lambda r: isinstance(r.meta.get("sweep"), list) and r.meta["sweep"],
         "llc": lambda r: _llc_results(r.meta), "graph": lambda r: r.explain and r.explain["ops"]}
DRAW = {"resid": fig_resid, "attn": fig_attn, "mlp": fig_mlp, "history": fig_history,
        "sweep": fig_sweep, "llc": fig_llc, "graph": fig_graph}


# ----------------------------------------------------------------------------------------------
# Command line.


def figure_path(out_dir, program, what, runs):
    models = "+".join(r.name for r in runs)
    if len(models) > 60:
        digest = hashlib.sha1(models.encode()).hexdigest()[:8]
        models = f"{len(runs)}runs-{digest}"
    return os.path.join(out_dir, f"{program}_{what}_{models}.png")



def main(argv=None):
    ap = model_lib.ArgParser(
        description="Figures from saved runs, N models side by side.")
    ap.add_argument("runs", nargs="+", help="run files, e.g. runs/*.pt")
    ap.add_argument("--input", help="one input for every model, tokens separated by spaces")
    ap.add_argument("--out", default="figures", help="folder for the PNGs (default figures/)")
    ap.add_argument("--what", help=f"comma-separated: {', '.join(FIGURES)} or a cache entry "
                    "name (default: every figure the runs allow)")
    ap.add_argument("--seed", type=int, default=0, help="draws the default input")
    ap.add_argument("--force", action="store_true", help="overwrite existing PNGs")
    args = ap.parse_args(argv)

    whats = FIGURES if args.what is None else [w.strip() for w in args.what.split(",")
                                               if w.strip()]
    for w in whats:
        if w not in FIGURES and not w.startswith(("embed", "blocks.")):
            print(f"error: --what {w!r} is unknown; allowed: {', '.join(FIGURES)} or a cache "
                  "entry such as blocks.0.attn.pattern", file=sys.stderr)
            return 1

    runs, errors = load_runs(args.runs)
    groups = group_by_task(runs)
    if len(groups) > 1:
        print(f"note: {len(groups)} tasks among the runs ("
              + "; ".join(f"{g[0].task.name}: {len(g)} run(s)" for g in groups)
              + "): one set of figures per task")
    written = []
    for g in groups:
        task = g[0].task
        try:
            seq = task.parse(args.input) if args.input is not None else default_input(task,
                                                                                      args.seed)
            task.validate(seq)
        except ValueError as e:
            errors.append(f"{task.name}: --input: {e}")
            continue
        for r in g:
            r.run_on(seq)
        for w in whats:
            # Figures from meta are named after the runs that have the entry.
            shown = [r for r in g if NEEDS[w](r)] if w in NEEDS else g
            if not shown:
                continue
            path = figure_path(args.out, task.name, w, shown)
            if os.path.exists(path) and not args.force:
                errors.append(f"{path} exists; pass --force to overwrite it")
                continue
            if w in DRAW:
                fig = DRAW[w](shown, seq)
            else:
                have = [r for r in g if w in r.cache]
                if not have:
                    errors.append(f"--what {w!r}: no such cache entry in {task.name}'s runs; "
                                  f"entries: {', '.join(g[0].cache)}")
                    continue
                if len(have) < len(g):  # e.g. a layer that only the deeper models have
                    print(f"note: {w} is drawn for {len(have)} of {len(g)} {task.name} runs")
                path = figure_path(args.out, task.name, w, have)
                if os.path.exists(path) and not args.force:
                    errors.append(f"{path} exists; pass --force to overwrite it")
                    continue
                fig = plot_named(w, [(r.title, r.cache[w]) for r in have],
                                 f"{task.name}: {w}, input '{' '.join(map(str, seq))}'")
            if fig is not None:
                model_lib.save_figure(fig, path)
                written.append(path)
    for e in errors:
        print(f"plot.py: {e}", file=sys.stderr)
    for p in written:
        print(p)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
