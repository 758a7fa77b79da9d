"""Regularize trained transformers toward compiled ones, and measure how compiled-like a model is.

    python regularize.py reverse --l1-weights 1e-4                 # L1 on every weight matrix
    python regularize.py sort --l2-weights 1e-3 --l1-acts mlp:all  # L2, plus L1 on MLP hidden units
    python regularize.py reverse --dropout 0.1 --dropout-samples 4 # neuron dropout, 4 masks a batch
    python regularize.py reverse --from-tracr --dropout 0.1        # tracr's model, dropout-proof
    python regularize.py reverse --sweep l1-weights                # strength -> accuracy, sparsity,
                                                                   # alignment; a figure in figures/

Compiled models are sparse and every residual direction means one thing; models trained from
scratch are dense. This file adds pressures to train.py's loop (through its `extra_loss` hook) and
one measure of the gap, `compiled_likeness`, that the sweep, plot.py and the report all call:

- sparsity: the fraction of weight-matrix entries (W_*, no biases) with |w| below
  threshold * max |w|, and how many are above it;
- firing: how many MLP units and attention heads ever write more than fire_threshold * the largest
  residual entry into the residual stream, over every input;
- alignment: per residual stage (embed, resid_mid, resid_post of each layer), the R^2 of the
  least-squares affine map from this model's residual stream to the compiled model's, pooled over
  every real position of every input:
      R^2 = 1 - sum ||Y - [X 1] A||^2 / sum ||Y - mean(Y)||^2,   A = argmin of the numerator.
  It is 1.0 for the compiled model against itself and below 1.0 where the compiled model's
  features cannot be read linearly from this one.

Penalties (added to the task loss at every step):
    --l1-weights a:   a * sum_W sum |W_ij|        over every weight matrix, biases excluded
    --l2-weights a:   a * sum_W sum W_ij^2
    --l1-acts SITE:LAYERS with --l1-acts-strength a:
                      a * mean over real positions of sum_d |act_d|, summed over the chosen
                      activations: SITE resid | mlp | both, LAYERS all | last
Dropout (--dropout p) is model.Config.dropout: model.py drops attention-block outputs and MLP hidden
units in training mode only. --dropout-samples K averages the loss over K dropout masks of each
batch (see DropoutSamples). --from-tracr starts from the compiled weights plus Gaussian noise of
std --init-noise (0.01): tracr leaves most residual directions unused, and a direction that no
weight writes or reads gets no gradient, so without noise no redundant copy can ever grow.
Training runs train.py's loop without early stopping by default (a penalty needs steps after the
task is solved to prune), AdamW with train.py's weight decay (none with --from-tracr).

Limitation: with Adam, an L1 penalty does not make weights exactly zero; they hover near zero at
about the learning rate. The sparsity measure therefore counts weights below a fraction
(THRESHOLD) of the largest, not exact zeros. tracr's largest weights are 100 (attention softness),
so its threshold is 1.0 and every non-zero compiled weight counts as above it.

References: Lindner et al. 2023 (tracr); Srivastava et al. 2014 (dropout); Tibshirani 1996 (L1).
"""

import math
import os
import sys
from dataclasses import replace

import numpy as np
import torch

import model as model_lib
import train as train_lib
import tracr_load as tl

THRESHOLD = 1e-2  # a weight counts as zero below this fraction of the largest |w|
FIRE_THRESHOLD = 1e-2  # a unit fires if it writes more than this fraction of max |resid|
ACT_SITES = ("resid", "mlp", "both")
ACT_LAYERS = ("all", "last")
SWEEPS = {  # what --sweep varies -> the strengths it runs (0 = the plain trained model)
    "l1-weights": [0.0, 3e-5, 1e-4, 1e-3],
    "l2-weights": [0.0, 1e-4, 1e-3, 1e-2, 3e-2],
    "l1-acts": [0.0, 1e-4, 1e-3, 1e-2],
    "dropout": [0.0, 0.05, 0.1, 0.2],
}


# ----------------------------------------------------------------------------------------------
# Penalties


def weight_matrices(model):
    """[(name, parameter)] of every weight matrix (W_E, W_pos, W_Q, ..., W_U); biases excluded."""
    return [(n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("W_")]


def l1_weights(model):
    """sum over weight matrices of sum |W_ij| (a scalar tensor with gradient)."""
    return sum(p.abs().sum() for _, p in weight_matrices(model))


def l2_weights(model):
    """sum over weight matrices of sum W_ij^2."""
    return sum(p.pow(2).sum() for _, p in weight_matrices(model))


def parse_acts(text):
    """'mlp:last' -> ('mlp', 'last'); a site alone means all layers."""
    site, _, layers = text.partition(":")
    layers = layers or "all"
    if site not in ACT_SITES or layers not in ACT_LAYERS:
        raise ValueError(f"--l1-acts {text!r}: allowed are SITE[:LAYERS] with SITE one of "
                         f"{', '.join(ACT_SITES)} and LAYERS one of {', '.join(ACT_LAYERS)}")
    return site, layers


def activation_names(n_layers, site, layers):
    """Cache names the activation penalty reads: resid_post and/or mlp.hidden per chosen layer."""
    chosen = range(n_layers) if layers == "all" else [n_layers - 1]
    names = []
    for layer in chosen:
        if site in ("resid", "both"):
            names.append(f"blocks.{layer}.resid_post")
        if site in ("mlp", "both"):
            names.append(f"blocks.{layer}.mlp.hidden")
    return names


def l1_acts(cache, mask, names):
    """sum over names of the mean over real positions (mask True) of sum_d |act_d|."""
    total = 0.0
    w = mask.to(torch.float32)  # [B, T]
    for name in names:
        per_pos = cache[name].abs().sum(-1)  # [B, T]
        total = total + (per_pos * w).sum() / w.sum()
    return total


# ----------------------------------------------------------------------------------------------
# How compiled-like is a model?


def residual_stages(n_layers):
    names = ["embed"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.resid_mid", f"blocks.{layer}.resid_post"]
    return names


def head_outputs(model, cache, layer):
    """[B, H, T, D]: what each head of a layer writes into the residual stream (b_O excluded)."""
    block = model.blocks[layer]
    resid_pre = cache["embed"] if layer == 0 else cache[f"blocks.{layer - 1}.resid_post"]
    x = block.ln1(resid_pre)  # [B, T, D]
    attn = block.attn
    v = torch.einsum("btd,hde->bhte", x, attn.W_V) + attn.b_V[None, :, None, :]  # [B, H, T, E]
    z = cache[f"blocks.{layer}.attn.pattern"] @ v  # [B, H, T, E]
    return torch.einsum("bhte,hed->bhtd", z, attn.W_O)  # [B, H, T, D]


def _stream(model, task, inputs, batch_size=1024):
    """Run inputs in eval mode; per cache entry we need, the rows of real positions only."""
    was_training = model.training
    model.eval()
    L = model.cfg.n_layers
    rows = {}  # name -> list of [N_chunk, ...] arrays

    def add(name, t):
        rows.setdefault(name, []).append(t.detach().to(torch.float64).cpu())

    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            tokens, mask = task.encode(inputs[start:start + batch_size])
            device = next(model.parameters()).device
            tokens, mask = tokens.to(device), mask.to(device)
            _, cache = model.run_with_cache(tokens, mask)
            for name in residual_stages(L):
                add(name, cache[name][mask])  # [N, D]
            for layer in range(L):
                add(f"blocks.{layer}.mlp.hidden", cache[f"blocks.{layer}.mlp.hidden"][mask])
                heads = head_outputs(model, cache, layer).permute(0, 2, 1, 3)  # [B, T, H, D]
                add(f"blocks.{layer}.heads", heads[mask])  # [N, H, D]
    model.train(was_training)
    return {k: torch.cat(v) for k, v in rows.items()}


def r2_affine(X, Y):
    """R^2 of the least-squares affine map X [N, D] -> Y [N, D'] (float64), pooled over D'."""
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)  # [N, D + 1]
    A = torch.linalg.lstsq(X1, Y, driver="gelsd").solution  # [D + 1, D']
    ss_res = (Y - X1 @ A).pow(2).sum().item()
    ss_tot = (Y - Y.mean(0)).pow(2).sum().item()
    if ss_tot == 0.0:  # a constant target: any model explains it exactly
        return 1.0
    return 1.0 - ss_res / ss_tot


def eval_inputs(task, n_sample=2000, seed=0):
    """Every input where the space is small enough, else a fixed sample."""
    return task.all_inputs() if task.n_inputs() <= 20_000 else task.sample(n_sample, seed)


def compiled_likeness(model, task, compiled_model=None, inputs=None, threshold=THRESHOLD,
                      fire_threshold=FIRE_THRESHOLD):
    """How compiled-like a model is. Returns a dict of plain numbers and lists:

    weights_total, weights_above (|w| >= threshold * max |w| over weight matrices),
    sparsity (fraction below), mlp_fire [per layer], heads_fire [per layer], mlp_units,
    heads (totals), r2 {stage: R^2 against compiled_model}, r2_mean (mean over stages after the
    embedding). compiled_model None: tracr's compile of task (library programs only; alignment is
    skipped, r2 = {}, when the task has no program to compile).
    """
    if threshold < 0 or fire_threshold < 0:
        raise ValueError(f"threshold={threshold}, fire_threshold={fire_threshold}: "
                         "must be >= 0")
    inputs = eval_inputs(task) if inputs is None else inputs
    out = {"threshold": threshold, "fire_threshold": fire_threshold}

    # Sparsity of weight matrices.
    with torch.no_grad():
        flat = torch.cat([p.detach().abs().flatten().cpu() for _, p in weight_matrices(model)])
        top = flat.max().item()
        above = int((flat >= threshold * top).sum()) if top > 0 else 0
    out.update(weights_total=flat.numel(), weights_above=above,
               sparsity=1.0 - above / flat.numel())

    # Firing: a unit fires if it ever writes more than fire_threshold * max |resid|.
    rows = _stream(model, task, inputs)
    L = model.cfg.n_layers
    scale = max(rows[n].abs().max().item() for n in residual_stages(L))
    mlp_fire, heads_fire = [], []
    for layer in range(L):
        W_out = model.blocks[layer].mlp.W_out.detach().to(torch.float64).cpu()  # [M, D]
        act = rows[f"blocks.{layer}.mlp.hidden"].abs().max(0).values  # [M]
        written = act * W_out.abs().max(1).values  # [M]
        mlp_fire.append(int((written > fire_threshold * scale).sum()))
        heads = rows[f"blocks.{layer}.heads"].abs().amax(dim=(0, 2))  # [H]
        heads_fire.append(int((heads > fire_threshold * scale).sum()))
    out.update(mlp_fire=mlp_fire, heads_fire=heads_fire, mlp_units=sum(mlp_fire),
               heads=sum(heads_fire), resid_scale=scale)

    # Alignment with the compiled model's residual stream.
    if compiled_model is None and task.settings is not None and task.name in tl.PROGRAMS:
        compiled_model, _ = tl.load_program(task.name, **_overrides(task))
    r2 = {}
    if compiled_model is not None:
        ref = _stream(compiled_model, task, inputs)
        # Limitation: stages are matched by name, so a model with fewer layers than the compiled
        # one is only compared on the stages both have.
        for name in residual_stages(min(L, compiled_model.cfg.n_layers)):
            r2[name] = r2_affine(rows[name], ref[name])
    out["r2"] = r2
    later = [v for k, v in r2.items() if k != "embed"]
    out["r2_mean"] = float(np.mean(later)) if later else float("nan")
    return out


def _overrides(task):
    """The settings that rebuild a library task's compiled model."""
    s = dict(task.settings)
    s["vocab"] = tuple(s["vocab"])
    return s


# ----------------------------------------------------------------------------------------------
# Dropout


def dropout_accuracy(model, task, inputs, samples=20, seed=0):
    """Exact match with dropout on (training mode), over `samples` independent dropout draws.

    Returns dict(mean=mean over draws of the fraction of inputs all right, worst=the lowest
    draw, always=fraction of inputs right in every draw, samples=samples, p=cfg.dropout).
    """
    data = inputs if isinstance(inputs, train_lib.Data) else train_lib.Data(
        task, inputs, train_lib._device(model))
    was_training = model.training
    model.train()
    per_draw, always = [], torch.ones(len(data), dtype=torch.bool)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(samples):
            out = model(data.tokens, data.mask)  # [N, T, O]
            right = train_lib._right(out, task, data.y, data.valid).all(1).cpu()  # [N]
            per_draw.append(right.float().mean().item())
            always &= right
    model.train(was_training)
    return {"mean": float(np.mean(per_draw)), "worst": min(per_draw),
            "always": always.float().mean().item(), "samples": samples,
            "p": model.cfg.dropout}


class DropoutSamples:
    """The extra loss that turns train.py's one-mask loss into the mean over K dropout masks.

    train.py's step computes L_1 = loss(batch, mask 1) and adds extra_loss. This returns
        (1/K) sum_{k=2..K} L_k  -  ((K-1)/K) L_1,
    so the total is (1/K) sum_k L_k, gradient included. L_1 is recomputed from the same forward
    pass's cache (the last resid_post, then ln_final and W_U), so it is the same graph, not a new
    dropout draw. Targets of a batch are found by its token rows (train.py passes tokens only).
    """

    def __init__(self, task, train_inputs, k, label_smoothing=0.0, device="cpu"):
        if k < 1:
            raise ValueError(f"--dropout-samples {k}: must be >= 1")
        self.task, self.k, self.ls = task, k, label_smoothing
        self.data = train_inputs if isinstance(train_inputs, train_lib.Data) else \
            train_lib.Data(task, train_inputs, device)
        self.row = {tuple(t.tolist()): i for i, t in enumerate(self.data.tokens)}

    def __call__(self, model, cache, tokens, mask):
        if self.k == 1:
            return tokens.new_zeros((), dtype=torch.float32)
        idx = torch.tensor([self.row[tuple(t.tolist())] for t in tokens])
        _, _, y, valid = self.data.batch(idx.to(tokens.device))  # [B, T] each
        L = model.cfg.n_layers
        out1 = model.ln_final(cache[f"blocks.{L - 1}.resid_post"]) @ model.W_U + model.b_U
        loss1 = train_lib._loss(out1, self.task, y, valid, self.ls)
        r = self.k - 1
        more = train_lib.loss_fn(model, self.task, tokens.repeat(r, 1), mask.repeat(r, 1),
                                 y.repeat(r, 1), valid.repeat(r, 1), None, self.ls)
        # `more` is the mean over the K-1 extra draws (equal numbers of valid positions each).
        return (r / self.k) * more - (r / self.k) * loss1


# ----------------------------------------------------------------------------------------------
# One regularized run


def make_extra_loss(task, train_inputs, cfg, l1_weights_a=0.0, l2_weights_a=0.0, acts=None,
                    l1_acts_a=0.0, dropout_samples=1):
    """extra_loss(model, cache, tokens, mask) for train.train, or None when nothing is asked."""
    samples = DropoutSamples(task, train_inputs, dropout_samples, device=cfg.device) \
        if dropout_samples > 1 else None
    if not (l1_weights_a or l2_weights_a or (acts and l1_acts_a) or samples):
        return None

    def extra(model, cache, tokens, mask):
        total = tokens.new_zeros((), dtype=torch.float32)
        if l1_weights_a:
            total = total + l1_weights_a * l1_weights(model)
        if l2_weights_a:
            total = total + l2_weights_a * l2_weights(model)
        if acts and l1_acts_a:
            total = total + l1_acts_a * l1_acts(
                cache, mask, activation_names(model.cfg.n_layers, *acts))
        if samples is not None:
            total = total + samples(model, cache, tokens, mask)
        return total
    return extra


def run_name(reg):
    """<what> of runs/P_regularized_<what>.pt: every setting that is on, e.g. l1-weights-0.0001."""
    parts = ["from-tracr"] if reg.get("from_tracr") else []
    for key in ("l1_weights", "l2_weights", "l1_acts_strength", "dropout"):
        if reg.get(key):
            name = key.replace("_", "-")
            if key == "l1_acts_strength":
                name = "l1-acts-" + reg["l1_acts"].replace(":", "-")
            parts.append(f"{name}-{reg[key]:g}")
    if reg.get("dropout") and reg.get("dropout_samples", 1) > 1:
        parts.append(f"x{reg['dropout_samples']}")
    return "_".join(parts) or "none"


def default_reg(**changes):
    reg = {"l1_weights": 0.0, "l2_weights": 0.0, "l1_acts": None, "l1_acts_strength": 0.0,
           "dropout": 0.0, "dropout_samples": 1, "from_tracr": False, "init_noise": 0.0}
    unknown = set(changes) - set(reg)
    if unknown:
        raise ValueError(f"unknown regularization setting(s) {sorted(unknown)}; "
                         f"allowed: {', '.join(reg)}")
    reg.update(changes)
    for key in ("l1_weights", "l2_weights", "l1_acts_strength"):
        if not reg[key] >= 0 or not math.isfinite(reg[key]):
            raise ValueError(f"--{key.replace('_', '-')} {reg[key]}: must be a number >= 0")
    if not reg["init_noise"] >= 0 or not math.isfinite(reg["init_noise"]):
        raise ValueError(f"--init-noise {reg['init_noise']}: must be a number >= 0")
    if reg["init_noise"] and not reg["from_tracr"]:
        raise ValueError("--init-noise perturbs the compiled weights: it needs --from-tracr")
    if not 0 <= reg["dropout"] < 1:
        raise ValueError(f"--dropout {reg['dropout']}: must be in [0, 1)")
    if reg["l1_acts"] is not None:
        parse_acts(reg["l1_acts"])
    if not reg["l1_acts_strength"]:
        reg["l1_acts"] = None  # no penalty: the site does not matter (and names no run)
    elif reg["l1_acts"] is None:
        reg["l1_acts"] = "both:all"
    if reg["from_tracr"] and not reg["dropout"]:
        raise ValueError("--from-tracr trains the compiled model under dropout: give --dropout P "
                         "with 0 < P < 1")
    return reg


def regularized_run(program, reg, cfg, out=None, progress=True, compiled=None, task=None):
    """Train one model of the compiled shape under the settings reg (see default_reg).

    From scratch (train.model_like, seeded) or, with reg['from_tracr'], from the compiled weights.
    Returns (model, task, meta); writes out (kind 'regularized') when given.
    """
    if compiled is None:
        compiled, task = tl.load_program(program)
    base = replace(compiled.cfg, dropout=reg["dropout"])
    everything = eval_inputs(task)
    train_inputs, heldout_inputs = train_lib.split(task, cfg.seed, cfg.holdout)
    # Targets come from RASP's evaluator, slow in Python: encode each set once.
    data_tr, data_ho, data_all = (train_lib.Data(task, x, cfg.device)
                                  for x in (train_inputs, heldout_inputs, everything))
    meta = {"program": program, "regularization": dict(reg), "split_seed": cfg.seed,
            "n_train": len(train_inputs), "n_heldout": len(heldout_inputs)}
    if reg["from_tracr"]:
        model = model_lib.Transformer(base)
        model.load_state_dict(compiled.state_dict())
        meta["dropout_before"] = dropout_accuracy(model, task, data_all, seed=cfg.seed)
        # tracr's zeros are a saddle (see the docstring); the noise breaks it.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for _, p in weight_matrices(model):
                p.add_(reg["init_noise"] * torch.randn_like(p))
    else:
        model = train_lib.model_like(task, base, seed=cfg.seed)
    acts = parse_acts(reg["l1_acts"]) if reg["l1_acts"] else None
    extra = make_extra_loss(task, data_tr, cfg, reg["l1_weights"], reg["l2_weights"], acts,
                            reg["l1_acts_strength"], reg["dropout_samples"])

    history = train_lib.train(model, task, train_inputs, heldout_inputs, cfg, extra_loss=extra,
                              out=out, progress=progress, meta=meta)
    model.eval()
    meta["train_config"] = train_lib._plain(cfg)
    meta["history"] = history
    meta["train_exact"] = train_lib.evaluate(model, task, data_tr)["exact"]
    meta["heldout_exact"] = train_lib.evaluate(model, task, data_ho)["exact"]
    meta["all_exact"] = train_lib.evaluate(model, task, data_all)["exact"]
    if reg["dropout"]:
        meta["dropout_after"] = dropout_accuracy(model, task, data_all, seed=cfg.seed)
        meta["dropout_after_heldout"] = dropout_accuracy(model, task, data_ho,
                                                         seed=cfg.seed)
    meta["likeness"] = compiled_likeness(model, task, compiled, everything)
    if out is not None:  # train.py writes kind 'trained' while it runs; the final file is ours
        model_lib.save(out, model, task, "regularized", **meta)
    return model, task, meta


# ----------------------------------------------------------------------------------------------
# Sweeps


def sweep_key(what):
    return {"l1-weights": "l1_weights", "l2-weights": "l2_weights", "l1-acts": "l1_acts_strength",
            "dropout": "dropout"}[what]


def summary_row(strength, meta):
    """One line of the sweep table, from a run's meta."""
    L = meta["likeness"]
    row = {"strength": strength, "heldout_exact": meta["heldout_exact"],
           "train_exact": meta["train_exact"], "weights_above": L["weights_above"],
           "weights_total": L["weights_total"], "sparsity": L["sparsity"],
           "mlp_units": L["mlp_units"], "heads": L["heads"], "r2": L["r2"],
           "r2_mean": L["r2_mean"]}
    if "dropout_after" in meta:
        row["dropout_before"] = meta.get("dropout_before", {}).get("mean", float("nan"))
        row["dropout_exact"] = meta["dropout_after"]["mean"]
    return row


def run_sweep(program, what, strengths, reg, cfg, force=False, progress=True, runs_dir="runs"):
    """One regularized run per strength of `what`; returns the table rows (summary_row dicts).
    A run file that already holds the same settings is read back instead of trained again."""
    if what not in SWEEPS:
        raise ValueError(f"--sweep {what!r}: allowed are {', '.join(SWEEPS)}")
    key = sweep_key(what)
    compiled, task = tl.load_program(program)
    site = reg["l1_acts"] or "both:all"
    rows = []
    for a in strengths:
        r = dict(reg, **{key: a})
        if what == "l1-acts":
            r["l1_acts"] = site if a else None
        r = default_reg(**r)
        path = os.path.join(runs_dir, f"{program}_regularized_{run_name(r)}.pt")
        meta = None
        if os.path.exists(path) and not force:
            _, _, meta = model_lib.load(path)
            saved = dict(default_reg(), **meta.get("regularization", {}))
            now, then = train_lib._plain(cfg), meta.get("train_config", {})
            same_cfg = all(now[k] == v for k, v in then.items() if k in now)  # fields may grow
            if saved != r or not same_cfg or meta.get("kind") != "regularized":
                raise ValueError(f"{path} exists with other settings; pass --force to "
                                 "overwrite it")
            print(f"{program}: reusing {path}")
        if meta is None:
            _, _, meta = regularized_run(program, r, cfg, path, progress, compiled, task)
        rows.append(summary_row(a, meta))
        print(format_row(rows[-1], len(rows) == 1), flush=True)
    return rows


def format_row(row, header=False):
    """A fixed-width table line (with the header line first when header)."""
    stages = [k for k in row["r2"] if k.endswith("resid_post")]
    cols = ["strength", "held-out", "train", "W above", "sparsity", "MLP", "heads"] + \
        [f"R2 L{k.split('.')[1]}" for k in stages] + ["R2 mean"]
    strength = "-" if math.isnan(row["strength"]) else f"{row['strength']:g}"
    cells = [strength, f"{row['heldout_exact']:.3f}", f"{row['train_exact']:.3f}",
             f"{row['weights_above']}", f"{row['sparsity']:.4f}", f"{row['mlp_units']}",
             f"{row['heads']}"] + [f"{row['r2'][k]:.3f}" for k in stages] + \
        [f"{row['r2_mean']:.3f}"]
    if "dropout_exact" in row:
        cols += ["drop before", "drop after"]
        cells += [f"{row['dropout_before']:.4f}", f"{row['dropout_exact']:.4f}"]
    line = " | ".join(c.rjust(8) for c in cells)
    if header:
        return " | ".join(c.rjust(8) for c in cols) + "\n" + line
    return line


def plot_sweep(program, what, rows, path):
    """Held-out accuracy, weights above threshold and R^2 per layer against strength."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["strength"] for r in rows]
    nonzero = [v for v in x if v > 0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax in axes:
        if nonzero:
            ax.set_xscale("symlog", linthresh=min(nonzero))
        ax.set_xlabel(f"{what} strength")
        ax.grid(alpha=0.3)
    axes[0].plot(x, [r["heldout_exact"] for r in rows], "o-", label="held-out exact")
    axes[0].plot(x, [r["train_exact"] for r in rows], "s--", label="train exact")
    if "dropout_exact" in rows[0]:
        axes[0].plot(x, [r["dropout_exact"] for r in rows], "^:", label="all, dropout on")
        if not all(math.isnan(r["dropout_before"]) for r in rows):
            axes[0].plot(x, [r["dropout_before"] for r in rows], "v:",
                         label="all, dropout on, before")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_title(f"{program}: accuracy")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [r["weights_above"] for r in rows], "o-")
    axes[1].set_yscale("log")
    axes[1].set_title(f"weights >= {THRESHOLD:g} max|w| (of {rows[0]['weights_total']})")
    for stage in rows[0]["r2"]:
        if stage == "embed" or stage.endswith("resid_post"):
            axes[2].plot(x, [r["r2"][stage] for r in rows], "o-",
                         label=stage.replace("blocks.", "L").replace(".resid_post", " post"))
    axes[2].set_title("R^2 to the compiled residual stream")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    model_lib.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------------------------
# Bench rows (bench.py calls this)


def bench(programs=("reverse", "sort"), runs_dir="runs"):
    """Rows from the run files of `make regularize` (those present) and one measured now:
    how many weights are above threshold in a fresh model against the compiled one."""
    import glob
    import re
    rows = []
    compiled, task = tl.load_program(programs[0])
    fresh = train_lib.model_like(task, compiled.cfg, seed=0)
    a = compiled_likeness(fresh, task, compiled)
    b = compiled_likeness(compiled, task, compiled)
    rows.append({"name": f"regularize {programs[0]}: weights above threshold, fresh init / "
                 "compiled", "fresh": a["weights_above"], "compiled": b["weights_above"],
                 "ratio": a["weights_above"] / b["weights_above"], "r2_mean_fresh": a["r2_mean"]})
    for p in programs:
        runs = []
        for path in sorted(glob.glob(os.path.join(runs_dir, f"{p}_regularized_*.pt"))):
            run = model_lib.read_run(path)
            if run["kind"] == "regularized":  # not a run still in train.py's hands
                runs.append((path, run["meta"]))
        plain = [m for path, m in runs if path.endswith("_regularized_none.pt")]
        l1 = [m for _, m in runs if re.fullmatch(r"l1-weights-[0-9.e+-]+",
                                                 run_name(m["regularization"]))
              and m["heldout_exact"] == 1.0]
        if plain and l1:
            best = min(l1, key=lambda m: m["likeness"]["weights_above"])
            n0, n1 = plain[0]["likeness"]["weights_above"], best["likeness"]["weights_above"]
            rows.append({"name": f"regularize {p}: weights above threshold, plain / sparsest "
                         "L1 run at 100% held-out", "plain": n0, "l1": n1, "ratio": n0 / n1,
                         "l1_weights": best["regularization"]["l1_weights"],
                         "r2_mean_plain": plain[0]["likeness"]["r2_mean"],
                         "r2_mean_l1": best["likeness"]["r2_mean"]})
        for path, m in runs:
            if m["regularization"].get("from_tracr"):
                rows.append({"name": f"regularize {p}: compiled model, exact match with dropout "
                             f"on, before -> after training ({os.path.basename(path)})",
                             "before": m["dropout_before"]["mean"],
                             "after": m["dropout_after"]["mean"],
                             "after_worst": m["dropout_after"]["worst"],
                             "eval_exact": m["all_exact"]})
    return rows


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser():
    ap = model_lib.ArgParser(
        description="Train under penalties or dropout; measure compiled-likeness.")
    ap.add_argument("program", help="a tracr_load program, e.g. reverse, sort")
    ap.add_argument("--l1-weights", type=float, default=0.0, help="strength a of a*sum|W|")
    ap.add_argument("--l2-weights", type=float, default=0.0, help="strength a of a*sum W^2")
    ap.add_argument("--l1-acts", metavar="SITE[:LAYERS]",
                    help="L1 on activations: SITE resid|mlp|both, LAYERS all|last")
    ap.add_argument("--l1-acts-strength", type=float, default=None,
                    help="strength of --l1-acts (default 1e-3)")
    ap.add_argument("--dropout", type=float, default=0.0, help="neuron dropout probability")
    ap.add_argument("--dropout-samples", type=int, default=1, help="dropout masks per batch")
    ap.add_argument("--from-tracr", action="store_true",
                    help="start from the compiled weights (needs --dropout)")
    ap.add_argument("--init-noise", type=float, default=None,
                    help="--from-tracr: std of noise added to every weight (default 0.01)")
    ap.add_argument("--sweep", choices=list(SWEEPS), help="run a range of strengths")
    ap.add_argument("--strengths", help="the sweep's strengths, e.g. '0 1e-4 1e-3'")
    d = train_lib.TrainConfig()
    ap.add_argument("--seed", type=int, default=d.seed, help="init, batch order and split")
    ap.add_argument("--steps", type=int, help="default 3000 (1000 with --from-tracr)")
    ap.add_argument("--lr", type=float, default=None, help="default 3e-3")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--weight-decay", type=float,
                    help=f"AdamW decay, default {d.weight_decay} (0 with --from-tracr)")
    ap.add_argument("--early-stop", action="store_true",
                    help="stop at 100%% held-out (off by default: penalties need time to act)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="run file (default runs/PROGRAM_regularized_<what>.pt)")
    ap.add_argument("--figure", help="sweep figure (default figures/PROGRAM_sweep_<what>.png)")
    ap.add_argument("--force", action="store_true", help="overwrite existing run files")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or eval lines")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        model_lib.check_device(args.device)
        tl.program_spec(args.program)
        if args.l1_acts is not None and args.l1_acts_strength is None:
            args.l1_acts_strength = 1e-3
        strengths = SWEEPS.get(args.sweep, [])
        if args.strengths:
            try:
                strengths = [float(s) for s in args.strengths.replace(",", " ").split()]
            except ValueError:
                raise ValueError(f"--strengths {args.strengths!r}: give numbers, "
                                 "e.g. '0 1e-4 1e-3'") from None
        if args.sweep == "dropout" and args.from_tracr:
            strengths = [p for p in strengths if p > 0]  # the compiled model itself is p = 0
        dropout = args.dropout
        if args.sweep == "dropout" and strengths:
            dropout = max(strengths)  # only to validate the settings; each run sets its own
        reg = default_reg(l1_weights=args.l1_weights, l2_weights=args.l2_weights,
                          l1_acts=args.l1_acts, l1_acts_strength=args.l1_acts_strength or 0.0,
                          dropout=dropout, dropout_samples=args.dropout_samples,
                          from_tracr=args.from_tracr,
                          init_noise=(0.01 if args.from_tracr else 0.0) if args.init_noise is None
                          else args.init_noise)
        if args.dropout_samples < 1:
            raise ValueError(f"--dropout-samples {args.dropout_samples}: must be >= 1")
        ft = args.from_tracr
        cfg = train_lib.TrainConfig(
            steps=args.steps or (1000 if ft else 3000), lr=args.lr or 3e-3,
            batch_size=args.batch_size, seed=args.seed,
            weight_decay=args.weight_decay if args.weight_decay is not None else
            (0.0 if ft else train_lib.TrainConfig().weight_decay),
            early_stop=args.early_stop, device=args.device, eval_every=100)
        torch.use_deterministic_algorithms(True)

        if args.sweep:
            if args.out:
                raise ValueError("--out names one run; a sweep writes "
                                 "runs/PROGRAM_regularized_<what>.pt for each strength")
            if not strengths:
                raise ValueError("--strengths: give at least one strength")
            rows = run_sweep(args.program, args.sweep, strengths, reg, cfg, args.force,
                             not args.quiet)
            what = ("from-tracr_" if args.from_tracr else "") + args.sweep
            fig = args.figure or os.path.join("figures", f"{args.program}_sweep_{what}.png")
            plot_sweep(args.program, args.sweep, rows, fig)
            print(f"wrote {fig}")
            return 0

        out = args.out or os.path.join("runs", f"{args.program}_regularized_{run_name(reg)}.pt")
        if os.path.exists(out) and not args.force:
            raise ValueError(f"{out} exists; pass --force to overwrite it")
        _, _, meta = regularized_run(args.program, reg, cfg, out, not args.quiet)
        print(format_row(summary_row(float("nan"), meta), header=True))  # strength: none
        for when in ("before", "after"):
            if f"dropout_{when}" in meta:
                d = meta[f"dropout_{when}"]
                print(f"dropout {d['p']:g} on, {when} training: exact {d['mean']:.4f} "
                      f"(worst of {d['samples']} draws {d['worst']:.4f}; right in every draw "
                      f"{d['always']:.4f})")
        print(f"wrote {out}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except train_lib.Diverged as e:
        print(f"error: diverged: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
