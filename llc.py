"""Local learning coefficient (LLC) of a saved model, estimated by localized SGLD.

    python llc.py runs/*.pt                          # table, results into each run's meta, figure
    python llc.py runs/reverse_tracr.pt --calibrate  # LLC and acceptance over a grid of eps, gamma
    .venv/bin/python -c "import llc; print(llc.bench())"   # deep linear net, and vs devinterp

References: Lau, Furman, Wang, Murfet, Wei 2023, "Quantifying degeneracy in singular models via the
learning coefficient"; Watanabe 2013, "A widely applicable Bayesian information criterion"; Aoyagi
and Watanabe 2005 (reduced-rank regression); Aoyagi 2024 (deep linear networks).

The sampler, for parameters w (all of the model's trainable parameters as one vector), starting
at w0, with L_batch the mean loss over a random minibatch:

    w <- w - (eps/2) * (n*beta * grad L_batch(w) + gamma * (w - w0)) + N(0, eps I)

and the estimate, per chain, from the minibatch losses L_t at the draws after burn-in:

    lambda = n*beta * (mean_t L_t - L(w0)),     L(w0) the loss on the full data,

then the mean and standard deviation over chains. n*beta defaults to n / ln n, n = the number of
samples in the data. The closed-form values assume `loss_fn` is the mean per-sample negative
log-likelihood: for a sequence model that is the summed cross-entropy of a sequence (categorical
outputs) or the summed squared error over 2 (numerical outputs, noise s.d. 1), so here a sample is
a sequence, n is the number of sequences and the loss is not averaged over positions.

Diagnostics: every chain's loss trace, the MALA acceptance rate of a proposal (computed every
`mala_every` steps on the same minibatch, never used to reject), warnings for a trace that stays
below L(w0), one still rising or still falling at the end, and acceptance outside
[ACCEPT_LOW, ACCEPT_HIGH]. A
non-finite or exploding chain stops with an LLCDiverged error naming chain and step.

Step size: `python llc.py` picks eps per run by default (`--eps auto`, choose_eps): the largest
eps of a grid at which a 100-step pilot chain neither diverges nor has a MALA acceptance below
0.95 (on the 5-3-5 reduced-rank regression, acceptance 0.90 overestimated the LLC by 30% and 0.97
was within 1%); if the full run then falls below ACCEPT_LOW or diverges, the next smaller eps.
One fixed eps cannot serve every model here: a compiled model's weights are ~100 and its fitted
loss is sharp, so its eps is 10-100 times smaller than a trained model's.

Chains run one after another with plain autograd (default: the fastest on CPU for small models)
or vectorised with torch.func.vmap (`vectorize=True`); each chain has its own generator seeded
from (seed, chain), so both give the same estimate up to float rounding.

Limitation: the sampler runs in the model's dtype (float32). With a compiled model's weights of
100 and eps near 1e-8, rounding in w is comparable to the step; keep eps >= 1e-7 there.
Limitation: the acceptance rate is MALA's for the minibatch potential, a diagnostic of the step
size only; it says nothing about how well the chain has mixed.
Limitation: for run files the data is every input of the task (or a sample of MAX_ENUMERATE), the
same for compiled and trained models, not a trained model's own training split.

Compiled (tracr) models, and compressed ones made from them, output one-hot projections, whose
logits have no loss minimum. Before
estimating, `fit_unembedding` fits a scale on W_U (or W_U itself) with everything else frozen, and
the loss and gradient norm at w0 are printed. The estimate depends on that choice (see --unembed).
"""

import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

import model as model_lib

ACCEPT_LOW, ACCEPT_HIGH = 0.8, 0.999  # healthy band for the MALA acceptance diagnostic
MAX_ENUMERATE = 4096  # run files: every input if the task has at most this many, else a sample


class LLCDiverged(ValueError):
    """A chain produced a non-finite or exploding loss."""


# ----------------------------------------------------------------------------------------------
# The estimator


class _LossOf(nn.Module):
    """Wraps (model, loss_fn) so functional_call can swap the model's parameters."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _as_tuple(data):
    data = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not data or not all(torch.is_tensor(t) for t in data):
        raise ValueError("data must be a tensor or a tuple of tensors")
    n = data[0].shape[0]
    if any(t.shape[0] != n for t in data):
        raise ValueError(f"data tensors differ in length along dim 0: {[t.shape[0] for t in data]}")
    return data, n


def full_loss(model, loss_fn, data, batch_size=4096):
    """Mean loss over all of data (in chunks; chunk losses weighted by their size)."""
    data, n = _as_tuple(data)
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, batch_size):
            chunk = tuple(t[s:s + batch_size] for t in data)
            total += float(loss_fn(model, chunk)) * chunk[0].shape[0]
    return total / n


def grad_norm(model, loss_fn, data, params=None):
    """Norm of the full-data loss gradient with respect to params (default: all trainable)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    data, n = _as_tuple(data)
    loss = loss_fn(model, data)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return math.sqrt(sum(float((g ** 2).sum()) for g in grads if g is not None))


def estimate_llc(model, loss_fn, data, *, eps, gamma, nbeta=None, chains=4, draws=1000,
                 burnin=500, batch_size=256, seed=0, vectorize=False, mala_every=10,
                 progress=False, device=None):
    """SGLD estimate of the LLC at the model's current parameters w0 (see the file docstring).

    loss_fn(model, batch) -> scalar mean loss; data a tensor or tuple of tensors indexed along
    dim 0. Returns a dict: mean, std (over chains), per_chain, init_loss, nbeta, traces
    [chains, burnin + draws] (minibatch losses), acceptance (mean), acceptance_per_chain,
    warnings (strings, also issued with warnings.warn), seconds, steps_per_second, n, d.
    """
    for name, v in (("eps", eps), ("gamma", gamma)):
        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)) or (
                name == "eps" and v == 0):
            raise ValueError(f"{name}={v!r}: must be a finite number > 0 (gamma may be 0)")
    for name, v in (("chains", chains), ("draws", draws), ("batch_size", batch_size),
                    ("mala_every", mala_every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: must be a positive integer")
    if not isinstance(burnin, int) or burnin < 0:
        raise ValueError(f"burnin={burnin!r}: must be an integer >= 0")
    data, n = _as_tuple(data)
    if n < 2:
        raise ValueError(f"data has {n} sample(s); the estimate needs at least 2")
    batch_size = min(batch_size, n)
    nbeta = n / math.log(n) if nbeta is None else float(nbeta)
    if not nbeta > 0:
        raise ValueError(f"nbeta={nbeta!r}: must be > 0")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    data = tuple(t.to(device) for t in data)

    was_training = model.training
    model.eval()  # dropout off: the posterior is over weights, not dropout masks
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for k, p in model.named_parameters() if p.requires_grad]
    sizes = [math.prod(s) for s in shapes]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    w0 = w0.to(device)  # [P]
    d = w0.numel()
    init_loss = full_loss(model, loss_fn, data)
    wrapper = _LossOf(model, loss_fn)

    def loss_at(w, batch):  # w [P] -> scalar
        params = {"model." + k: v.view(s) for k, v, s in zip(names, w.split(sizes), shapes)}
        return functional_call(wrapper, params, (batch,))

    # One evaluation of potential U = n*beta*L + gamma/2 |w - w0|^2 and its gradient.
    def potential(w, batch):
        g, loss = grad_and_value(loss_at)(w, batch)
        delta = w - w0
        return loss, nbeta * g + gamma * delta, nbeta * loss + 0.5 * gamma * (delta ** 2).sum()

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.data for p in params]

    def potential_plain(w, batch):  # the same without torch.func: the fastest for small models
        for p, v, s in zip(params, w.split(sizes), shapes):
            p.data = v.view(s)
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
        delta = w - w0
        return (loss.detach(), nbeta * g + gamma * delta,
                nbeta * loss.detach() + 0.5 * gamma * (delta ** 2).sum())

    step_fn = vmap(potential) if vectorize else potential_plain
    gens = [torch.Generator(device).manual_seed(1_000_003 * (seed + 1) + c) for c in range(chains)]
    perms = [torch.empty(0, dtype=torch.long, device=device) for _ in range(chains)]

    def next_batch(c):  # chain c's next minibatch: epochs of random permutations
        if perms[c].numel() < batch_size:
            perms[c] = torch.cat([perms[c], torch.randperm(n, generator=gens[c], device=device)])
        idx, perms[c] = perms[c][:batch_size], perms[c][batch_size:]
        return idx

    steps = burnin + draws
    traces = torch.zeros(chains, steps)
    accept_sum, accept_count = torch.zeros(chains), 0
    limit = max(1e4, 100.0 * d)  # n*beta*(L - L0) above this: the chain has exploded
    w = w0.repeat(chains, 1)  # [C, P]
    from tqdm import tqdm

    def one_step(t):
        idx = [next_batch(c) for c in range(chains)]
        noise = torch.stack([torch.randn(d, generator=gens[c], device=device)
                             for c in range(chains)])  # [C, P]
        mala = t >= burnin and (t - burnin) % mala_every == 0
        for c in range(1) if vectorize else range(chains):
            rows = slice(None) if vectorize else slice(c, c + 1)
            if vectorize:
                batch = tuple(x[torch.stack(idx)] for x in data)  # each [C, m, ...]
                loss, g, U = step_fn(w, batch)
            else:
                batch = tuple(x[idx[c]] for x in data)
                loss, g, U = (v.unsqueeze(0) for v in step_fn(w[c], batch))
            new = w[rows] - 0.5 * eps * g + math.sqrt(eps) * noise[rows]  # [C or 1, P]
            if mala:  # log q(w | new) - log q(new | w) + U(w) - U(new), same minibatch
                loss2, g2, U2 = (step_fn(new, batch) if vectorize else
                                 (v.unsqueeze(0) for v in step_fn(new[0], batch)))
                step = new.double() - w[rows].double()  # float64: small steps, big weights
                back = ((-step + 0.5 * eps * g2.double()) ** 2).sum(-1)
                fwd = ((step + 0.5 * eps * g.double()) ** 2).sum(-1)
                log_a = U.double() - U2.double() - (back - fwd) / (2 * eps)
                accept_sum[rows] += torch.exp(torch.clamp(log_a, max=0.0)).nan_to_num(0.0).cpu()
            traces[rows, t] = loss.detach().float().cpu()
            w[rows] = new.detach()
        return int(mala)

    start = time.time()
    try:
        for t in tqdm(range(steps), desc="SGLD", disable=not progress, leave=False):
            accept_count += one_step(t)
            if (t + 1) % 50 == 0 or t + 1 == steps:
                _check_finite(traces, t, init_loss, nbeta, limit, eps)
    finally:  # the model leaves as it came: parameters at w0, same mode
        for p, v in zip(params, saved):
            p.data = v
        model.train(was_training)
    seconds = time.time() - start

    per_chain = (nbeta * (traces[:, burnin:].double().mean(1) - init_loss)).tolist()
    mean = sum(per_chain) / chains
    std = math.sqrt(sum((x - mean) ** 2 for x in per_chain) / (chains - 1)) if chains > 1 else 0.0
    acc = (accept_sum / max(accept_count, 1)).tolist()
    result = dict(mean=mean, std=std, per_chain=per_chain, init_loss=init_loss, nbeta=nbeta,
                  traces=traces, acceptance=sum(acc) / chains, acceptance_per_chain=acc,
                  eps=eps, gamma=gamma, chains=chains, draws=draws, burnin=burnin,
                  batch_size=batch_size, seed=seed, n=n, d=d, seconds=seconds,
                  steps_per_second=chains * steps / seconds)
    result["warnings"] = diagnose(result)
    for msg in result["warnings"]:
        warnings.warn(msg, stacklevel=2)
    return result


def _check_finite(traces, t, init_loss, nbeta, limit, eps):
    """Raise LLCDiverged at the first bad (chain, step) among steps 0..t."""
    block = traces[:, :t + 1]
    bad = ~torch.isfinite(block) | (nbeta * (block - init_loss) > limit)
    if bad.any():
        c, s = (int(v) for v in bad.nonzero()[0])
        raise LLCDiverged(f"chain {c} diverged at step {s} (loss {float(block[c, s]):.4g}, "
                          f"L(w0) {init_loss:.4g}); try a smaller eps than {eps:g}")


def diagnose(r):
    """Warnings for suspect traces and acceptance (strings)."""
    out = []
    post = r["nbeta"] * (r["traces"][:, r["burnin"]:].double() - r["init_loss"])  # [C, draws]
    for c in range(r["chains"]):
        x = post[c]
        below = float((x < 0).double().mean())
        if below > 0.6:
            out.append(f"chain {c}: loss below L(w0) on {below:.0%} of draws; w0 is not a local "
                       "minimum (fit it first, or raise gamma)")
        if x.numel() >= 16:  # rising: second half of 8 block means above the first half
            blocks = torch.stack([b.mean() for b in x.chunk(8)])
            rise = float(blocks[4:].mean() - blocks[:4].mean())
            noise = float(blocks.std()) / math.sqrt(2)
            if rise > max(0.1 * abs(r["per_chain"][c]), 2 * noise):
                out.append(f"chain {c}: trace still rising at the end (+{rise:.3g} over the "
                           "draws); use a longer burn-in or a larger eps")
            elif -rise > max(0.1 * abs(r["per_chain"][c]), 2 * noise):
                out.append(f"chain {c}: trace still falling at the end ({rise:.3g} over the "
                           "draws): the chain is moving off w0 toward lower loss, so the "
                           "estimate has not settled; raise gamma or fit w0 closer to a minimum")
    a = r["acceptance"]
    if not ACCEPT_LOW <= a <= ACCEPT_HIGH:
        hint = "try a smaller eps" if a < ACCEPT_LOW else "eps could be larger"
        out.append(f"MALA acceptance {a:.3f} outside [{ACCEPT_LOW}, {ACCEPT_HIGH}]; {hint}")
    return out


def calibrate(model, loss_fn, data, eps_grid, gamma_grid, **kw):
    """Estimate over a grid of eps and gamma -> list of (eps, gamma, result or error string).
    Pick the largest eps whose acceptance is healthy and whose estimate agrees with smaller eps
    (a too-large eps inflates the estimate), and a gamma at which the estimate has settled."""
    rows = []
    for eps in eps_grid:
        for gamma in gamma_grid:
            w0 = [p.detach().clone() for p in model.parameters()]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rows.append((eps, gamma, estimate_llc(model, loss_fn, data, eps=eps,
                                                          gamma=gamma, **kw)))
            except LLCDiverged as e:
                rows.append((eps, gamma, f"diverged: {e}"))
            with torch.no_grad():  # the estimator never changes the model; make sure
                for p, q in zip(model.parameters(), w0):
                    p.copy_(q)
    return rows


EPS_GRID = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)  # what --eps auto tries
EPS_TARGET = 0.95  # --eps auto: the largest grid eps whose pilot acceptance is at least this


def choose_eps(model, loss_fn, data, *, gamma, nbeta=None, batch_size=256, seed=0,
               grid=EPS_GRID, target=EPS_TARGET, pilot_steps=100):
    """The largest eps of `grid` at which a short pilot chain neither diverges nor has a MALA
    acceptance below `target` -> (eps, pilots). A step that is too large biases the estimate
    upward and one that is too small never leaves w0, so eps is chosen per model: a compiled
    model's weights of 100 need a step 10-100 times smaller than a trained model's. If no pilot
    reaches target: the eps of the highest pilot acceptance, with a warning.
    pilots: one (eps, acceptance or 'diverged') per eps tried."""
    pilots = []
    best = None  # (acceptance, eps) of the healthiest pilot, in case none reaches target
    for eps in sorted(grid, reverse=True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = estimate_llc(model, loss_fn, data, eps=eps, gamma=gamma, nbeta=nbeta,
                                 chains=1, draws=pilot_steps, burnin=0, batch_size=batch_size,
                                 seed=seed, mala_every=5)
        except LLCDiverged:
            pilots.append((eps, "diverged"))
            continue
        pilots.append((eps, r["acceptance"]))
        if r["acceptance"] >= target:
            return eps, pilots
        if best is None or r["acceptance"] > best[0]:
            best = (r["acceptance"], eps)
    if best is None:
        raise LLCDiverged(f"every step size in {min(grid):g}..{max(grid):g} diverged; give "
                          "--eps by hand (see --calibrate)")
    warnings.warn(f"no step size in {min(grid):g}..{max(grid):g} gives a pilot acceptance of "
                  f"{target}; taking eps {best[1]:g} (acceptance {best[0]:.3f}, the highest)",
                  stacklevel=2)
    return best[1], pilots


# ----------------------------------------------------------------------------------------------
# Saved models: data, loss and the unembedding fit


def run_data(task, seed=0):
    """(tokens, mask, y, valid): every input of the task, or a sample when there are too many."""
    n_all = task.n_inputs()
    inputs = task.all_inputs() if n_all <= MAX_ENUMERATE else task.sample(MAX_ENUMERATE, seed)
    tokens, mask = task.encode(inputs)  # [N, T]
    y, valid = task.target_tensors(inputs, T=tokens.shape[1])  # [N, T]
    return tokens, mask, y, valid


def sequence_loss(task):
    """loss_fn(model, (tokens, mask, y, valid)): the mean over sequences of each sequence's
    negative log-likelihood, summed over its valid positions (cross-entropy on logits, or squared
    error / 2 for numerical outputs)."""
    numerical = task.output_kind == "numerical"

    def loss_fn(model, batch):
        tokens, mask, y, valid = batch
        out = model(tokens, mask)  # [B, T, O]
        if numerical:
            per_pos = 0.5 * (out[..., 0] - y) ** 2  # [B, T]
        else:
            per_pos = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
            per_pos = per_pos.view(y.shape)  # [B, T]
        return (per_pos * valid).sum(1).mean()

    return loss_fn


def fit_unembedding(model, loss_fn, data, mode="scale", scale=None, nbeta=None, max_iter=100):
    """Fit W_U and b_U with every other weight frozen, so that w0 is near a loss minimum.

    A compiled model's one-hot outputs separate the data: the loss falls forever as W_U grows, so
    "near a minimum" is taken to mean n*beta * |gradient| <= 1 (the gradient's pull is below the
    sampler's unit noise scale). mode 'scale': one factor s on (W_U, b_U), the first s from 1 in
    the downhill direction of log s where n*beta * |dL/dlog s| <= 1 (or `scale` if given);
    'full': W_U and b_U by L-BFGS until n*beta * max |gradient| <= 1; 'none': leave them.
    Returns a dict describing the fit.
    """
    if mode not in ("scale", "full", "none"):
        raise ValueError(f"unembed mode {mode!r}: allowed are 'scale', 'full', 'none'")
    data, n = _as_tuple(data)
    nbeta = n / math.log(n) if nbeta is None else nbeta
    before = full_loss(model, loss_fn, data)
    W, b = model.W_U.detach().clone(), model.b_U.detach().clone()
    info = {"mode": mode, "loss_before": before}
    if mode == "scale":
        def slope(u):  # n*beta * dL/du at s = exp(u)
            u = torch.tensor(float(u), requires_grad=True)
            loss = loss_fn(lambda *a: functional_call(
                model, {"W_U": W * u.exp(), "b_U": b * u.exp()}, a), data)
            return nbeta * float(torch.autograd.grad(loss, u)[0])

        u = 0.0 if scale is None else math.log(scale)
        if scale is None and abs(slope(u)) > 1:
            sign = -1.0 if slope(u) > 0 else 1.0  # walk downhill in u
            lo, step = u, 0.5
            while abs(slope(lo + sign * step)) > 1 and sign * slope(lo + sign * step) < 0:
                lo, step = lo + sign * step, 2 * step
                if step > 64:
                    raise ValueError("the W_U scale fit did not settle within s = exp(+-64)")
            hi = lo + sign * step  # the first point that is flat enough or past the minimum
            for _ in range(40):  # bisect to the boundary of n*beta*|slope| <= 1
                mid = 0.5 * (lo + hi)
                if abs(slope(mid)) > 1 and sign * slope(mid) < 0:
                    lo = mid
                else:
                    hi = mid
            u = hi
        s = math.exp(u)
        with torch.no_grad():
            model.W_U.copy_(W * s)
            model.b_U.copy_(b * s)
        info["scale"] = s
    elif mode == "full":
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        model.W_U.requires_grad_(True)
        model.b_U.requires_grad_(True)
        opt = torch.optim.LBFGS([model.W_U, model.b_U], lr=1.0, max_iter=max_iter,
                                tolerance_grad=1.0 / nbeta, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_fn(model, data)
            loss.backward()
            return loss

        opt.step(closure)
        for p, r in frozen:
            p.requires_grad_(r)
            p.grad = None
    info["loss"] = full_loss(model, loss_fn, data)
    info["grad_norm_unembed"] = grad_norm(model, loss_fn, data, [model.W_U, model.b_U])
    info["grad_norm"] = grad_norm(model, loss_fn, data)
    return info


# ----------------------------------------------------------------------------------------------
# Benchmark: a deep linear network with a known coefficient, and the devinterp library


def deep_linear_problem(widths=(5, 5, 5, 5), rank=2, n=5000, seed=0):
    """A bias-free deep linear network at a teacher of the given rank, and n samples from it.

    Every layer of the teacher is diag(1, 1.5, ..., 0, 0): the rank-r directions sit on the same
    axes in every layer, the most singular factorisation, where the local coefficient equals
    Aoyagi's global one (11 for 5-5-5-5 of rank 2). Noise s.d. 1, so the per-sample negative
    log-likelihood is half the squared error summed over outputs.
    """
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])])
    with torch.no_grad():
        for layer in net:
            layer.weight.zero_()
            for k in range(rank):
                layer.weight[k, k] = 1.0 + 0.5 * k
    x = torch.randn(n, widths[0], generator=g)  # [n, in]
    y = net(x).detach() + torch.randn(n, widths[-1], generator=g)  # [n, out]
    return net, (x, y)


def half_squared_error(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def bench(eps=1e-4, gamma=5.0, chains=4, draws=1500, burnin=500, batch_size=500, seed=0):
    """The 5-5-5-5 rank-2 deep linear network (coefficient 11) through this estimator and through
    devinterp 1.3.x with the same model, data, n*beta, L(w0) and settings (one thread each).
    Returns rows for bench.py; devinterp is needed only here (make bench-deps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, data = deep_linear_problem(seed=seed)
        settings = dict(eps=eps, gamma=gamma, chains=chains, draws=draws, burnin=burnin,
                        batch_size=batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = estimate_llc(net, half_squared_error, data, seed=seed, **settings)
            theirs = _devinterp(net, data, ours["nbeta"], ours["init_loss"], seed, **settings)
    finally:
        torch.set_num_threads(threads)
    both = math.hypot(ours["std"], theirs["std"])
    rows = [dict(name="llc: deep linear 5-5-5-5 rank 2 (expected 11), this estimator",
                 llc=ours["mean"], std=ours["std"], expected=11.0,
                 rel_error=ours["mean"] / 11.0 - 1, acceptance=ours["acceptance"],
                 steps_per_s=ours["steps_per_second"], **settings),
            dict(name="llc: same problem, devinterp " + theirs["version"],
                 llc=theirs["mean"], std=theirs["std"], expected=11.0,
                 rel_error=theirs["mean"] / 11.0 - 1, steps_per_s=theirs["steps_per_second"]),
            dict(name="llc: this estimator vs devinterp",
                 speed_ratio=ours["steps_per_second"] / theirs["steps_per_second"],
                 difference=ours["mean"] - theirs["mean"],
                 within_error_bars=abs(ours["mean"] - theirs["mean"]) <= min(ours["std"],
                                                                             theirs["std"]),
                 difference_in_combined_std=abs(ours["mean"] - theirs["mean"]) / both)]
    return rows


def _devinterp(net, data, nbeta, init_loss, seed, eps, gamma, chains, draws, burnin,
               batch_size):
    import devinterp
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    from torch.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=True)
    start = time.time()
    r = estimate_learning_coeff_with_summary(
        net, loader, evaluate=half_squared_error, sampling_method=SGLD,
        optimizer_kwargs=dict(lr=eps, localization=gamma, nbeta=nbeta), num_chains=chains,
        num_draws=draws, num_burnin_steps=burnin, init_loss=init_loss, seed=seed,
        verbose=False)
    seconds = time.time() - start
    return dict(mean=r["llc/mean"], std=r["llc/std"], version=devinterp.__version__
                if hasattr(devinterp, "__version__") else "1.3",
                steps_per_second=chains * (draws + burnin) / seconds)


# ----------------------------------------------------------------------------------------------
# Command line



def build_parser():
    ap = model_lib.ArgParser(
        description="SGLD estimates of the local learning coefficient of saved runs.")
    ap.add_argument("runs", nargs="+", help="run files (runs/*.pt)")
    ap.add_argument("--eps", default="auto",
                    help="SGLD step size, or 'auto' (default): per run, the largest of "
                    f"{', '.join(f'{e:g}' for e in EPS_GRID)} whose pilot chain's MALA "
                    f"acceptance is at least {EPS_TARGET}")
    ap.add_argument("--gamma", type=float, default=100.0, help="localization strength")
    ap.add_argument("--nbeta", type=float, default=None, help="n*beta (default n / ln n)")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=500, help="SGLD steps counted after burn-in")
    ap.add_argument("--burnin", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per SGLD step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: small models gain nothing from more)")
    ap.add_argument("--unembed", default="auto", choices=("auto", "scale", "full", "none"),
                    help="fit before estimating; auto: 'scale' for tracr and compressed runs "
                    "(their outputs are one-hot projections), else 'none'")
    ap.add_argument("--scale", type=float, default=None, help="fixed W_U scale (no fit)")
    ap.add_argument("--calibrate", action="store_true",
                    help="print LLC and acceptance over a grid of eps and gamma; store nothing")
    ap.add_argument("--record-diverged", action="store_true",
                    help="a run whose chains diverge at every eps gets meta['llc'] = "
                    "{'diverged': message} and does not make the exit status 1 (make report)")
    ap.add_argument("--figure", default="figures/llc_traces.png")
    ap.add_argument("--force", action="store_true",
                    help="replace an existing meta['llc'] and an existing --figure")
    return ap


def prepare(path, args):
    """Load a run, fit its unembedding if asked -> (model, loss_fn, data, meta, fit info)."""
    model, task, meta = model_lib.load(path)
    if task.program is None:
        raise ValueError(f"{path}: its task {task.name!r} has no RASP program, so no targets")
    model.to(args.device)
    data = tuple(t.to(args.device) for t in run_data(task, args.seed))
    loss_fn = sequence_loss(task)
    mode = args.unembed if args.unembed != "auto" else (
        "scale" if meta["kind"] in ("tracr", "compressed") else "none")
    if args.scale is not None:
        if not args.scale > 0:
            raise ValueError(f"--scale {args.scale}: must be > 0")
        mode = "scale"
    fit = fit_unembedding(model, loss_fn, data, mode, scale=args.scale, nbeta=args.nbeta)
    return model, loss_fn, data, meta, fit


def _settings(args):
    return dict(eps=args.eps, gamma=args.gamma, nbeta=args.nbeta, chains=args.chains,
                draws=args.draws, burnin=args.burnin, batch_size=args.batch_size,
                seed=args.seed)


def _estimate(model, loss_fn, data, args):
    """estimate_llc with the command line's settings. With --eps auto: the pilot's eps, and if
    the full run then diverges or its acceptance falls below ACCEPT_LOW (the pilot is one short
    chain), the next smaller eps of the grid, at most twice."""
    settings = _settings(args)
    run = lambda: estimate_llc(model, loss_fn, data, **settings,  # noqa: E731
                               device=args.device, progress=sys.stderr.isatty())
    if args.eps != "auto":
        return run()
    eps, pilots = choose_eps(model, loss_fn, data, gamma=args.gamma, nbeta=args.nbeta,
                             batch_size=args.batch_size, seed=args.seed)
    tried = ", ".join(f"{e:g}: {a if isinstance(a, str) else f'{a:.3f}'}" for e, a in pilots)
    print(f"  eps {eps:g} (pilot acceptance by eps: {tried})")
    smaller = [e for e in sorted(EPS_GRID, reverse=True) if e < eps][:2]
    for i, settings["eps"] in enumerate([eps] + smaller):
        last = i == len(smaller)
        try:
            with warnings.catch_warnings():
                if not last:
                    warnings.simplefilter("ignore")
                r = run()
        except LLCDiverged as e:
            if last:
                raise
            print(f"  eps {settings['eps']:g}: {e}; retrying with a smaller eps")
            continue
        if r["acceptance"] >= ACCEPT_LOW or last:
            if not last:
                for msg in r["warnings"]:
                    warnings.warn(msg, stacklevel=2)
            return r
        print(f"  eps {settings['eps']:g}: acceptance {r['acceptance']:.3f} below {ACCEPT_LOW}; "
              "retrying with a smaller eps")


def _fit_line(path, fit):
    what = {"none": "no unembedding fit", "full": "W_U fitted"}.get(
        fit["mode"], f"W_U scale {fit.get('scale', 1.0):.4g}")
    return (f"{path}: {what}; loss at w0 {fit['loss']:.4g} (was {fit['loss_before']:.4g}), "
            f"|grad| at w0 {fit['grad_norm']:.3g} (unembedding {fit['grad_norm_unembed']:.3g})")


def write_figure(rows, path):
    """One panel per run: every chain's n*beta*(L_t - L(w0)) against the SGLD step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.4), squeeze=False,
                             layout="constrained")
    for ax, (name, kind, r) in zip(axes[0], rows):
        y = r["nbeta"] * (r["traces"].double() - r["init_loss"])  # [C, steps]
        for c, trace in enumerate(y):
            ax.plot(trace.numpy(), lw=0.7, label=f"chain {c}")
        post = y[:, r["burnin"]:].flatten()
        if post.numel():  # the y range of the draws: a burn-in transient may be far larger
            lo, hi = float(post.min()), float(post.quantile(0.995))
            ax.set_ylim(min(lo, 0.0) - 0.05 * (hi - lo), hi + 0.3 * (hi - lo + 1e-12))
        ax.axvline(r["burnin"], color="k", ls=":", lw=1)
        ax.axhline(r["mean"], color="k", ls="--", lw=1)
        ax.set_title(f"{name} ({kind})\nLLC {r['mean']:.3g} ± {r['std']:.2g}", fontsize=8)
        ax.set_xlabel("SGLD step (dotted: end of burn-in)")
        ax.set_ylabel("n·β·(L_t − L(w0))")
        ax.legend(fontsize=6)
    model_lib.save_figure(fig, path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.eps != "auto":
            try:
                args.eps = float(args.eps)
            except ValueError:
                raise ValueError(f"--eps {args.eps!r}: give a number > 0 or 'auto'") from None
        for name in ("eps", "gamma"):
            if getattr(args, name) != "auto" and not getattr(args, name) > 0:
                raise ValueError(f"--{name} {getattr(args, name)}: must be > 0")
        if args.calibrate and args.eps == "auto":
            raise ValueError("--calibrate needs a centre --eps (a number): the grid is "
                             "0.1x to 3x of it")
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
        model_lib.check_device(args.device)
        for path in args.runs:
            model_lib.read_run(path)  # every path readable before the slow part
        if not args.calibrate and os.path.exists(args.figure) and not args.force:
            raise ValueError(f"{args.figure} exists; pass --force to overwrite it")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    status, rows, table = 0, [], []
    for path in args.runs:
        try:
            model, loss_fn, data, meta, fit = prepare(path, args)
            print(_fit_line(path, fit))
            if args.calibrate:
                s = _settings(args)
                s.update(chains=min(args.chains, 2), draws=max(100, args.draws // 4),
                         burnin=max(50, args.burnin // 4))
                grid = calibrate(model, loss_fn, data, [args.eps * f for f in (0.1, 0.3, 1, 3)],
                                 [args.gamma * f for f in (0.1, 1, 10)],
                                 **{k: v for k, v in s.items() if k not in ("eps", "gamma")})
                print(f"{'eps':>9} {'gamma':>9} {'LLC':>18} {'accept':>7}  warnings")
                for eps, gamma, r in grid:
                    if isinstance(r, str):
                        print(f"{eps:9.3g} {gamma:9.3g} {r}")
                        continue
                    print(f"{eps:9.3g} {gamma:9.3g} {r['mean']:9.3g} ± {r['std']:<6.2g} "
                          f"{r['acceptance']:7.3f}  {len(r['warnings'])}")
                continue
            with warnings.catch_warnings(record=True) as caught:  # printed once, below
                warnings.simplefilter("always")
                r = _estimate(model, loss_fn, data, args)
            for msg in dict.fromkeys(str(w.message) for w in caught):
                print(f"  warning: {msg}")
            table.append((path, meta["kind"], model.n_params(), r))
            rows.append((os.path.basename(path), meta["kind"], r))
            keep = {k: v for k, v in r.items() if k != "traces"}
            keep.update(traces=r["traces"].clone(), unembed=fit, loss=(
                "per-sequence NLL on logits, summed over valid positions, mean over sequences"))
            if "llc" in meta and not args.force:
                print(f"  {path}: kept its existing meta['llc'] (pass --force to replace it)")
            else:
                model_lib.update_meta(path, llc=keep)
        except LLCDiverged as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            if args.record_diverged:  # the run file says so, and the batch goes on
                if "llc" not in meta or args.force:
                    model_lib.update_meta(path, llc={"diverged": str(e)})
            else:
                status = 1
        except ValueError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            status = 1
    if table:
        print(f"\n{'file':<32} {'kind':<11} {'params':>7} {'LLC':>17} {'eps':>7} {'accept':>7} "
              f"{'seconds':>8}")
        for path, kind, n_params, r in table:
            llc_text = f"{r['mean']:.3g} ± {r['std']:.2g}"
            print(f"{path:<32} {kind:<11} {n_params:>7} {llc_text:>17} {r['eps']:>7.1g} "
                  f"{r['acceptance']:>7.3f} {r['seconds']:>8.1f}")
        write_figure(rows, args.figure)
        print(f"wrote {args.figure}")
    return status


if __name__ == "__main__":
    sys.exit(main())
