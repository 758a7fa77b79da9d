"""Write figures/report.md: how compiled and trained models of the same programs differ.

    make report            # runs every step for the default programs, then this script
    make -j2 report        # the same on both cores (independent runs are separate processes)
    python report.py reverse sort --out figures/report.md   # only the table, from runs/

`make report` produces, per program P, the run files this script reads:
    runs/P_tracr.pt                compiled by tracr_load.py
    runs/P_trained.pt              trained from scratch by train.py
    runs/P_compressed_dK.pt        projection compression by compress.py (the smallest d kept)
    runs/P_regularized_report.pt   train.py + regularize.py's L1 on weights
with meta['llc'] added to each by llc.py. This script only reads them, evaluates every model on
the trained run's held-out split, measures compiled-likeness (regularize.compiled_likeness) and
draws the figures with plot.py; it trains nothing.
"""

import argparse
import glob
import os
import re
import sys

import torch

import model as model_lib

PROGRAMS = ("reverse", "sort", "hist", "sort_unique", "frac_prevs", "count", "pair_balance")


def smallest_compressed(program, runs="runs"):
    """Path of the smallest-d compressed run of program at 100% accuracy, or None."""
    best = None
    for path in glob.glob(os.path.join(runs, f"{program}_compressed_d*.pt")):
        m = re.search(r"_compressed_d(\d+)\.pt$", path)
        if not m:
            continue
        meta = model_lib.read_run(path)["meta"]
        if meta.get("accuracy") == 1.0 and (best is None or int(m.group(1)) < best[0]):
            best = (int(m.group(1)), path)
    return best[1] if best else None


def program_runs(program, runs="runs"):
    """The run files of one program that the report uses, as (label, path), existing ones only."""
    paths = [("tracr", os.path.join(runs, f"{program}_tracr.pt")),
             ("trained", os.path.join(runs, f"{program}_trained.pt")),
             ("regularized (L1)", os.path.join(runs, f"{program}_regularized_report.pt"))]
    small = smallest_compressed(program, runs)
    if small:
        paths.append(("compressed", small))
    return [(label, p) for label, p in paths if os.path.exists(p)]


def fmt_llc(meta):
    r = meta.get("llc")
    if isinstance(r, dict) and "mean" in r:
        return f"{r['mean']:.3g} ± {r['std']:.2g}"
    if isinstance(r, dict) and "diverged" in r:
        return "diverged"
    return "-"


def program_table(program, runs="runs"):
    """Markdown table rows for one program, and the run paths used."""
    import regularize
    import train

    found = program_runs(program, runs)
    if not found:
        return None, []
    compiled, task, _ = model_lib.load(os.path.join(runs, f"{program}_tracr.pt"))
    trained_meta = model_lib.read_run(os.path.join(runs, f"{program}_trained.pt"))["meta"] \
        if os.path.exists(os.path.join(runs, f"{program}_trained.pt")) else {}
    seed = trained_meta.get("split_seed", 0)
    _, heldout = train.split(task, seed)
    every = task.all_inputs() if task.n_inputs() <= 20_000 else task.sample(2000, 0)
    small_d = "-"
    lines = ["| kind | d_model | parameters | non-zero | above 1% of max | held-out exact "
             "| all inputs exact | residual R² to compiled, per stage | LLC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, path in found:
        model, task_m, meta = model_lib.load(path)
        if label == "compressed":
            small_d = str(model.cfg.d_model)
        with torch.no_grad():
            params = torch.cat([p.flatten() for p in model.parameters()])
        nonzero = (params != 0).float().mean().item()
        like = regularize.compiled_likeness(model, task_m, compiled, every)
        r2 = " / ".join(f"{v:.2f}" for v in like["r2"].values()) if like["r2"] else "-"
        held = train.evaluate(model, task_m, heldout)["exact"]
        full = train.evaluate(model, task_m, every)["exact"]
        lines.append(f"| {label} (`{os.path.basename(path)}`) | {model.cfg.d_model} | "
                     f"{model.n_params():,} | {nonzero:.3f} | {1 - like['sparsity']:.3f} | "
                     f"{held:.1%} | {full:.1%} | {r2} | {fmt_llc(meta)} |")
    head = (f"D = {compiled.cfg.d_model}, {compiled.cfg.n_layers} layers; smallest compression "
            f"d at 100%: {small_d}; held-out split: seed {seed}, {len(heldout)} inputs")
    return [head, ""] + lines, [p for _, p in found]


def figures_for(program, paths, out_dir):
    """Residual, attention and history figures of a program's runs via plot.py -> PNG paths."""
    import plot
    os.makedirs(out_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(out_dir, f"{program}_*.png")))
    plot.main([*paths, "--out", out_dir, "--what", "resid,attn,history", "--force"])
    after = set(glob.glob(os.path.join(out_dir, f"{program}_*.png")))
    return sorted(after | before)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the compiled-vs-trained report.")
    ap.add_argument("programs", nargs="*", default=list(PROGRAMS))
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out", default="figures/report.md")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--smallest-compressed", metavar="PROGRAM",
                    help="print the path of PROGRAM's smallest 100%% compressed run and exit")
    args = ap.parse_args(argv)
    if args.smallest_compressed:
        path = smallest_compressed(args.smallest_compressed, args.runs)
        if path:
            print(path)
        return 0

    out_dir = os.path.dirname(os.path.abspath(args.out))
    doc = ["# Compiled vs trained: the report", "",
           "Written by `report.py` from the run files in `runs/` (see `make report`). Accuracy "
           "is exact match per sequence. *non-zero*: fraction of parameters that are not exactly "
           "0; *above 1% of max*: fraction of weight-matrix entries with |w| >= 1% of the "
           "largest; R²: least-squares affine read-out of the compiled model's residual stream "
           "from this model's, per stage (embedding, then after each attention and MLP block); "
           "LLC: SGLD estimate of the local learning coefficient (llc.py; for compiled models "
           "after fitting a scale on W_U).", ""]
    for program in args.programs:
        try:
            rows, paths = program_table(program, args.runs)
        except ValueError as e:
            print(f"report: {program}: {e}", file=sys.stderr)
            return 1
        if rows is None:
            print(f"report: no run files for {program} in {args.runs}/; skipped", file=sys.stderr)
            continue
        doc += [f"## {program}", ""] + rows + [""]
        if not args.no_figures:
            for png in figures_for(program, paths, os.path.join(out_dir, "report")):
                rel = os.path.relpath(png, out_dir)
                doc += [f"![{os.path.basename(png)}]({rel})", ""]
    model_lib.atomic_write_text("\n".join(doc) + "\n", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
