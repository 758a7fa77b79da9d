"""Compile tracr's RASP programs and load their weights, exactly, into model.Transformer.

    python tracr_load.py sort --input "3 1 2"          # prints: 1 2 3
    python tracr_load.py reverse --check               # every input vs tracr and RASP
    python tracr_load.py frac_prevs --out runs/frac_prevs_tracr.pt

References: Lindner et al. 2023, "Tracr: Compiled Transformers as a Laboratory for
Interpretability"; Weiss et al. 2021, "Thinking Like Transformers" (RASP).

What this file adds on top of tracr:
- An explicit BOS and a key mask. tracr never masks padding: padded positions are keys like any
  other. Its PAD embedding keeps them out of most selectors, but not all: count_less_freq on
  [b, a, b, c] padded to length 5 answers 5 instead of 4. Here every sequence starts with BOS at
  position 0, batches are right-padded, and attention never reads a padded key, so each real
  position of a padded batch gets exactly what tracr gives for that sequence alone.
- An unembedding W_U. tracr has none: its output is the projection of the residual stream onto the
  output operation's directions, found here by residual label (never assumed to come first).
- A Task: encoding, decoding, ground truth from RASP's own evaluator, sampling, enumeration.

Token ids in a Task: BOS = 0, then the vocab in sorted order, then PAD. tracr's own ids differ
(it sorts BOS and PAD among the vocab); `from_tracr` reorders W_E's rows to match.
"""

import functools
import itertools
import math
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

import model as model_lib
from model import Config, Transformer

BOS, PAD = "compiler_bos", "compiler_pad"
NUMERIC_TOL = 0.05  # a numerical output counts as right when within this of RASP's value
MAX_ENUMERATE = 200_000  # all_inputs() refuses larger input spaces


# ----------------------------------------------------------------------------------------------
# The program registry: every program of tracr.compiler.lib, with default settings.


@dataclass
class ProgramSpec:
    make: object  # (max_seq_len, **args) -> rasp.SOp
    vocab: tuple
    max_seq_len: int
    args: dict = field(default_factory=dict)
    causal_ok: bool = False  # does the causal model equal RASP evaluated on each prefix?
    distinct: bool = False  # inputs must not repeat a token
    mlp_exactness: int = 100
    doc: str = ""


def _registry():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    def add3(x, y, z):  # module-level names keep programs deterministic across rebuilds
        return x + y - z

    return {
        "length": ProgramSpec(
            lambda n: rasp.categorical(lib.make_length()), ("a", "b", "c"), 5,
            causal_ok=True, doc="length of the input, at every position (categorical)"),
        "length_numerical": ProgramSpec(
            lambda n: rasp.numerical(lib.make_length()), ("a", "b", "c"), 5,
            causal_ok=True, doc="length of the input, at every position (numerical)"),
        "reverse": ProgramSpec(
            lambda n: lib.make_reverse(rasp.tokens), ("a", "b", "c"), 5, causal_ok=True,
            doc="the input reversed"),
        "hist": ProgramSpec(
            lambda n: lib.make_hist(), ("a", "b", "c"), 5,
            causal_ok=True, doc="how often each position's token occurs in the input"),
        "sort_unique": ProgramSpec(
            lambda n: lib.make_sort_unique(rasp.tokens, rasp.tokens), (1, 2, 3, 4, 5), 5,
            distinct=True, doc="the input sorted; tokens must be distinct"),
        "sort": ProgramSpec(
            lambda n, min_key: lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=n,
                                             min_key=min_key),
            (1, 2, 3), 5, args={"min_key": 1}, doc="the input sorted, repeats allowed"),
        "sort_freq": ProgramSpec(
            lambda n: lib.make_sort_freq(max_seq_len=n), (1, 2, 3), 5,
            doc="tokens sorted by how often they occur, most frequent first"),
        "frac_prevs": ProgramSpec(
            lambda n, token: lib.make_frac_prevs(rasp.tokens == token),
            ("a", "b", "c", "x"), 5, args={"token": "x"}, causal_ok=True,
            doc="fraction of tokens so far that equal `token` (the tracr paper's setting)"),
        "pair_balance": ProgramSpec(
            lambda n, open, close: lib.make_pair_balance(rasp.tokens, open, close),
            ("(", ")", "a"), 5, args={"open": "(", "close": ")"}, causal_ok=True,
            doc="fraction of opening minus fraction of closing brackets so far"),
        "shuffle_dyck": ProgramSpec(
            lambda n: lib.make_shuffle_dyck(["()"]), ("(", ")"), 8, causal_ok=True,
            doc="1 if the brackets are balanced, else 0 (one bracket type)"),
        "shuffle_dyck2": ProgramSpec(
            lambda n: lib.make_shuffle_dyck2(), ("(", ")", "{", "}"), 6, causal_ok=True,
            doc="1 if both bracket types are balanced (shuffled), else 0"),
        "count_less_freq": ProgramSpec(
            lambda n, k: lib.make_count_less_freq(k), ("a", "b", "c"), 5, args={"k": 2},
            doc="how many positions hold a token that occurs at most k times"),
        "count": ProgramSpec(
            lambda n, token: lib.make_count(rasp.tokens, token), ("a", "b", "c"), 5,
            args={"token": "a"}, causal_ok=True, doc="how often `token` occurs in the input"),
        "nary_sequencemap": ProgramSpec(
            lambda n: lib.make_nary_sequencemap(add3, rasp.tokens, rasp.tokens, rasp.indices),
            (1, 2, 3), 5, causal_ok=True, doc="token + token - index, via nested SequenceMaps"),
        "shift_by": ProgramSpec(
            lambda n, offset: lib.shift_by(offset, rasp.tokens), ("a", "b", "c"), 5,
            args={"offset": 1}, causal_ok=True,
            doc="the input shifted right by `offset` (no output at the first positions)"),
        "detect_pattern": ProgramSpec(
            lambda n, pattern: lib.detect_pattern(rasp.tokens, pattern), ("a", "b", "c"), 5,
            args={"pattern": "abc"}, causal_ok=True,
            doc="True where `pattern` ends (no output at the first len(pattern)-1 positions)"),
    }


class _Registry(dict):
    """PROGRAMS, filled on first use so that `import tracr_load` stays cheap."""

    def _fill(self):
        if not dict.__len__(self):
            self.update(_registry())

    def __getitem__(self, k):
        self._fill()
        return dict.__getitem__(self, k)

    def __iter__(self):
        self._fill()
        return dict.__iter__(self)

    def __len__(self):
        self._fill()
        return dict.__len__(self)

    def __contains__(self, k):
        self._fill()
        return dict.__contains__(self, k)

    def keys(self):
        self._fill()
        return dict.keys(self)

    def items(self):
        self._fill()
        return dict.items(self)


PROGRAMS = _Registry()


def program_spec(name):
    if name not in PROGRAMS:
        raise ValueError(f"unknown program {name!r}; known programs: {', '.join(PROGRAMS)}")
    return PROGRAMS[name]


def settings(name, **overrides):
    """The full settings of a library program: its defaults, with overrides applied."""
    spec = program_spec(name)
    s = {"vocab": spec.vocab, "max_seq_len": spec.max_seq_len, "causal": False,
         "mlp_exactness": spec.mlp_exactness, **spec.args}
    for k, v in overrides.items():
        if k not in s:
            raise ValueError(f"{name}: unknown setting {k!r}; allowed: {', '.join(s)}")
        if v is not None:
            s[k] = v
    s["vocab"] = tuple(sorted(set(s["vocab"]), key=_sort_key))
    if not s["vocab"]:
        raise ValueError(f"{name}: the vocab is empty")
    if not isinstance(s["max_seq_len"], int) or s["max_seq_len"] < 1:
        raise ValueError(f"{name}: max_seq_len={s['max_seq_len']!r} must be a positive integer")
    if s["causal"] and not spec.causal_ok:
        ok = [n for n, p in PROGRAMS.items() if p.causal_ok]
        raise ValueError(f"{name} has no causal form that matches RASP on prefixes; "
                         f"causal programs: {', '.join(ok)}")
    return s


def _sort_key(v):
    return (type(v).__name__, v) if not isinstance(v, (int, float)) else ("0", v)


def make_program(name, **overrides):
    """Build the RASP program of a library program (cheap; no compilation)."""
    s = settings(name, **overrides)
    args = {k: s[k] for k in program_spec(name).args}
    return program_spec(name).make(s["max_seq_len"], **args)


# ----------------------------------------------------------------------------------------------
# Task: the input and output side of a program.


class Task:
    """A RASP program with its vocab, lengths, BOS/PAD tokens and output encoding.

    Token ids: BOS = 0, vocab[i] = i + 1, PAD = len(vocab) + 1. Sequences start with BOS and are
    right-padded; mask is True on BOS and real tokens.
    """

    def __init__(self, program, vocab, max_seq_len, causal=False, name=None, settings=None,
                 distinct=False, output_kind=None, output_vocab=None):
        self.program = program
        self.name = name or (program.label if program is not None else "custom")
        self.vocab = list(vocab)
        self.max_seq_len = int(max_seq_len)
        self.causal = bool(causal)
        self.settings = settings  # library programs: what make_program needs to rebuild
        self.distinct = distinct
        self.bos, self.pad = BOS, PAD
        self.bos_id, self.pad_id = 0, len(self.vocab) + 1
        self.token_to_id = {t: i + 1 for i, t in enumerate(self.vocab)}
        if output_kind is None:
            output_kind, output_vocab = _output_encoding(program, self.vocab, self.max_seq_len)
        self.output_kind = output_kind
        self.output_vocab = list(output_vocab) if output_kind == "categorical" else None
        self.d_vocab = len(self.vocab) + 2
        self.d_vocab_out = len(self.output_vocab) if self.output_kind == "categorical" else 1

    @classmethod
    def from_program(cls, program, vocab, max_seq_len, causal=False, name=None):
        """The Task of any RASP program a user writes."""
        vocab = sorted(set(vocab), key=_sort_key)
        for special in (BOS, PAD):
            if special in vocab:
                raise ValueError(f"the vocab may not contain the reserved token {special!r}")
        return cls(program, vocab, max_seq_len, causal=causal, name=name)

    @classmethod
    def from_name(cls, name, **overrides):
        s = settings(name, **overrides)
        return cls(make_program(name, **overrides), s["vocab"], s["max_seq_len"], s["causal"],
                   name=name, settings=s, distinct=program_spec(name).distinct)

    # Saving: a plain dict. Library programs are rebuilt from their name; a user's own program
    # cannot be serialised (its functions are Python code), so its loaded Task has no targets.
    def to_dict(self):
        return {"name": self.name, "vocab": self.vocab, "max_seq_len": self.max_seq_len,
                "causal": self.causal, "settings": self.settings, "distinct": self.distinct,
                "output_kind": self.output_kind, "output_vocab": self.output_vocab}

    @classmethod
    def from_dict(cls, d):
        if d.get("settings") is not None and d["name"] in PROGRAMS:
            s = dict(d["settings"])
            s["vocab"] = tuple(s["vocab"])
            return cls.from_name(d["name"], **s)
        return cls(None, d["vocab"], d["max_seq_len"], d["causal"], name=d["name"],
                   distinct=d["distinct"], output_kind=d["output_kind"],
                   output_vocab=d["output_vocab"])

    def __repr__(self):
        return (f"Task({self.name}, vocab={self.vocab}, max_seq_len={self.max_seq_len}, "
                f"causal={self.causal}, output={self.output_kind})")

    # Inputs.
    def parse(self, text):
        """'3 1 2' -> [3, 1, 2], matching each word to a vocab token by its printed form."""
        by_str = {str(t): t for t in self.vocab}
        words = text.split()
        for w in words:
            if w not in by_str:
                raise ValueError(f"token {w!r} is not in the vocab {self.vocab}")
        return [by_str[w] for w in words]

    def validate(self, seq):
        if len(seq) == 0:
            raise ValueError("empty input: give at least one token")
        if len(seq) > self.max_seq_len:
            raise ValueError(f"input of length {len(seq)} is longer than "
                             f"max_seq_len={self.max_seq_len} (compile with a larger "
                             "--max-seq-len)")
        for t in seq:
            if t not in self.token_to_id:
                raise ValueError(f"token {t!r} is not in the vocab {self.vocab}")
        if self.distinct and len(set(seq)) != len(seq):
            raise ValueError(f"{self.name} needs distinct tokens; got {list(seq)}")

    def encode(self, inputs):
        """List of token sequences -> (tokens [B, T] long, mask [B, T] bool), BOS first."""
        if len(inputs) == 0:
            raise ValueError("no inputs given")
        for seq in inputs:
            self.validate(seq)
        T = 1 + max(len(s) for s in inputs)
        tokens = torch.full((len(inputs), T), self.pad_id, dtype=torch.long)
        tokens[:, 0] = self.bos_id
        for b, seq in enumerate(inputs):
            tokens[b, 1:len(seq) + 1] = torch.tensor([self.token_to_id[t] for t in seq])
        return tokens, tokens != self.pad_id

    def decode(self, out, mask):
        """out [B, T, O] -> one list of outputs per sequence (real positions, BOS dropped)."""
        lengths = mask.sum(1).tolist()
        if self.output_kind == "categorical":
            idx = out.argmax(-1).tolist()
            return [[self.output_vocab[i] for i in row[1:n]] for row, n in zip(idx, lengths)]
        vals = out[..., 0].tolist()
        return [row[1:n] for row, n in zip(vals, lengths)]

    # Ground truth.
    def targets(self, inputs):
        """RASP's own evaluation of each input (None where RASP gives no value).

        For causal tasks, position i holds RASP evaluated on the prefix up to i, which is what a
        causal model can see (tracr's causal test cases define it so).
        """
        if self.program is None:
            raise ValueError(f"task {self.name!r} was loaded without its RASP program; "
                             "rebuild it with Task.from_program to get targets")
        from tracr.rasp import rasp
        out = []
        for seq in inputs:
            self.validate(seq)
            if self.causal:
                out.append([rasp.evaluate(self.program, list(seq[:i + 1]))[i]
                            for i in range(len(seq))])
            else:
                out.append(list(rasp.evaluate(self.program, list(seq))))
        return out

    def target_tensors(self, inputs, T=None):
        """(y [B, T], valid [B, T] bool) for losses: y is the output-vocab index (categorical) or
        the value (numerical); valid is False on BOS, padding and positions where RASP gives None.
        """
        targets = self.targets(inputs)
        T = T or 1 + max(len(s) for s in inputs)
        numerical = self.output_kind == "numerical"
        y = torch.zeros(len(inputs), T, dtype=torch.float32 if numerical else torch.long)
        valid = torch.zeros(len(inputs), T, dtype=torch.bool)
        index = None if numerical else {v: i for i, v in enumerate(self.output_vocab)}
        for b, row in enumerate(targets):
            for i, v in enumerate(row):
                if v is None:
                    continue
                y[b, i + 1] = float(v) if numerical else index[v]
                valid[b, i + 1] = True
        return y, valid

    def correct(self, outputs, targets):
        """Per position: does an output equal its target? None targets are skipped (not listed)."""
        result = []
        for out_row, tgt_row in zip(outputs, targets):
            row = []
            for o, t in zip(out_row, tgt_row):
                if t is None:
                    continue
                if self.output_kind == "numerical":
                    row.append(o is not None and abs(float(o) - float(t)) <= NUMERIC_TOL)
                else:
                    row.append(o == t)
            result.append(row)
        return result

    # Inputs to run.
    def n_inputs(self):
        n = len(self.vocab)
        if self.distinct:
            return sum(math.perm(n, k) for k in range(1, min(n, self.max_seq_len) + 1))
        return sum(n ** k for k in range(1, self.max_seq_len + 1))

    def all_inputs(self):
        """Every valid input, shortest first, in vocab order within a length."""
        if self.n_inputs() > MAX_ENUMERATE:
            raise ValueError(f"{self.name} has {self.n_inputs()} inputs, more than "
                             f"{MAX_ENUMERATE}; use sample(n, seed) instead")
        out = []
        for k in range(1, self.max_seq_len + 1):
            if self.distinct:
                out += [list(p) for p in itertools.permutations(self.vocab, k)]
            else:
                out += [list(p) for p in itertools.product(self.vocab, repeat=k)]
        return out

    def sample(self, n, seed=0):
        """n random inputs: length uniform in 1..max_seq_len, tokens uniform."""
        rng = random.Random(seed)
        top = min(self.max_seq_len, len(self.vocab)) if self.distinct else self.max_seq_len
        out = []
        for _ in range(n):
            k = rng.randint(1, top)
            out.append(rng.sample(self.vocab, k) if self.distinct
                       else [rng.choice(self.vocab) for _ in range(k)])
        return out


def _output_encoding(program, vocab, max_seq_len):
    """('categorical', values in tracr's output-basis order) or ('numerical', None)."""
    from tracr.compiler import basis_inference, nodes, rasp_to_graph
    from tracr.rasp import rasp

    extracted = rasp_to_graph.extract_rasp_graph(program)
    basis_inference.infer_bases(extracted.graph, extracted.sink, set(vocab), max_seq_len)
    if rasp.is_numerical(program):
        return "numerical", None
    basis = sorted(extracted.sink[nodes.OUTPUT_BASIS])
    return "categorical", [d.value for d in basis]


# ----------------------------------------------------------------------------------------------
# Compiling and loading.


@functools.lru_cache(maxsize=None)
def _compile_cached(name, frozen):
    from tracr.compiler import compiling
    s = dict(frozen)
    program = make_program(name, **s)
    return compiling.compile_rasp_to_model(
        program, vocab=set(s["vocab"]), max_seq_len=s["max_seq_len"], causal=s["causal"],
        compiler_bos=BOS, compiler_pad=PAD, mlp_exactness=s["mlp_exactness"]), program


def _freeze(s):
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                        for k, v in s.items()))


def compile_program(name, **overrides):
    """tracr's assembled model of a library program (compiled once per process and settings)."""
    return _compile_cached(name, _freeze(settings(name, **overrides)))[0]


def from_tracr(assembled, task):
    """Copy tracr's parameters into a Transformer, exactly; build W_U from residual labels."""
    p = {k: {n: np.asarray(v, dtype=np.float32) for n, v in d.items()}
         for k, d in assembled.params.items()}
    mc = assembled.model_config
    labels = list(assembled.residual_labels)
    D = len(labels)
    cfg = Config(d_model=D, n_layers=mc.num_layers, n_heads=mc.num_heads, d_head=mc.key_size,
                 d_mlp=mc.mlp_hidden_size, d_vocab=task.d_vocab, d_vocab_out=task.d_vocab_out,
                 n_ctx=task.max_seq_len + 1, act_fn="relu", causal=task.causal)
    model = Transformer(cfg)
    H, E = cfg.n_heads, cfg.d_head

    # Embeddings: tracr's token rows reordered to the Task's ids.
    tracr_ids = assembled.input_encoder.encoding_map
    rows = [tracr_ids[BOS]] + [tracr_ids[v] for v in task.vocab] + [tracr_ids[PAD]]
    sd = {"W_E": torch.tensor(p["token_embed"]["embeddings"][rows]),
          "W_pos": torch.tensor(p["pos_embed"]["embeddings"][:cfg.n_ctx])}
    for layer in range(cfg.n_layers):
        pre, src = f"blocks.{layer}.", f"transformer/layer_{layer}/"
        for ours, theirs in (("Q", "query"), ("K", "key"), ("V", "value")):
            w = p[src + "attn/" + theirs]
            sd[pre + f"attn.W_{ours}"] = torch.tensor(w["w"].reshape(D, H, E).transpose(1, 0, 2))
            sd[pre + f"attn.b_{ours}"] = torch.tensor(w["b"].reshape(H, E))
        sd[pre + "attn.W_O"] = torch.tensor(p[src + "attn/linear"]["w"].reshape(H, E, D))
        sd[pre + "attn.b_O"] = torch.tensor(p[src + "attn/linear"]["b"])
        sd[pre + "mlp.W_in"] = torch.tensor(p[src + "mlp/linear_1"]["w"])
        sd[pre + "mlp.b_in"] = torch.tensor(p[src + "mlp/linear_1"]["b"])
        sd[pre + "mlp.W_out"] = torch.tensor(p[src + "mlp/linear_2"]["w"])
        sd[pre + "mlp.b_out"] = torch.tensor(p[src + "mlp/linear_2"]["b"])

    # Unembedding: a one-hot read of the output operation's residual directions.
    W_U = torch.zeros(D, cfg.d_vocab_out)
    for j, name in enumerate(output_labels(task)):
        if name not in labels:
            raise ValueError(f"output direction {name!r} not among tracr's residual labels")
        W_U[labels.index(name), j] = 1.0
    sd["W_U"], sd["b_U"] = W_U, torch.zeros(cfg.d_vocab_out)

    model.load_state_dict(sd)
    model.eval()
    model.residual_labels = labels
    return model


def output_labels(task):
    """The residual labels W_U reads, one per output column."""
    from tracr.craft import bases
    label = task.program.label
    if task.output_kind == "numerical":
        return [str(bases.BasisDirection(label))]
    return [str(bases.BasisDirection(label, v)) for v in task.output_vocab]


def load_program(name, **overrides):
    """(Transformer with tracr's compiled weights, Task) for a library program."""
    assembled, program = _compile_cached(name, _freeze(settings(name, **overrides)))
    task = Task.from_name(name, **overrides)
    task.program = program  # the compiled instance: residual labels carry its ids
    return from_tracr(assembled, task), task


_rasp_cache = {}


def compile_rasp(program, vocab, max_seq_len, causal=False, mlp_exactness=100):
    """tracr's assembled model of any RASP program (cached per program object and settings)."""
    from tracr.compiler import compiling
    key = (id(program), tuple(sorted(set(vocab), key=_sort_key)), max_seq_len, causal,
           mlp_exactness)
    if key not in _rasp_cache:
        assembled = compiling.compile_rasp_to_model(
            program, vocab=set(vocab), max_seq_len=max_seq_len, causal=causal,
            compiler_bos=BOS, compiler_pad=PAD, mlp_exactness=mlp_exactness)
        _rasp_cache[key] = (assembled, program)  # holding program keeps its id unique
    return _rasp_cache[key][0]


def load_rasp(program, vocab, max_seq_len, causal=False, mlp_exactness=100):
    """(Transformer, Task) for a RASP program written by the user."""
    assembled = compile_rasp(program, vocab, max_seq_len, causal, mlp_exactness)
    task = Task.from_program(program, vocab, max_seq_len, causal=causal)
    return from_tracr(assembled, task), task


# ----------------------------------------------------------------------------------------------
# Running tracr itself, for comparisons.


_jit_cache = {}


def tracr_forward(assembled, inputs, jit=True):
    """tracr's own forward on inputs of one length -> (residuals, decoded outputs).

    residuals: numpy [embeddings, after attn 0, after mlp 0, ...], each [B, T, D];
    decoded: tracr's own unembedding and output encoder, one list per input (BOS dropped).
    jit=True compiles once per program and length (fast for repeated calls); eager is cheaper
    for a handful of calls.
    """
    lengths = {len(s) for s in inputs}
    if len(lengths) != 1:
        raise ValueError("tracr_forward takes inputs of one length (tracr has no padding mask)")
    forward = assembled.forward
    if jit:
        import jax
        if id(assembled) not in _jit_cache:  # keep assembled alive so its id stays unique
            _jit_cache[id(assembled)] = (assembled, jax.jit(assembled.forward))
        forward = _jit_cache[id(assembled)][1]
    enc = assembled.input_encoder.encoding_map
    ids = np.array([[enc[BOS]] + [enc[t] for t in s] for s in inputs], dtype=np.int32)
    out = forward(assembled.params, ids)
    res = [np.asarray(out.transformer_output.input_embeddings)]
    res += [np.asarray(r) for r in out.transformer_output.residuals]
    unembedded = np.asarray(out.unembedded_output)[:, 1:].tolist()
    decoded = [assembled.output_encoder.decode(row) for row in unembedded]
    return res, decoded


def our_residuals(cache, n_layers):
    """The cache entries that correspond to tracr's residual list, in the same order."""
    names = ["embed"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.resid_mid", f"blocks.{layer}.resid_post"]
    return names, [cache[n] for n in names]


def compare_with_tracr(model, assembled, task, inputs, batch_size=1024, jit=True):
    """Run inputs as right-padded mixed-length batches through model and per length through
    tracr. Returns (max abs residual error per stage over real positions, our decoded outputs,
    tracr's decoded outputs)."""
    errors, ours_decoded, theirs_decoded = {}, [], [None] * len(inputs)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        tokens, mask = task.encode(chunk)
        with torch.no_grad():
            out, cache = model.run_with_cache(tokens, mask)
        ours_decoded += task.decode(out, mask)
        names, ours = our_residuals(cache, model.cfg.n_layers)
        by_len = {}
        for b, s in enumerate(chunk):
            by_len.setdefault(len(s), []).append(b)
        for n, idx in by_len.items():
            theirs, decoded = tracr_forward(assembled, [chunk[b] for b in idx], jit=jit)
            for b, d in zip(idx, decoded):
                theirs_decoded[start + b] = d
            for name, a, r in zip(names, ours, theirs):
                err = float(np.abs(a[idx, :n + 1].numpy() - r).max())
                errors[name] = max(errors.get(name, 0.0), err)
    return errors, ours_decoded, theirs_decoded


# ----------------------------------------------------------------------------------------------
# Command line.



def parse_vocab(text):
    """'1 2 3' or 'a,b,c' -> tuple; all-integer words become ints."""
    words = text.replace(",", " ").split()
    if not words:
        raise ValueError("--vocab is empty")
    if all(w.lstrip("-").isdigit() for w in words):
        return tuple(int(w) for w in words)
    return tuple(words)


def same_outputs(a, b, tol=1e-5):
    """Equal decoded outputs (numbers within tol)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, float) or isinstance(y, float):
            if abs(float(x) - float(y)) > tol:
                return False
        elif x != y:
            return False
    return True


def check(name, model, assembled, task, n_sample=2000, seed=0, show=5):
    """Every input (or a sample) through our model, tracr and RASP. Returns the mismatch count."""
    from tqdm import tqdm
    exhaustive = task.n_inputs() <= 20_000
    inputs = task.all_inputs() if exhaustive else task.sample(n_sample, seed)
    what = "every input" if exhaustive else f"{len(inputs)} sampled inputs (seed {seed})"
    print(f"{name}: {what}, vocab {task.vocab}, max_seq_len {task.max_seq_len}, "
          f"causal {task.causal}, D = {model.cfg.d_model}")
    errors, decoded, theirs = {}, [], []
    for start in tqdm(range(0, len(inputs), 512), desc="check", leave=False,
                      disable=not sys.stderr.isatty()):
        e, d, t = compare_with_tracr(model, assembled, task, inputs[start:start + 512])
        decoded, theirs = decoded + d, theirs + t
        for k, v in e.items():
            errors[k] = max(errors.get(k, 0.0), v)
    targets = task.targets(inputs)
    ok = task.correct(decoded, targets)
    wrong = [i for i, row in enumerate(ok) if not all(row)]
    differ = sum(not same_outputs(a, b) for a, b in zip(decoded, theirs))
    print(f"max |residual - tracr| over every stage and real position: "
          f"{max(errors.values()):.2e}")
    print(f"decoded output differs from tracr's: {differ} of {len(inputs)} inputs")
    print(f"wrong against RASP: {len(wrong)} of {len(inputs)} inputs")
    if wrong and not differ:
        print("every wrong output is tracr's own (the loaded model equals tracr on every input): "
              "a miscompilation, not a loading error" + (
                  "; a larger --mlp-exactness may fix it" if name.startswith("length") else ""))
    fmt = lambda xs: " ".join("-" if x is None else str(x) for x in xs)  # noqa: E731
    for i in wrong[:show]:
        print(f"  input {fmt(inputs[i])} -> model {fmt(decoded[i])}, RASP {fmt(targets[i])}")
    return len(wrong)


def main(argv=None):
    ap = model_lib.ArgParser(
        description="Compile a tracr library program and load it into model.py.")
    ap.add_argument("program", help="one of: " + ", ".join(PROGRAMS))
    ap.add_argument("--vocab", help="tokens, e.g. 'a b c' or '1,2,3'")
    ap.add_argument("--max-seq-len", type=int)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--mlp-exactness", type=int, help="tracr's MLP approximation (default 100)")
    ap.add_argument("--input", help="one input, tokens separated by spaces")
    ap.add_argument("--out", help="write the run file here (e.g. runs/reverse_tracr.pt)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ap.add_argument("--check", action="store_true",
                    help="compare every input (a sample of 2000 where there are more than "
                    "20000) with tracr and RASP; exit 1 if any is wrong")
    ap.add_argument("--seed", type=int, default=0, help="sample seed for --check")
    ap.add_argument("--explain", action="store_true",
                    help="print what every block computes, in RASP terms (explain.py)")
    args = ap.parse_args(argv)

    try:
        overrides = {"max_seq_len": args.max_seq_len, "causal": args.causal or None,
                     "mlp_exactness": args.mlp_exactness}
        if args.vocab is not None:
            overrides["vocab"] = parse_vocab(args.vocab)
        settings(args.program, **overrides)  # validate before the slow compile
        if args.out and not args.force:
            import os
            if os.path.exists(args.out):
                raise ValueError(f"{args.out} exists; pass --force to overwrite it")
        model, task = load_program(args.program, **overrides)
        if args.input is not None:
            seq = task.parse(args.input)
            tokens, mask = task.encode([seq])
            with torch.no_grad():
                out = task.decode(model(tokens, mask), mask)[0]
            print(" ".join("-" if x is None else str(x) for x in out))
        explanation = None
        if args.explain or args.out:  # run files keep it, so plot.py can title blocks
            import explain
            explanation = explain.explain(model, task)
            if args.explain:
                print(explain.format_explanation(explanation))
        n_wrong = 0
        if args.check:
            n_wrong = check(args.program, model, compile_program(args.program, **overrides),
                            task, seed=args.seed)
        if args.out:
            from model import save
            save(args.out, model, task, "tracr", residual_labels=model.residual_labels,
                 explain=explanation)
            print(f"wrote {args.out}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 1 if n_wrong else 0


if __name__ == "__main__":
    sys.exit(main())
