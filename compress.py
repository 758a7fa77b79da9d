"""Shrink a compiled model's residual stream (projection, relearn), or grow a trained one (expand).

    python compress.py frac_prevs --method projection --dims 8,6,5,4
    python compress.py reverse --method relearn --find-min
    python compress.py sort --method expand --dims 8
    python compress.py --table reverse sort hist    # find-min for each, then the summary table

References: Lindner et al. 2023, "Tracr: Compiled Transformers as a Laboratory for
Interpretability", section 5 (a learned linear compression of the residual stream); tracr's
`compressed_model.py` is the forward pass this file reproduces (tracr ships no training code).

Methods, for a compiled model with residual width D and a target width d < D:
- projection: the compiled weights stay frozen and one matrix W [d, D] is learned. The residual
  stream lives in d dimensions; every block reads x @ W and writes out @ W.T, so the compressed
  model is itself a Transformer of d_model = d with
      W_E' = W_E @ W.T,  W_pos' = W_pos @ W.T,  W_{Q,K,V}' = W @ W_{Q,K,V},  W_O' = W_O @ W.T,
      W_in' = W @ W_in,  W_out' = W_out @ W.T,  W_U' = W @ W_U   (biases written through W.T).
  Loss = output MSE against the compiled model
         + layer_weight * mean over blocks of |block_D(x_d @ W) - block_D(x_D)|^2  (tracr's layer
           loss: each block's own output, before it is written down through W.T)
         + score_weight * mean |attention score - compiled attention score|^2  (optional, off by
           default: at 0.01 it made frac_prevs worse in our trials).
  Initialisation decides whether this works. tracr's attention scores are large (100 per
  matching key), and with W ~ N(0, 1/d) the read-back x_d @ W carries interference of order 1, so
  every softmax starts saturated on a random key and the loss gives almost no gradient (our
  frac_prevs trials at d = 5-8: 0-11% of inputs right). W ~ N(0, 0.1^2) starts W^T W small:
  the scores small, the softmax soft, and the scale grows with training (frac_prevs d = 5: 100%
  of inputs after 4000 steps). Columns of dimensions that nothing reads or nothing writes start
  at 0 (live_dims). From the rank r of the compiled stream's live part up (stream_span), W starts
  at an orthonormal basis of it instead, which is exact before any step: a random start failed
  even at d = D - 1 for count (50% of inputs).
  An optional pre-activation term (pre_weight) compares each MLP's ReLU inputs with the
  compiled ones; see losses(). No one loss suits every program: frac_prevs reaches d = 5 only
  without it, hist d = 9 only with it, sort d = 9 only with cross-entropy on the output (an
  argmax needs its output directions separable, not orthogonal as MSE on them asks). So a width
  that misses 100% is fitted again with each of projection_tries() before it counts as failed.
- relearn: a Transformer of d_model = d whose read and write weights (W_E, W_pos, W_Q/W_K/W_V,
  W_O, W_in, W_out, W_U) are trained freely, starting from a projection solution (the per-head
  and MLP internals, i.e. the compiled D-side matrices, come in through that start). Loss: output
  MSE plus the layer activations that have the same shape at any width: attention scores and
  patterns and MLP hidden units, against the compiled model's.
- expand: the other way round. Train a model at d_model = d with train.py, embed it into the
  compiled width D by an orthogonal map, fine-tune, and compare its residual stream with the
  compiled one.

Limitation: one seed per fit, and the search assumes accuracy grows with d; a width that an
unlucky start misses can hide smaller widths that would work (make compress lists what was
reached per program). count and sort_unique stay above D/2 (11 of 18, 20 of 25 in make
compress): both rest on a selector width whose MLP reads one number (1/(w+1)) with slopes of
~100, so any interference a shared dimension adds on it flips a count (a likely reason, not a
proven one).

Everything is trained and evaluated on every input of the program (the input spaces of the
default set can be enumerated): compression has no held-out set, the compiled model is the
function to keep. Accuracy is exact match per sequence: a categorical position is right when its
argmax is RASP's value, a numerical one when it is within tl.NUMERIC_TOL of it.
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import model as model_lib
import tracr_load as tl
from model import Transformer

DEFAULT_PROGRAMS = ("reverse", "sort", "hist", "sort_unique", "frac_prevs", "count",
                    "pair_balance")
METHODS = ("projection", "relearn", "expand")


@dataclass
class CompressConfig:
    method: str = "projection"
    steps: int = 4000  # upper bound: a fit stops at its first evaluation with every input right
    lr: float = 1e-2
    batch_size: int = 256  # 0: every input at every step
    layer_weight: float = 1.0  # tracr's per-block output loss
    pre_weight: float = 0.0  # MLP pre-activation loss (see losses)
    retry_pre_weights: tuple = (1.0,)  # projection: refit a width that missed 100% with these
    retry_ce: bool = True  # ... and then, for categorical outputs, with the cross-entropy loss
    give_up_below: float = 0.5  # a fit still under this exact match at 3/4 of its steps stops
    score_weight: float = 0.0  # attention-score loss (see the docstring)
    output_loss: str = "mse"  # mse | ce | auto (auto: cross-entropy for categorical outputs)
    init_std: float = 0.1  # W's entries ~ N(0, init_std^2); 1/sqrt(d) would be N(0, 1/d)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: allowed are {', '.join(METHODS)}")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"--lr {self.lr}: must be positive")
        if self.batch_size < 0:
            raise ValueError(f"--batch-size {self.batch_size}: must be >= 0 (0 = all inputs)")
        if self.output_loss not in ("auto", "mse", "ce"):
            raise ValueError(f"--output-loss {self.output_loss!r}: allowed are auto, mse, ce")
        if self.layer_weight < 0 or self.score_weight < 0:
            raise ValueError("--layer-weight and --score-weight must be >= 0")


# ----------------------------------------------------------------------------------------------
# The reference: every input with its targets and the compiled model's activations.


class Reference:
    """Every input of a task, encoded, with RASP's targets and the compiled model's activations.

    out [N, T, O]; blocks: list of 2L block outputs [N, T, D] (attn 0, mlp 0, attn 1, ...);
    scores: list of L attention scores [N, H, T, T]; patterns: L x [N, H, T, T];
    hidden: L x [N, T, M]; resid: 2L + 1 residual streams [N, T, D] (embed, then after each block).
    """

    def __init__(self, compiled, task, inputs=None, device="cpu"):
        self.inputs = inputs if inputs is not None else task.all_inputs()
        self.tokens, self.mask = task.encode(self.inputs)  # [N, T]
        self.y, self.valid = task.target_tensors(self.inputs, self.tokens.shape[1])  # [N, T]
        compiled = compiled.to(device)
        self.tokens, self.mask = self.tokens.to(device), self.mask.to(device)
        self.y, self.valid = self.y.to(device), self.valid.to(device)
        with torch.no_grad():
            f = stream_forward(compiled, self.tokens, self.mask)
        self.out, self.blocks, self.scores = f["out"], f["blocks"], f["scores"]
        self.patterns, self.hidden, self.resid = f["patterns"], f["hidden"], f["resid"]
        self.pre = f["pre"]
        self.n = len(self.inputs)
        self.live = live_dims(compiled, task.pad_id)  # [D] bool
        self._span = None

    @property
    def span(self):
        """stream_span of this reference, computed once (every width and try of a sweep uses
        it)."""
        if self._span is None:
            self._span = stream_span(self, self.live)
        return self._span

    def rows(self, idx):
        """The same fields for a subset of inputs (a training batch), as a dict."""
        pick = lambda xs: [x[idx] for x in xs]  # noqa: E731
        return {"tokens": self.tokens[idx], "mask": self.mask[idx], "y": self.y[idx],
                "valid": self.valid[idx], "out": self.out[idx], "blocks": pick(self.blocks),
                "scores": pick(self.scores), "patterns": pick(self.patterns),
                "hidden": pick(self.hidden), "pre": pick(self.pre)}

    def all(self):
        return self.rows(slice(None))


# ----------------------------------------------------------------------------------------------
# Forward passes. Both go through the blocks' own modules, so they match model.py exactly.


def attention_scores(attn, x):
    """Pre-softmax attention scores of one attention module on input x [B, T, D] -> [B, H, T, T]."""
    q = torch.einsum("btd,hde->bhte", x, attn.W_Q) + attn.b_Q[None, :, None]  # [B, H, T, E]
    k = torch.einsum("btd,hde->bhte", x, attn.W_K) + attn.b_K[None, :, None]  # [B, H, T, E]
    return q @ k.transpose(-1, -2) / math.sqrt(attn.cfg.d_head)


def all_zero(module):
    """True when every parameter of module is exactly zero (tracr's padding blocks)."""
    return all(not p.any() for p in module.parameters())


def stream_forward(model, tokens, mask, W=None):
    """Run `model` (width D) with its residual stream read through W [d, D] and written through
    W.T; W=None runs it uncompressed. Returns a dict: out [B, T, O]; blocks, each block's own
    output [B, T, D] before it is written down; scores, patterns, hidden as in Reference; resid,
    the residual streams [B, T, d] (embed, then after each block).

    An all-zero block (tracr pads every layer with them: a compiled reverse has 4 of 8) outputs
    exactly 0, scores 0 and a uniform pattern; it is not run, which halves the step time there.
    """
    B, T = tokens.shape
    read = (lambda r: r) if W is None else (lambda r: r @ W)  # [B, T, d] -> [B, T, D]
    write = (lambda x: x) if W is None else (lambda x: x @ W.T)  # [B, T, D] -> [B, T, d]
    allowed = model.attention_mask(mask, T)
    resid = write(model.W_E[tokens] + model.W_pos[:T])  # [B, T, d]
    f = {"blocks": [], "scores": [], "patterns": [], "hidden": [], "pre": [], "resid": [resid]}
    D, H, M = model.cfg.d_model, model.cfg.n_heads, model.cfg.d_mlp
    zeros = lambda *shape: resid.new_zeros(shape)  # noqa: E731
    for layer, block in enumerate(model.blocks):
        if all_zero(block.attn):
            a, scores = zeros(B, T, D), zeros(B, H, T, T)
            pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # [B, H, T, T]
        else:
            cache = {}
            x = read(resid)  # [B, T, D]
            scores = attention_scores(block.attn, x)  # [B, H, T, T]
            a = block.attn(x, allowed, cache, "attn.")  # [B, T, D]
            pattern = cache["attn.pattern"]
            resid = resid + write(a)
        mid = resid
        if all_zero(block.mlp):
            m, pre, hidden = zeros(B, T, D), zeros(B, T, M), zeros(B, T, M)
        else:
            cache = {}
            x = read(resid)  # [B, T, D]
            pre = x @ block.mlp.W_in + block.mlp.b_in  # [B, T, M] before the ReLU
            m = block.mlp(x, cache, "mlp.")  # [B, T, D]
            hidden = cache["mlp.hidden"]
            resid = resid + write(m)
        f["blocks"] += [a, m]
        f["scores"].append(scores)
        f["patterns"].append(pattern)
        f["pre"].append(pre)
        f["hidden"].append(hidden)
        f["resid"] += [mid, resid]
    f["out"] = read(resid) @ model.W_U + model.b_U  # [B, T, O]
    return f


def compressed_model(compiled, W):
    """The Transformer of d_model = d that equals the compiled model read through W [d, D]."""
    d = W.shape[0]
    cfg = replace(compiled.cfg, d_model=d)
    small = Transformer(cfg).to(W.device)
    W = W.detach()
    sd = {"W_E": compiled.W_E @ W.T, "W_pos": compiled.W_pos @ W.T,
          "W_U": W @ compiled.W_U, "b_U": compiled.b_U}
    for layer, block in enumerate(compiled.blocks):
        pre, a, m = f"blocks.{layer}.", block.attn, block.mlp
        for n in ("Q", "K", "V"):
            sd[pre + f"attn.W_{n}"] = torch.einsum("kd,hde->hke", W, getattr(a, f"W_{n}"))
            sd[pre + f"attn.b_{n}"] = getattr(a, f"b_{n}")
        sd[pre + "attn.W_O"] = a.W_O @ W.T
        sd[pre + "attn.b_O"] = a.b_O @ W.T
        sd[pre + "mlp.W_in"], sd[pre + "mlp.b_in"] = W @ m.W_in, m.b_in
        sd[pre + "mlp.W_out"], sd[pre + "mlp.b_out"] = m.W_out @ W.T, m.b_out @ W.T
    small.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    small.eval()
    return small


# ----------------------------------------------------------------------------------------------
# Accuracy and losses.


def accuracy(task, out, y, valid):
    """(exact, per_position): the fraction of sequences with every valid position right, and of
    valid positions right. out [N, T, O]; y, valid [N, T]. A single wrong position makes its
    sequence wrong.
    """
    if task.output_kind == "numerical":
        right = (out[..., 0] - y).abs() <= tl.NUMERIC_TOL  # [N, T]
    else:
        right = out.argmax(-1) == y  # [N, T]
    exact = (right | ~valid).all(1).float().mean().item()
    per_position = (right & valid).sum().item() / max(valid.sum().item(), 1)
    return exact, per_position


def masked_mse(a, b, mask):
    """Mean over masked rows of the squared error summed over the last dimension."""
    err = ((a - b) ** 2).sum(-1)  # [B, T] or [B, H, T]
    return (err * mask).sum() / mask.sum().clamp(min=1)


def losses(task, f, r, cfg):
    """(total, parts) for a forward dict f against reference rows r."""
    mask, valid = r["mask"].float(), r["valid"].float()
    ce = cfg.output_loss == "ce" or (cfg.output_loss == "auto" and
                                     task.output_kind == "categorical")
    if ce:  # the compiled model's argmax is RASP's value on every input of the default set
        out = F.cross_entropy(f["out"][r["valid"]], r["out"][r["valid"]].argmax(-1))
    else:
        out = masked_mse(f["out"], r["out"], valid)
    if cfg.method == "relearn":  # widths differ, so compare what every width shares
        layer = sum(masked_mse(a, b, mask) for a, b in zip(f["hidden"], r["hidden"]))
        layer = layer + sum(masked_mse(a, b, mask[:, None])
                            for a, b in zip(f["patterns"], r["patterns"]))
    else:
        layer = sum(masked_mse(a, b, mask) for a, b in zip(f["blocks"], r["blocks"]))
        layer = layer / max(len(f["blocks"]), 1)
    # Scores matter only where attention may look: real queries and allowed keys.
    T = r["mask"].shape[1]
    allowed = (r["mask"][:, None, :, None] & r["mask"][:, None, None, :]).float()
    if task.causal:
        allowed = allowed * torch.ones(T, T, device=allowed.device).tril()
    score = sum(((a - b) ** 2 * allowed).sum() / (allowed.sum() * a.shape[1])
                for a, b in zip(f["scores"], r["scores"])) / max(len(f["scores"]), 1)
    # MLP pre-activations: a ReLU input below 0 may move anywhere below 0; above, it must match.
    # tracr's MLPs that read numbers (e.g. a selector width's 1/(n+1)) have slopes of ~100, so
    # this weights each read direction by how much the MLP amplifies interference on it.
    pre = sum(masked_mse(torch.where(b > 0, a, F.relu(a)), b.clamp(min=0), mask)
              for a, b in zip(f["pre"], r["pre"])) / max(len(f["pre"]), 1)
    total = out + cfg.layer_weight * layer + cfg.score_weight * score + cfg.pre_weight * pre
    parts = {"out": out.item(), "layer": float(layer.detach()), "score": float(score.detach()),
             "pre": float(pre.detach())}
    return total, parts


# ----------------------------------------------------------------------------------------------
# Training: projection and relearn.


def _batches(ref, cfg, gen):
    """An endless stream of index tensors: random batches, or every input when batch_size is 0."""
    while True:
        if cfg.batch_size == 0 or cfg.batch_size >= ref.n:
            yield slice(None)
        else:
            yield torch.randint(0, ref.n, (cfg.batch_size,), generator=gen).to(ref.tokens.device)


def _optimise(params, forward, task, ref, cfg, desc, progress):
    """Adam with a cosine schedule on `params`; keeps the best (highest exact, then lowest loss
    on every input) parameters seen at the evaluations. Returns the history."""
    from tqdm import tqdm
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    batches = _batches(ref, cfg, gen)
    every = max(cfg.steps // 20, 1)
    history, best, best_key = [], None, None
    for step in tqdm(range(cfg.steps + 1), desc=desc, leave=False, disable=not progress):
        if step % every == 0 or step == cfg.steps:
            with torch.no_grad():
                full = ref.all()
                f = forward(full["tokens"], full["mask"])
                loss, parts = losses(task, f, full, cfg)
                exact, per_pos = accuracy(task, f["out"], ref.y, ref.valid)
            if not math.isfinite(loss.item()):
                raise ValueError(f"{desc}: the loss became {loss.item()} at step {step}; "
                                 "try a smaller --lr")
            history.append({"step": step, "loss": loss.item(), **parts, "exact": exact,
                            "per_position": per_pos})
            key = (exact, -loss.item())
            if best_key is None or key > best_key:
                best_key, best = key, [p.detach().clone() for p in params]
            if exact == 1.0:
                break  # every input right: nothing left to gain on the compiled function
            if step >= 3 * cfg.steps // 4 and best_key[0] < cfg.give_up_below:
                break  # hopeless (hist d = 8 went from 32% at half time to 100% at 55%)
        if step == cfg.steps:
            break
        r = ref.rows(next(batches))
        loss, _ = losses(task, forward(r["tokens"], r["mask"]), r, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    return history


def projection_tries(cfg, task):
    """The settings fit_projection tries in turn at one width, until one gets every input right:
    cfg itself, cfg with each other pre_weight of retry_pre_weights, and (retry_ce, categorical
    outputs, cfg's output loss MSE) cfg with the cross-entropy output loss."""
    out = [cfg] + [replace(cfg, pre_weight=w) for w in cfg.retry_pre_weights
                   if w != cfg.pre_weight]
    if cfg.retry_ce and task.output_kind == "categorical" and cfg.output_loss == "mse":
        out.append(replace(cfg, output_loss="ce"))
    return out


def live_dims(compiled, pad_id=None):
    """[D] bool: residual dimensions that some block or W_U reads and something writes.

    A dimension nothing reads can be dropped without changing any output; one nothing writes
    holds 0 in the compiled model, so reading it through W only adds interference. Either way
    its column of W is best 0, and W starts so. (PAD's embedding row does not count as a write:
    padded positions are never read.)
    """
    nz = lambda t, dims: t.abs().sum(dims) > 0  # noqa: E731
    read = nz(compiled.W_U, 1)
    rows = [i for i in range(compiled.cfg.d_vocab) if i != pad_id]
    written = nz(compiled.W_E[rows], 0) | nz(compiled.W_pos, 0)
    for block in compiled.blocks:
        a, m = block.attn, block.mlp
        for w in (a.W_Q, a.W_K, a.W_V):
            read = read | nz(w, (0, 2))
        read = read | nz(m.W_in, 1)
        written = written | nz(a.W_O, (0, 1)) | (a.b_O != 0) | nz(m.W_out, 0) | (m.b_out != 0)
    return read & written


def init_W(d, D, cfg, device="cpu", live=None):
    """W [d, D] with N(0, init_std^2) entries; the columns of dimensions that are not live (see
    live_dims) start at 0. (A std of 0.22 / sqrt(d), the same W^T W scale at every d, did worse
    in our trials: hist d = 9 42% against 90%, frac_prevs d = 7 74%.)"""
    gen = torch.Generator().manual_seed(cfg.seed)
    W = torch.randn(d, D, generator=gen) * cfg.init_std  # [d, D]
    if live is not None:
        W[:, ~live.cpu()] = 0.0
    return W.to(device)


def stream_span(ref, live, rtol=1e-6):
    """[r, D] orthonormal rows spanning every live part of the compiled residual stream (every
    stage, every real position of every input): r is the width at which compression is exact.

    Blocks and W_U read only live dimensions (see live_dims), and only the streams in ref.resid.
    If the rows of W span those streams' live parts, x @ W.T @ W equals x on every dimension
    that is read, so the compressed model computes exactly what the compiled one does. tracr's
    one-hot groups are linearly dependent (each group sums to `one`), so r is below the number
    of live dimensions: 11 of 12 for count, 27 of 35 for reverse.
    """
    X = torch.cat([r[ref.mask] for r in ref.resid]).double() * live.double()  # [P, D]
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    r = int((S > rtol * S[0]).sum()) if len(S) and S[0] > 0 else 0
    return Vh[:r].to(ref.resid[0].dtype)  # [r, D]


def fit_projection(compiled, task, ref, d, cfg, progress=True):
    """Learn W [d, D] with the compiled weights frozen. Returns (W, history).

    From width r = len(stream_span) up, W starts at that span (zero rows beyond r): exact
    before the first step, so the fit ends at its first evaluation. Below r it starts at init_W.
    (Random starts failed even one dimension short of D: count 50% at d = 17 of 18.)
    """
    for p in compiled.parameters():
        p.requires_grad_(False)
    span = ref.span
    if d >= len(span):
        W = torch.cat([span, span.new_zeros(d - len(span), span.shape[1])]).requires_grad_(True)
    else:
        W = init_W(d, compiled.cfg.d_model, cfg, ref.tokens.device, ref.live).requires_grad_(True)
    forward = lambda tokens, mask: stream_forward(compiled, tokens, mask, W)  # noqa: E731
    history = _optimise([W], forward, task, ref, cfg, f"{task.name} projection d={d}", progress)
    return W.detach(), history


READ_WRITE = ("W_E", "W_pos", "W_U", "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O",
              "attn.b_O", "mlp.W_in", "mlp.W_out", "mlp.b_out")


def fit_relearn(compiled, task, ref, d, cfg, progress=True):
    """Train the read and write weights of a d_model = d Transformer, starting from a projection
    fit (half the steps), the compiled internals (biases of Q, K, V and the MLP's hidden layer)
    frozen. Returns (model, W of the starting projection, history)."""
    first = replace(cfg, method="projection", steps=max(cfg.steps // 2, 1))
    W, hist0 = fit_projection(compiled, task, ref, d, first, progress)
    small = compressed_model(compiled, W)
    params = []
    for name, p in small.named_parameters():
        train = any(name == k or name.endswith("." + k) for k in READ_WRITE)
        p.requires_grad_(train)
        if train:
            params.append(p)
    small.train()
    forward = lambda tokens, mask: stream_forward(small, tokens, mask)  # noqa: E731
    hist1 = _optimise(params, forward, task, ref, cfg, f"{task.name} relearn d={d}", progress)
    small.eval()
    for p in small.parameters():
        p.requires_grad_(False)
    for h in hist1:
        h["step"] += first.steps
    return small, W, hist0 + hist1


def expanded_model(small, Q):
    """The Transformer of width D equal to `small` (width d) embedded by Q [d, D], Q Q^T = I:
    writes go through Q, reads through Q^T, so every output is unchanged."""
    cfg = replace(small.cfg, d_model=Q.shape[1])
    big = Transformer(cfg).to(Q.device)
    sd = {}
    for name, p in small.state_dict().items():
        p = p.detach()
        if name in ("W_E", "W_pos") or name.endswith(("attn.W_O", "attn.b_O", "mlp.W_out",
                                                      "mlp.b_out")):
            sd[name] = p @ Q  # write: [..., d] -> [..., D]
        elif name == "W_U" or name.endswith("mlp.W_in"):
            sd[name] = Q.T @ p  # read: [D, ...]
        elif name.endswith(("attn.W_Q", "attn.W_K", "attn.W_V")):
            sd[name] = torch.einsum("kD,hke->hDe", Q, p)  # [H, D, E]
        else:
            sd[name] = p.clone()
    big.load_state_dict(sd)
    return big


def fit_expand(compiled, task, ref, d, cfg, progress=True):
    """Train a d-wide model of the compiled shape with train.py on every input, embed it into the
    compiled width D with a random orthogonal Q [d, D], then fine-tune it there (a quarter of the
    steps). Returns (model, history). Learning rate and batch size are train.py's defaults."""
    import train as train_lib
    D = compiled.cfg.d_model
    tcfg = train_lib.TrainConfig(steps=cfg.steps, seed=cfg.seed, device=cfg.device,
                                 eval_every=max(cfg.steps // 20, 1))
    inputs = ref.inputs
    small = train_lib.model_like(task, compiled.cfg, seed=cfg.seed, d_model=d)
    hist0 = train_lib.train(small, task, inputs, inputs, tcfg, progress=progress)
    gen = torch.Generator().manual_seed(cfg.seed)
    Q = torch.linalg.qr(torch.randn(D, d, generator=gen)).Q.T.contiguous()  # [d, D]
    big = expanded_model(small.cpu().eval(), Q).to(cfg.device)
    before = train_lib.evaluate(big, task, inputs)["exact"]
    fine = replace(tcfg, steps=max(cfg.steps // 4, 1), warmup=0)
    hist1 = train_lib.train(big, task, inputs, inputs, fine, progress=progress)
    big.eval()
    return big, [{"stage": "small", **h} for h in hist0] + \
        [{"stage": "expanded", "exact_before_finetune": before}] + \
        [{"stage": "finetune", **h} for h in hist1]


def stream_direct_cosine(model, ref):
    """Per stage: mean cosine between the model's residual stream and the compiled one, in the
    same coordinates (meaningful only when both have width D)."""
    with torch.no_grad():
        f = stream_forward(model, ref.tokens, ref.mask)
    if f["resid"][0].shape[-1] != ref.resid[0].shape[-1]:
        return None
    return [F.cosine_similarity(a[ref.mask], b[ref.mask], dim=-1, eps=1e-12).mean().item()
            for a, b in zip(f["resid"], ref.resid)]


# ----------------------------------------------------------------------------------------------
# Comparing residual streams.


def stage_names(n_layers):
    names = ["embed"]
    for layer in range(n_layers):
        names += [f"{layer}.attn", f"{layer}.mlp"]
    return names


def stream_similarity(resid, ref_resid, mask, W=None):
    """Per stage: mean cosine similarity over real positions between the decoded stream and the
    compiled one, and the relative squared error |decoded - compiled|^2 / |compiled|^2.

    decoded = resid @ W when W [d, D] is given (the model's own map back to D); otherwise the
    least-squares linear map from resid to the compiled stream, fitted per stage (how much of
    the compiled stream can be read linearly from the small one).
    Returns (cosines, errors), lists of floats, one per stage.
    """
    cos, err = [], []
    for r, c in zip(resid, ref_resid):
        x, t = r[mask], c[mask]  # [P, d], [P, D]
        if W is not None:
            dec = x @ W
        else:
            dec = x @ torch.linalg.lstsq(x.double(), t.double()).solution.float()  # [P, D]
        cos.append(F.cosine_similarity(dec, t, dim=-1, eps=1e-12).mean().item())
        err.append(((dec - t) ** 2).sum().item() / max((t ** 2).sum().item(), 1e-12))
    return cos, err


def evaluate(small, task, ref, W=None):
    """Accuracy of a d-wide Transformer on every input, and its stream against the compiled one."""
    with torch.no_grad():
        f = stream_forward(small, ref.tokens, ref.mask)
    exact, per_pos = accuracy(task, f["out"], ref.y, ref.valid)
    cos, err = stream_similarity(f["resid"], ref.resid, ref.mask, W)
    return {"exact": exact, "per_position": per_pos, "cosine": cos, "recon_error": err,
            "stages": stage_names(small.cfg.n_layers)}


def compress_once(compiled, task, ref, d, cfg, progress=True):
    """Fit one width d by cfg.method. Returns (small Transformer, W or None, meta dict)."""
    D = compiled.cfg.d_model
    if not 1 <= d <= D:
        raise ValueError(f"d={d}: must be between 1 and D={D} for {task.name}")
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tries, report = [], None
    if cfg.method == "projection":
        # One loss does not suit every program (see the docstring): a width that misses 100% is
        # fitted again with each loss of projection_tries; the best fit stays.
        for try_cfg in projection_tries(cfg, task):
            t_try = time.time()
            fit = fit_projection(compiled, task, ref, d, try_cfg, progress)
            small = compressed_model(compiled, fit[0])
            rep = evaluate(small, task, ref, fit[0])
            tries.append({"pre_weight": try_cfg.pre_weight, "output_loss": try_cfg.output_loss,
                          "accuracy": rep["exact"], "steps": fit[1][-1]["step"],
                          "seconds": time.time() - t_try})
            if report is None or rep["exact"] > report["exact"]:
                (W, history), best_small, report, used = fit, small, rep, try_cfg
            if rep["exact"] == 1.0:
                break
        small = best_small
    elif cfg.method == "relearn":
        small, W, history = fit_relearn(compiled, task, ref, d, cfg, progress)
        report = evaluate(small, task, ref, None)
    else:
        small, history = fit_expand(compiled, task, ref, d, cfg, progress)
        W = None
        report = evaluate(small, task, ref, None)
        report["direct_cosine"] = stream_direct_cosine(small, ref)
    seconds = time.time() - t0
    meta = {"method": cfg.method, "d": d, "D": D, "accuracy": report["exact"],
            "per_position": report["per_position"], "cosine": report["cosine"],
            "recon_error": report["recon_error"], "stages": report["stages"],
            "seconds": seconds, "config": asdict(cfg), "history": history, "tries": tries,
            "residual_labels": list(getattr(compiled, "residual_labels", [])),
            "W": None if W is None else W.cpu().tolist()}
    if "direct_cosine" in report:
        meta["direct_cosine"] = report["direct_cosine"]
    if tries:
        meta["config"] = asdict(used)  # the settings of the fit that was kept
    return small, W, meta


# ----------------------------------------------------------------------------------------------
# Sweeps over d.


def run_path(out_dir, program, d, method="projection"):
    what = "expanded" if method == "expand" else "compressed"
    return os.path.join(out_dir, f"{program}_{what}_d{d}.pt")


def sweep(program, cfg, dims=None, find_min=False, out_dir="runs", force=False, progress=True,
          compiled=None, task=None, max_ratio=1.0, search_up=False):
    """Fit every d in dims (each saved), or search for the smallest d at 100% accuracy.

    find_min: first ceil(max_ratio * D) (always saved), then bisection below it, assuming that
    a width that works makes every larger one work; every width that reaches 100% is saved.
    search_up: when that first width fails, bisect between it and D instead (d = D needs no fit:
    W = I is the compiled model itself), so the result says how far compression gets.
    Returns a dict: program, D, results {d: meta without history/W}, best (smallest d at 100%
    or None), seconds.
    """
    t0 = time.time()
    if compiled is None:
        compiled, task = tl.load_program(program)
    compiled = compiled.to(cfg.device)
    ref = Reference(compiled, task, device=cfg.device)
    D = compiled.cfg.d_model
    results, models = {}, {}

    def fit(d, keep=False):
        path = run_path(out_dir, program, d, cfg.method)
        if os.path.exists(path) and not force:
            raise ValueError(f"{path} exists; pass --force to overwrite it")
        small, W, meta = compress_once(compiled, task, ref, d, cfg, progress)
        results[d] = {k: v for k, v in meta.items() if k not in ("history", "W")}
        models[d] = (small, W)
        line = " ".join(f"{c:.3f}" for c in meta["cosine"])
        print(f"{program} d={d:3d}/{D}: exact {meta['accuracy']:.4f}  per position "
              f"{meta['per_position']:.4f}  cosine [{line}]  {meta['seconds']:.1f}s", flush=True)
        if not find_min or keep or meta["accuracy"] == 1.0:
            kind = "trained" if cfg.method == "expand" else "compressed"
            model_lib.save(path, small, task, kind, **meta)
        return meta["accuracy"] == 1.0

    # Limitation: bisection trusts that accuracy only grows with d; one seed per width, so a
    # width that an unlucky start misses can hide smaller widths that would work.
    def bisect(lo, hi):
        """The smallest width in (lo, hi] that fits, given that lo fails and hi works."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fit(mid) else (mid, hi)
        return hi

    if find_min:
        top = max(1, min(D, math.ceil(max_ratio * D)))
        hi = top + 1  # the smallest width that worked (none yet)
        if fit(top, keep=True):  # kept even when it fails: it shows how far the search got
            hi = bisect(0, top)  # d = 0 cannot work
        elif search_up and top < D:
            hi = bisect(top, D)  # d = D works: W = I reproduces the compiled model exactly
        best = hi if hi <= top or (search_up and hi < D) else None  # D itself: no compression
    else:
        for d in dims:
            fit(d)
        ok = [d for d in dims if results[d]["accuracy"] == 1.0]
        best = min(ok) if ok else None
    summary = {"program": program, "D": D, "method": cfg.method, "results": results,
               "best": best, "seconds": time.time() - t0,
               "labels": list(getattr(compiled, "residual_labels", []))}
    if best is not None:
        summary["best_W"] = models[best][1]
    else:  # show the map of the widest failing width
        summary["best_W"] = models[max(results)][1]
        summary["W_d"] = max(results)
    return summary


# ----------------------------------------------------------------------------------------------
# Figures and the table.


def plot_summary(summary, path):
    """Accuracy against d, and W^T W labelled with tracr's residual labels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, labels = summary["results"], summary["labels"]
    W = summary.get("best_W")
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1, 1.6]})
    ds = sorted(res)
    ax0.plot(ds, [res[d]["accuracy"] for d in ds], "o-", label="exact (sequence)")
    ax0.plot(ds, [res[d]["per_position"] for d in ds], "s--", label="per position")
    ax0.axvline(summary["D"] / 2, color="grey", lw=0.8, ls=":", label="D / 2")
    ax0.set(xlabel="d (compressed residual width)", ylabel="accuracy on every input",
            title=f"{summary['program']}: {summary['method']}, D = {summary['D']}",
            ylim=(-0.02, 1.02))
    ax0.legend(loc="lower right")
    if W is not None:
        W = torch.as_tensor(W).cpu()
        gram = (W.T @ W).numpy()  # [D, D]
        lim = max(abs(gram).max(), 1e-6)
        im = ax1.imshow(gram, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax1.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax1.set_yticks(range(len(labels)), labels, fontsize=6)
        d = summary.get("W_d", summary["best"])
        ax1.set_title(f"W^T W at d = {d}: which features stay apart")
        fig.colorbar(im, ax=ax1, fraction=0.046)
    else:
        ax1.axis("off")
    fig.tight_layout()
    model_lib.save_figure(fig, path)


def table(summaries):
    """The summary table as text: program, D, smallest d at 100%, d/D, cosine per stage, s."""
    lines = ["| program | D | smallest d at 100% | d/D | cosine to compiled stream per stage "
             "(embed, then each block) | seconds |", "|---|---|---|---|---|---|"]
    for s in summaries:
        best = s["best"]
        if best is None:
            top = max(s["results"].values(), key=lambda r: (r["accuracy"], r["d"]))
            cos = " ".join(f"{c:.2f}" for c in top["cosine"])
            lines.append(f"| {s['program']} | {s['D']} | none (best {top['accuracy']:.1%} at "
                         f"d = {top['d']}) | - | {cos} | {s['seconds']:.0f} |")
            continue
        r = s["results"][best]
        cos = " ".join(f"{c:.2f}" for c in r["cosine"])
        lines.append(f"| {s['program']} | {s['D']} | {best} | {best / s['D']:.2f} | {cos} | "
                     f"{s['seconds']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Benchmark rows for bench.py.


def bench():
    """frac_prevs by projection at d = 5 (the tracr paper reports d = 6), timed, on every input;
    and for each default program with saved runs, the smallest d at 100% that runs/ holds."""
    import glob
    rows = []
    compiled, task = tl.load_program("frac_prevs")
    ref = Reference(compiled, task)
    cfg = CompressConfig()
    t0 = time.time()
    small, W, meta = compress_once(compiled, task, ref, 5, cfg, progress=False)
    rows.append({"name": "compress frac_prevs projection d=5", "D": meta["D"], "d": 5,
                 "accuracy": meta["accuracy"], "seconds": time.time() - t0,
                 "paper_d": 6})
    for program in DEFAULT_PROGRAMS:
        best = None
        for path in glob.glob(os.path.join("runs", f"{program}_compressed_d*.pt")):
            run = model_lib.read_run(path)
            m = run["meta"]
            if m.get("accuracy") == 1.0 and (best is None or m["d"] < best["d"]):
                best = m
        if best is not None:
            rows.append({"name": f"compress {program} smallest d at 100%", "D": best["D"],
                         "d": best["d"], "ratio": best["d"] / best["D"],
                         "method": best["method"]})
    return rows


# ----------------------------------------------------------------------------------------------
# Command line.



def parse_dims(text):
    try:
        dims = [int(w) for w in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--dims {text!r}: give positive integers such as 12,10,8") from None
    if not dims or min(dims) < 1:
        raise ValueError(f"--dims {text!r}: give positive integers such as 12,10,8")
    return dims


def parse_floats(text, flag):
    try:
        return tuple(float(w) for w in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give numbers such as 0,1") from None


def _sweep_job(job):
    """One program's sweep, for a worker process (spawned: set its own thread count)."""
    program, cfg, dims, find_min, out, force, progress, threads, max_ratio, up = job
    torch.set_num_threads(max(threads, 1))
    return sweep(program, cfg, dims, find_min, out, force, progress=progress,
                 max_ratio=max_ratio, search_up=up)


def main(argv=None):
    ap = model_lib.ArgParser(
        description="Compress a compiled model's residual stream (or expand a trained "
                             "one) and find the smallest width that keeps every input right.")
    ap.add_argument("programs", nargs="+", help="program name(s): " + ", ".join(DEFAULT_PROGRAMS)
                    + ", ...")
    ap.add_argument("--method", default="projection", help="projection | relearn | expand")
    ap.add_argument("--dims", help="widths to fit, e.g. 12,10,8,6,5,4")
    ap.add_argument("--find-min", action="store_true",
                    help="search for the smallest width at 100%% accuracy")
    ap.add_argument("--max-ratio", type=float, default=1.0,
                    help="--find-min searches d <= ceil(max_ratio * D) only (first tries that)")
    ap.add_argument("--search-up", action="store_true",
                    help="--find-min: if the first width fails, bisect up to D (where W = I)")
    ap.add_argument("--table", action="store_true",
                    help="print the summary table at the end (implies --find-min without --dims)")
    defaults = CompressConfig()
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--layer-weight", type=float, default=defaults.layer_weight)
    ap.add_argument("--pre-weight", type=float, default=defaults.pre_weight)
    ap.add_argument("--retry-pre-weights", default=",".join(map(str, defaults.retry_pre_weights)),
                    help="projection: refit a width that missed 100%% with each of these "
                    "--pre-weight values ('' for none)")
    ap.add_argument("--no-retry-ce", action="store_true",
                    help="projection: no last try with the cross-entropy output loss")
    ap.add_argument("--score-weight", type=float, default=defaults.score_weight)
    ap.add_argument("--output-loss", default=defaults.output_loss, help="auto | mse | ce")
    ap.add_argument("--init-std", type=float, default=defaults.init_std)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1,
                    help="programs compressed in parallel processes (one CPU thread each)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for these small models on a busy host)")
    ap.add_argument("--out", default="runs", help="folder for the run files")
    ap.add_argument("--figures", default="figures", help="folder for the figures")
    ap.add_argument("--force", action="store_true", help="overwrite existing run files")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        torch.set_num_threads(max(args.threads, 1))
        model_lib.check_device(args.device)
        for p in args.programs:
            tl.program_spec(p)
        cfg = CompressConfig(method=args.method, steps=args.steps, lr=args.lr,
                             batch_size=args.batch_size, layer_weight=args.layer_weight,
                             score_weight=args.score_weight, init_std=args.init_std,
                             output_loss=args.output_loss, pre_weight=args.pre_weight,
                             retry_pre_weights=parse_floats(args.retry_pre_weights,
                                                            "--retry-pre-weights"),
                             retry_ce=not args.no_retry_ce,
                             seed=args.seed, device=args.device)
        dims = parse_dims(args.dims) if args.dims else None
        find_min = args.find_min or (args.table and dims is None)
        if dims is None and not find_min:
            raise ValueError("give --dims (e.g. --dims 8,6,5) or --find-min")
        if not 0 < args.max_ratio <= 1:
            raise ValueError(f"--max-ratio {args.max_ratio}: must be in (0, 1]")
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: must be at least 1")
        for program in args.programs:  # refuse to start when a run file would be overwritten
            for d in (dims or []):
                path = run_path(args.out, program, d, cfg.method)
                if os.path.exists(path) and not args.force:
                    raise ValueError(f"{path} exists; pass --force to overwrite it")
        jobs = [(p, cfg, dims, find_min, args.out, args.force,
                 not args.no_progress and args.jobs == 1, args.threads, args.max_ratio,
                 args.search_up)
                for p in args.programs]
        if args.jobs == 1:
            summaries = [_sweep_job(j) for j in jobs]
        else:
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
                summaries = pool.map(_sweep_job, jobs, chunksize=1)
        for s in summaries:
            program = s["program"]
            fig = os.path.join(args.figures, f"{program}_compress_{cfg.method}.png")
            plot_summary(s, fig)
            best = "none" if s["best"] is None else s["best"]
            print(f"{program}: smallest d at 100% = {best} of D = {s['D']} "
                  f"({s['seconds']:.0f}s); wrote {fig}", flush=True)
        if args.table or len(summaries) > 1:
            print(table(summaries))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
