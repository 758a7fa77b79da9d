"""Regularize trained transformers toward compiled ones, and measure how compiled-like a model is.

    python regularize.py reverse --l1-weights 1e-4                 # L1 on every weight matrix
    python regularize.py sort --l2-weights 1e-3 --l1-acts mlp:all  # L2, plus L1 on MLP hidden units
    python regularize.py reverse --dropout 0.1 --dropout-samples 4 # neuron dropout, 4 masks a batch
    python regularize.py reverse --from-tracr --dropout 0.1        # make tracr's model dropout-proof
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
batch (see DropoutSamples).

References: Lindner et al. 2023 (tracr); Srivastava et al. 2014 (dropout); Tibshirani 1996 (L1).
"""

import argparse
import math
import os
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

import model as model_lib
import tracr_load as tl

THRESHOLD = 1e-2  # a weight counts as zero below this fraction of the largest |w|
FIRE_THRESHOLD = 1e-2  # a unit fires if it writes more than this fraction of max |resid|
ACT_SITES = ("resid", "mlp", "both")
ACT_LAYERS = ("all", "last")
SWEEPS = {  # what --sweep varies -> the strengths it runs (0 = the plain trained model)
    "l1-weights": [0.0, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
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
