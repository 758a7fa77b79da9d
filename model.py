"""A plain PyTorch transformer with an activation cache, shaped to hold tracr's compiled weights.

    from model import Config, Transformer
    model = Transformer(Config(d_model=14, n_layers=1, n_heads=1, d_head=6, d_mlp=4, d_vocab=6,
                               d_vocab_out=1, n_ctx=6))
    out, cache = model.run_with_cache(tokens, mask)

The forward pass follows tracr's own order of operations (tracr/transformer/model.py), so compiled
weights give the same residual stream to float32 precision:

    resid = W_E[tokens] + W_pos[positions]
    for each layer:  resid = resid + Attn(LN(resid));  resid = resid + MLP(LN(resid))
    out = LN(resid) @ W_U + b_U

with LN the identity unless `normalization='layernorm'` (pre-norm, as in tracr's config), and
attention scores divided by sqrt(d_head). Padded keys (mask False) never receive attention, so a
right-padded batch gives on every real position what each sequence gives alone.

Glossary of shapes:
    B  batch size              T  sequence length (BOS included)
    D  d_model (residual)      H  number of heads       E  d_head
    M  d_mlp                   V  d_vocab (input)       O  d_vocab_out (output columns)

Run files: `save(path, model, task, kind, **meta)` writes a plain dict of tensors, numbers, strings,
lists and dicts (readable with torch.load(path, weights_only=True)); `load(path)` reads it back.
"""

import argparse
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("tracr", "trained", "compressed", "regularized")
RUN_FORMAT = "tracr-vs-trained run v1"


@dataclass
class Config:
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    act_fn: str = "relu"  # 'relu' | 'gelu'
    causal: bool = False
    normalization: str = "none"  # 'none' | 'layernorm'
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab",
                     "d_vocab_out", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{name}={value!r}: must be a positive integer")
        if self.act_fn not in ("relu", "gelu"):
            raise ValueError(f"Config.act_fn={self.act_fn!r}: allowed are 'relu', 'gelu'")
        if self.normalization not in ("none", "layernorm"):
            raise ValueError(f"Config.normalization={self.normalization!r}: "
                             "allowed are 'none', 'layernorm'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Config.dropout={self.dropout!r}: must be in [0, 1)")


def _norm(cfg):
    return nn.LayerNorm(cfg.d_model) if cfg.normalization == "layernorm" else nn.Identity()


def attend(x, allowed, W_qkv, b_qkv, W_O, b_O, H, E):
    """Multi-head attention on x [B, T, D] with Q, K, V of all heads packed in W_qkv [D, 3*H*E].

    Returns (out [B, T, D], pattern [B, H, T, T]). Scores are divided by sqrt(E) and set to the
    lowest float where `allowed` [B, 1, T, T] is False, as tracr does (with -1e30). A bias may be
    None (no bias).
    """
    B, T, D = x.shape
    qkv = linear(x.reshape(B * T, D), W_qkv, b_qkv).view(B, T, 3, H, E)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, E]
    # Scores are built keys first, [B, H, T_key, T_query], and normalised over dim -2: PyTorch's
    # CPU softmax is 3-4x slower along a last dimension as short as T (6 for reverse).
    scores_t = k @ q.transpose(-1, -2) / math.sqrt(E)  # [B, H, T, T] (key, query)
    scores_t = scores_t.masked_fill(~allowed.transpose(-1, -2), torch.finfo(x.dtype).min)
    pattern = scores_t.softmax(dim=-2).transpose(-1, -2)  # [B, H, T, T] (query, key)
    z = (pattern @ v).transpose(1, 2).reshape(B * T, H * E)  # [B*T, H*E]
    return linear(z, W_O, b_O).view(B, T, D), pattern


def linear(x, W, b=None):
    """x @ W + b for x [N, D_in]; b None skips the bias (addmm copies it into every row first,
    which costs as much as the product for tracr's narrow matrices, whose biases are all 0)."""
    return x @ W if b is None else torch.addmm(b, x, W)


def pack_qkv(W_Q, W_K, W_V, b_Q, b_K, b_V):
    """Per-head [H, D, E] weights -> one [D, 3*H*E] matrix and its [3*H*E] bias."""
    H, D, E = W_Q.shape
    W = torch.cat([W_Q, W_K, W_V]).permute(1, 0, 2).reshape(D, 3 * H * E)
    return W, torch.cat([b_Q, b_K, b_V]).reshape(3 * H * E)


def nonzero(b):
    """b, or None when every entry is 0 (see linear)."""
    return b if b.any() else None


class Attention(nn.Module):
    """Multi-head attention with per-head W_Q, W_K, W_V [H, D, E] and W_O [H, E, D]."""

    def __init__(self, cfg):
        super().__init__()
        H, D, E = cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.W_Q = nn.Parameter(torch.randn(H, D, E) / math.sqrt(D))
        self.W_K = nn.Parameter(torch.randn(H, D, E) / math.sqrt(D))
        self.W_V = nn.Parameter(torch.randn(H, D, E) / math.sqrt(D))
        self.W_O = nn.Parameter(torch.randn(H, E, D) / math.sqrt(H * E))
        self.b_Q = nn.Parameter(torch.zeros(H, E))
        self.b_K = nn.Parameter(torch.zeros(H, E))
        self.b_V = nn.Parameter(torch.zeros(H, E))
        self.b_O = nn.Parameter(torch.zeros(D))

    def forward(self, x, allowed, cache=None, prefix=""):
        H, E = self.cfg.n_heads, self.cfg.d_head
        W, b = pack_qkv(self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V)
        out, pattern = attend(x, allowed, W, b, self.W_O.reshape(H * E, -1), self.b_O, H, E)
        if self.training and self.cfg.dropout > 0:
            out = F.dropout(out, self.cfg.dropout)
        if cache is not None:
            cache[prefix + "pattern"] = pattern
            cache[prefix + "out"] = out
        return out


class MLP(nn.Module):
    """Two-layer MLP: act(x @ W_in + b_in) @ W_out + b_out."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.W_in = nn.Parameter(torch.randn(cfg.d_model, cfg.d_mlp) / math.sqrt(cfg.d_model))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.randn(cfg.d_mlp, cfg.d_model) / math.sqrt(cfg.d_mlp))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = F.relu if cfg.act_fn == "relu" else F.gelu

    def forward(self, x, cache=None, prefix=""):
        B, T, D = x.shape
        hidden = self.act(torch.addmm(self.b_in, x.reshape(B * T, D), self.W_in))  # [B*T, M]
        if self.training and self.cfg.dropout > 0:
            hidden = F.dropout(hidden, self.cfg.dropout)
        out = torch.addmm(self.b_out, hidden, self.W_out).view(B, T, D)
        if cache is not None:
            cache[prefix + "hidden"] = hidden.view(B, T, -1)
            cache[prefix + "out"] = out
        return out


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = _norm(cfg), Attention(cfg), _norm(cfg), MLP(cfg)

    def forward(self, resid, allowed, cache=None, prefix=""):
        resid = resid + self.attn(self.ln1(resid), allowed, cache, prefix + "attn.")
        if cache is not None:
            cache[prefix + "resid_mid"] = resid
        resid = resid + self.mlp(self.ln2(resid), cache, prefix + "mlp.")
        if cache is not None:
            cache[prefix + "resid_post"] = resid
        return resid


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.randn(cfg.d_vocab, cfg.d_model) / math.sqrt(cfg.d_model))
        self.W_pos = nn.Parameter(torch.randn(cfg.n_ctx, cfg.d_model) / math.sqrt(cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = _norm(cfg)
        self.W_U = nn.Parameter(torch.randn(cfg.d_model, cfg.d_vocab_out) / math.sqrt(cfg.d_model))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))

    def attention_mask(self, mask, T):
        """[B, 1, T, T] bool: may query t read key s? Never a padded key; only s <= t if causal."""
        allowed = mask[:, None, None, :]  # [B, 1, 1, T]
        if self.cfg.causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
        return allowed

    def forward(self, tokens, mask=None, cache=None):
        """tokens [B, T] long, mask [B, T] bool (True on BOS and real tokens) -> out [B, T, O]."""
        B, T = tokens.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"sequence length {T} (BOS included) exceeds n_ctx={self.cfg.n_ctx}")
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        allowed = self.attention_mask(mask, T)

        resid = self.W_E[tokens] + self.W_pos[:T]  # [B, T, D]
        if cache is None and not self.training and not torch.is_grad_enabled():
            return self._inference(resid, allowed)
        if cache is not None:
            cache["embed"] = resid
        for layer, block in enumerate(self.blocks):
            resid = block(resid, allowed, cache, f"blocks.{layer}.")
        return self.ln_final(resid) @ self.W_U + self.b_U  # [B, T, O]

    def _inference(self, resid, allowed):
        """The same forward pass without the parts of the weights that are exactly zero.

        tracr pads every layer to the same number of heads and MLP units with zeros and fills
        unused blocks with zeros: a compiled reverse has 8 blocks of which 4 do anything. Leaving
        them out adds no zeros to the residual stream, so the output is the same (up to float
        summation order); dense (trained) models keep every part.
        """
        for block, (attn, mlp) in zip(self.blocks, self._inference_plan()):
            if attn is not None:
                resid = resid + attend(block.ln1(resid), allowed, *attn)[0]
            if mlp is not None:
                W_in, b_in, W_out, b_out = mlp
                B, T, D = resid.shape
                hidden = block.mlp.act(linear(block.ln2(resid).reshape(B * T, D), W_in, b_in))
                resid = resid + linear(hidden, W_out, b_out).view(B, T, D)
        return self.ln_final(resid) @ self.W_U + self.b_U  # [B, T, O]

    @torch.no_grad()
    def _inference_plan(self):
        """Per block: packed weights of the live heads and MLP units (None: block is all zero).
        Rebuilt whenever a parameter changes (tensor versions are part of the cache key)."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if getattr(self, "_plan", (None,))[0] == key:
            return self._plan[1]
        plan, E = [], self.cfg.d_head
        for block in self.blocks:
            a, m = block.attn, block.mlp
            heads = (a.W_O.flatten(1) != 0).any(1).nonzero().flatten()  # [live H]
            if len(heads) == 0 and (a.b_O != 0).any():  # only a bias: keep the block whole
                heads = torch.arange(a.W_O.shape[0])
            attn = None
            if len(heads):
                W, b = pack_qkv(a.W_Q[heads], a.W_K[heads], a.W_V[heads],
                                a.b_Q[heads], a.b_K[heads], a.b_V[heads])
                attn = (W, nonzero(b), a.W_O[heads].reshape(len(heads) * E, -1),
                        nonzero(a.b_O), len(heads), E)
            units = (m.W_out != 0).any(1).nonzero().flatten()  # [live M]
            mlp = None
            if len(units) or (m.b_out != 0).any():
                mlp = (m.W_in[:, units], nonzero(m.b_in[units]), m.W_out[units],
                       nonzero(m.b_out))
            plan.append((attn, mlp))
        self._plan = (key, plan)
        return plan

    def run_with_cache(self, tokens, mask=None):
        """Like forward, and also returns a dict of every named activation (see the docstring)."""
        cache = {}
        out = self.forward(tokens, mask, cache)
        return out, cache

    def n_params(self):
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------
# Run files


def atomic_write(path, write):
    """Call write(tmp_path) on a temp file beside path, then rename it: never a half file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; runs and figures are shared
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_figure(fig, path, dpi=110):
    """Write a matplotlib figure as a PNG atomically, then close it."""
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def atomic_torch_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def save(path, model, task, kind, **meta):
    """Save a model, its task (as a plain dict) and meta (arguments, metrics, history) to path."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: allowed are {', '.join(KINDS)}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    run = {"format": RUN_FORMAT, "kind": kind, "config": asdict(model.cfg),
           "state_dict": state, "task": task.to_dict(), "meta": meta}
    atomic_torch_save(run, path)


def read_run(path):
    """Read a run file as its plain dict; a clear ValueError if it is missing or not a run file."""
    if not os.path.isfile(path):
        raise ValueError(f"run file {path!r} does not exist")
    try:
        run = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holds objects we do not load
        raise ValueError(f"{path!r} is not a readable run file: torch.load failed "
                         f"({type(e).__name__}); is it truncated, or not a torch file?") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise ValueError(f"{path!r} is not a run file of this project (no {RUN_FORMAT!r} marker)")
    return run


def load(path):
    """Load a run file -> (model, task, meta); meta also carries 'kind' and 'path'."""
    from tracr_load import Task  # local import: model.py itself needs only torch

    run = read_run(path)
    known = {f.name for f in fields(Config)}
    cfg = Config(**{k: v for k, v in run["config"].items() if k in known})
    model = Transformer(cfg)
    model.load_state_dict(run["state_dict"])
    model.eval()
    meta = dict(run["meta"], kind=run["kind"], path=path)
    return model, Task.from_dict(run["task"]), meta


def update_meta(path, **entries):
    """Add or replace meta entries of an existing run file, atomically."""
    run = read_run(path)
    run["meta"].update(entries)
    atomic_torch_save(run, path)


# ----------------------------------------------------------------------------------------------
# Command-line helpers shared by every script


class ArgParser(argparse.ArgumentParser):
    """argparse with the repo's error convention: one line on stderr and exit status 1
    (argparse's default is the usage text and exit status 2)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(1)


def check_device(device):
    """Raise a one-line ValueError when --device asks for CUDA on a machine without it."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use cpu")
