"""Speed and quality figures against references measured in the same process: `make bench`.

    python bench.py                 # every benchmark
    python bench.py --only forward  # one section: forward, train, compress, regularize, llc

Numbers are ratios against a reference run in this process (tracr's jitted JAX forward, tracr's
per-sequence `apply`, the devinterp library, ...), never absolute timings checked by a test.
Each file's own figures come from its `bench()` function, which returns rows (dicts); this script
prints them, one table per section, and all of them together at the end.
"""

import argparse
import importlib
import statistics
import sys
import time

import numpy as np
import torch

import tracr_load as tl

FORWARD_PROGRAMS = ("reverse", "sort", "shuffle_dyck2")
SECTIONS = ("forward", "train", "compress", "regularize", "llc", "explain")


def best_time(fn, repeat=20, warmup=3):
    """Median of `repeat` timed calls after `warmup` untimed ones, in seconds."""
    return median_times([fn], repeat, warmup)[0]


def median_times(fns, repeat=50, warmup=5):
    """Median seconds per call of each fn, timed in alternation (fn 1, fn 2, ..., fn 1, ...), so
    that every fn runs on the same machine state: on a shared VM the speed of a core drifts, and
    XLA's worker threads keep spinning for a while after a JAX call."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def bench_forward(programs=FORWARD_PROGRAMS, batch=1024):
    """Our batched forward against tracr's jitted forward and per-sequence apply."""
    import jax

    rows = []
    for name in programs:
        model, task = tl.load_program(name)
        assembled = tl.compile_program(name)
        # A batch of full-length inputs, so that tracr needs no padding.
        rng = np.random.default_rng(0)
        inputs = [list(rng.choice(np.array(task.vocab, dtype=object), task.max_seq_len))
                  for _ in range(batch)]
        tokens, mask = task.encode(inputs)
        enc = assembled.input_encoder.encoding_map
        ids = np.array([[enc[tl.BOS]] + [enc[t] for t in s] for s in inputs], dtype=np.int32)
        forward = jax.jit(assembled.forward)

        def ours():
            with torch.inference_mode():
                model(tokens, mask)

        def theirs():
            jax.block_until_ready(forward(assembled.params, ids).unembedded_output)

        t_ours, t_jit = median_times([ours, theirs])
        # tracr's apply runs one sequence at a time: time a few and scale to the batch.
        few = [[tl.BOS] + s for s in inputs[:8]]
        t_apply = best_time(lambda: [assembled.apply(s) for s in few], repeat=3, warmup=1)
        t_apply *= batch / len(few)
        rows.append({"name": f"forward {name}", "D": model.cfg.d_model, "batch": batch,
                     "ours_ms": 1e3 * t_ours, "tracr_jit_ms": 1e3 * t_jit,
                     "tracr_apply_ms": 1e3 * t_apply, "x_vs_jit": t_jit / t_ours,
                     "x_vs_apply": t_apply / t_ours})
    return rows


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def format_rows(rows):
    """A plain text table of dict rows (the union of their keys as columns)."""
    if not rows:
        return "(no rows)"
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=SECTIONS, action="append",
                    help="run only these sections (repeatable)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    everything = []
    for section in args.only or SECTIONS:
        if section == "forward":
            rows = bench_forward()
        else:
            try:
                module = importlib.import_module(section)
            except ModuleNotFoundError:
                print(f"[{section}] skipped: {section}.py is not in this checkout")
                continue
            rows = module.bench()
        print(f"\n[{section}]\n{format_rows(rows)}", flush=True)
        everything += [dict(section=section, **r) for r in rows]
    # One table for every section: the columns differ between sections, so each row's figures
    # are one cell of key=value pairs.
    summary = [{"section": r["section"], "name": r.get("name", ""),
                "figures": "  ".join(f"{k}={fmt(v)}" for k, v in r.items()
                                     if k not in ("section", "name") and v is not None)}
               for r in everything]
    print(f"\n[all benchmarks]\n{format_rows(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
