"""Transformers: lrpc's compiled AttnLRP against LXT 2.1's efficient mode and plain inference.

Run from the repository root::

    python benchmarks/transformer_scale.py --lxt-python .venv-lxt/bin/python                  # full run (~10 min, 2 cores)
    python benchmarks/transformer_scale.py --lxt-python .venv-lxt/bin/python --quick          # tiny models, < 1 min
    python benchmarks/transformer_scale.py --lxt-python .venv-lxt/bin/python --output BENCHMARKS.md

Contenders, each in its own fresh process, on the same weights, token ids, mask and explained logit:

* ``lrpc``: ``lrpc.compile(export, "AttnLRP(epsilon=1e-10)", normalize_output_relevance=False)``
  (ε = 1e-10: LXT's, see below; unnormalized: the relevance starts at the logit, as LXT's
  Gradient × Input does), opened as ``lrpc.LRP`` opens a compiled file (``lrpc.runtime.session.make_session``
  of its path, which onnxruntime reads itself: ``ORT_ENABLE_ALL``, no memory pattern, no
  pre-packing of product weights as the file's ``lrpc.pack_weights`` says), fed ``input_ids``,
  ``attention_mask`` and ``lrp_target``; outputs ``logits`` and ``relevance`` [N, T, H] at the
  token embeddings.
* ``LXT``: LXT 2.1, ``lxt.efficient.monkey_patch(modeling_module)`` on transformers 4.52.4 (LXT's
  tested version; its own virtualenv, ``--lxt-python``), the same configuration built there and
  the same ``state_dict`` loaded with ``strict=True``, parameters ``requires_grad=False``, eval
  mode; one call = the word-embedding lookup, ``inputs_embeds.requires_grad_()``, the forward,
  ``backward()`` of the explained logit (batched: the sum of each sample's), relevance
  ``inputs_embeds * inputs_embeds.grad``. LXT's ε: the identity rule on elementwise
  non-linearities divides by ``input + 1e-10`` (``identity_rule_implicit_fn.forward``'s
  ``epsilon=1e-10``, not exposed); linear layers are plain gradients (ε = 0).
* ``plain``: onnxruntime inference of the same export (its defaults, as ``run.py`` times it).

Models (random weights: Hugging Face's own seeded initialization, std 0.02, built once in the main
environment, saved with ``torch.save`` under ``.bench/transformers/`` and exported with torch's
legacy exporter, opset 17, ``attn_implementation="eager"`` on both sides): GPT-2 6 × 768
(T = 256, batch 1, the last position's arg-max logit), a LLaMA-style causal LM 6 × 1024 (16 heads,
4 key/value heads, SwiGLU 2816, T = 256, batch 1), a BERT 6 × 768 for sequence classification
(T = 128, batch 4, the arg-max class of each sample), and for the scaling a 12 × 1024 GPT-2-style
model at T = 256, 512, 1024 (lrpc and LXT).

The parent drives the contenders of a model in lock-step (lrpc, LXT, plain, lrpc, ...):
``--warmup`` calls, then ``--repeats`` timed calls, median reported. Peak memory: each process's
``VmHWM`` at its end (interpreter, libraries, weights, session / model and every call included,
as ``memory.py`` reads it), and the peak of the calls alone (``VmHWM`` reset through
``/proc/self/clear_refs`` after setup). Compile time: ``lrpc.compile`` from the export in its own
process, median of ``--compile-repeats``. Agreement: ``max|R_lrpc − R_LXT| / max|R_LXT|``.

Float64 (``--float64``, on unless ``--quick``): is the gap float32 rounding? ``model.double()`` is
exported; LXT runs on the float64 model. ``lrpc.compile`` refuses the float64 files at its last
two checks (ONNX checker: float32 constants beside float64 tensors in LLaMA's float32 islands;
onnxruntime: no float64 Erf / OneHot kernels); in a child process those checks record instead of
raising and the file runs in ``onnx.reference.ReferenceEvaluator`` (numpy float64). Compared:
at the float32 settings, with both stabilizers off (lrpc ε = 1e-16, LXT's identity-rule ε = 1e-30)
and (``--float64-split``, on with ``--float64``) lrpc's ε on the merges alone. The scaling runs
start one process at a time (the largest runs take several GiB each).

Goals (per model): lrpc ≥ 3× faster than LXT; lrpc's peak memory ≤ LXT's; compile ≤ 10 s.

Caches: ``.bench/transformers/`` (weights, exports, compiled files, outputs), the last results in
``.bench/transformers-latest.json``, workers' stderr in ``.bench/transformers-workers.log``.
``--output FILE`` rewrites the section between ``<!-- lrpc-transformers-bench:begin -->`` and
``<!-- lrpc-transformers-bench:end -->``.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
# this folder stays off sys.path (run.py and workers.py load by path): none of its modules may
# shadow a library in either environment (LXT's venv imports transformers and lxt)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != HERE]

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, '.bench')
DIR = os.path.join(CACHE, 'transformers')
BEGIN, END = '<!-- lrpc-transformers-bench:begin -->', '<!-- lrpc-transformers-bench:end -->'
OPSET = 17
SEED = 0
#: LXT 2.1's stabilizer (lxt/efficient/rules.py, identity_rule_implicit_fn.forward(epsilon=1e-10))
LXT_EPSILON = 1e-10
COMPOSITE = f'AttnLRP(epsilon={LXT_EPSILON})'
GIB = 2 ** 30

#: the models; ``sizes``: the sequence lengths of the scaling runs
MODELS = {
    'gpt2': {'family': 'gpt2', 'layers': 6, 'hidden': 768, 'heads': 12, 'vocab': 50257, 'positions': 1024,
             'T': 256, 'batch': 1, 'label': 'GPT-2 6 × 768, T = 256, batch 1'},
    'llama': {'family': 'llama', 'layers': 6, 'hidden': 1024, 'heads': 16, 'kv_heads': 4, 'intermediate': 2816,
              'vocab': 32000, 'positions': 2048, 'T': 256, 'batch': 1,
              'label': 'LLaMA-style 6 × 1024 (16 heads, 4 KV), T = 256, batch 1'},
    'bert': {'family': 'bert', 'layers': 6, 'hidden': 768, 'heads': 12, 'intermediate': 3072, 'vocab': 30522,
             'positions': 512, 'labels': 2, 'T': 128, 'batch': 4, 'label': 'BERT 6 × 768, T = 128, batch 4'},
    'gpt2-12x1024': {'family': 'gpt2', 'layers': 12, 'hidden': 1024, 'heads': 16, 'vocab': 50257, 'positions': 1024,
                     'T': 256, 'batch': 1, 'sizes': (256, 512, 1024), 'label': 'GPT-2-style 12 × 1024, batch 1'},
    # --quick
    'gpt2-tiny': {'family': 'gpt2', 'layers': 2, 'hidden': 64, 'heads': 4, 'vocab': 1000, 'positions': 128,
                  'T': 32, 'batch': 1, 'label': 'GPT-2 2 × 64, T = 32, batch 1'},
    'llama-tiny': {'family': 'llama', 'layers': 2, 'hidden': 64, 'heads': 4, 'kv_heads': 2, 'intermediate': 176,
                   'vocab': 1000, 'positions': 128, 'T': 32, 'batch': 1,
                   'label': 'LLaMA-style 2 × 64 (4 heads, 2 KV), T = 32, batch 1'},
    'bert-tiny': {'family': 'bert', 'layers': 2, 'hidden': 64, 'heads': 2, 'intermediate': 256, 'vocab': 1000,
                  'positions': 64, 'labels': 2, 'T': 16, 'batch': 4, 'label': 'BERT 2 × 64, T = 16, batch 4'},
    'gpt2-tiny-scale': {'family': 'gpt2', 'layers': 2, 'hidden': 64, 'heads': 4, 'vocab': 1000, 'positions': 128,
                        'T': 16, 'batch': 1, 'sizes': (16, 32, 64), 'label': 'GPT-2-style 2 × 64, batch 1'},
}
FULL = ('gpt2', 'llama', 'bert')
FULL_SCALING = 'gpt2-12x1024'
QUICK = ('gpt2-tiny', 'llama-tiny', 'bert-tiny')
QUICK_SCALING = 'gpt2-tiny-scale'
GOALS = {'speed': 3.0, 'compile_s': 10.0}


# --------------------------------------------------------------------------------------------------
# models, weights, inputs (the same code builds the model in the main venv and in LXT's)
# --------------------------------------------------------------------------------------------------

def is_causal(name: str) -> bool:
    return MODELS[name]['family'] in ('gpt2', 'llama')


def make_config(name: str):
    """The Hugging Face configuration of ``name`` (the same arguments under transformers 5 and 4.52.4)."""
    s = MODELS[name]
    if s['family'] == 'gpt2':
        from transformers import GPT2Config

        return GPT2Config(vocab_size=s['vocab'], n_positions=s['positions'], n_embd=s['hidden'], n_layer=s['layers'],
                          n_head=s['heads'], attn_implementation='eager')
    if s['family'] == 'llama':
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=s['vocab'], hidden_size=s['hidden'], intermediate_size=s['intermediate'],
                           num_hidden_layers=s['layers'], num_attention_heads=s['heads'],
                           num_key_value_heads=s['kv_heads'], max_position_embeddings=s['positions'],
                           attn_implementation='eager')
    from transformers import BertConfig

    return BertConfig(vocab_size=s['vocab'], hidden_size=s['hidden'], num_hidden_layers=s['layers'],
                      num_attention_heads=s['heads'], intermediate_size=s['intermediate'],
                      max_position_embeddings=s['positions'], num_labels=s['labels'], attn_implementation='eager')


#: family -> (transformers' model class, its modeling module under transformers.models)
FAMILY_CLASSES = {'gpt2': ('GPT2LMHeadModel', 'gpt2.modeling_gpt2'), 'llama': ('LlamaForCausalLM', 'llama.modeling_llama'),
                  'bert': ('BertForSequenceClassification', 'bert.modeling_bert')}


def modeling_module(name: str):
    import importlib

    return importlib.import_module('transformers.models.' + FAMILY_CLASSES[MODELS[name]['family']][1])


def model_class(name: str):
    return getattr(modeling_module(name), FAMILY_CLASSES[MODELS[name]['family']][0])


def feeds(name: str, T: int | None = None) -> dict:
    """The seeded token ids ``[N, T]`` and a mask of ones (numpy only: every process makes the same)."""
    s = MODELS[name]
    T = T or s['T']
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, s['vocab'], (s['batch'], T)).astype(np.int64)
    return {'input_ids': ids, 'attention_mask': np.ones_like(ids)}


def key(name: str) -> str:
    """What decides the weights and the export: the configuration, the versions, seed and opset."""
    import torch
    import transformers

    s = {k: v for k, v in MODELS[name].items() if k not in ('label', 'T', 'sizes')}
    versions = (torch.__version__.split('+')[0], transformers.__version__)
    return hashlib.sha256(repr((s, versions, SEED, OPSET)).encode()).hexdigest()[:10]


def paths(name: str, k: str) -> dict:
    stem = os.path.join(DIR, f'{name}-seed{SEED}-{k}')
    return {'weights': f'{stem}.pt', 'onnx32': f'{stem}.onnx', 'onnx64': f'{stem}.f64.onnx',
            'lrpc32': f'{stem}.lrp.onnx', 'lrpc64': f'{stem}.f64.lrp.onnx'}


class _Exported:
    """``(input_ids, attention_mask) -> logits`` (causal LMs without the cache)."""

    @staticmethod
    def make(name: str, model):
        import torch

        causal = is_causal(name)

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                kwargs = {'use_cache': False} if causal else {}
                return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits

        return Wrapper().eval()


def build(name: str):
    """The torch model, transformers' own seeded initialization (normal, std 0.02), float32, eval."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(name)(make_config(name))
    return model.float().eval()


def _export(name: str, model, path: str) -> None:
    import contextlib
    import io
    import warnings

    import torch

    example = {k: torch.from_numpy(v) for k, v in feeds(name).items()}
    names = list(example)
    axes = {n: {0: 'batch', 1: 'sequence'} for n in names}
    axes['logits'] = {0: 'batch', 1: 'sequence'} if is_causal(name) else {0: 'batch'}
    tmp = f'{path}.tmp'
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter('ignore')
        torch.onnx.export(_Exported.make(name, model), tuple(example.values()), tmp, dynamo=False, input_names=names,
                          output_names=['logits'], opset_version=OPSET, dynamic_axes=axes, do_constant_folding=True)
    os.replace(tmp, path)


def prepare(name: str, double: bool) -> dict:
    """Runs in a child (main venv): the weights and the float32 export (and float64's), cached."""
    import torch

    os.makedirs(DIR, exist_ok=True)
    k = key(name)
    p = paths(name, k)
    start = time.perf_counter()
    model = None
    if not (os.path.exists(p['weights']) and os.path.exists(p['onnx32'])):
        model = build(name)
        torch.save(model.state_dict(), p['weights'] + '.tmp')
        os.replace(p['weights'] + '.tmp', p['weights'])
        _export(name, model, p['onnx32'])
    if double and not os.path.exists(p['onnx64']):
        if model is None:
            model = build(name)
            model.load_state_dict(torch.load(p['weights'], weights_only=True), strict=True)
        _export(name, model.double(), p['onnx64'])
    return {'key': k, 'paths': p, 'prepare_s': time.perf_counter() - start,
            'export_bytes': os.path.getsize(p['onnx32'])}


def compile_model(name: str, dtype: str, repeats: int) -> dict:
    """Runs in a child (main venv): ``lrpc.compile`` from the export, ``repeats`` times (median)."""
    import onnx

    import lrpc

    p = paths(name, key(name))
    src, out = (p['onnx64'], p['lrpc64']) if dtype == 'float64' else (p['onnx32'], p['lrpc32'])
    seconds = []
    proto = None
    for _ in range(max(1, repeats)):
        proto = None
        start = time.perf_counter()
        proto = lrpc.compile(src, COMPOSITE, normalize_output_relevance=False, verbose=False)
        seconds.append(time.perf_counter() - start)
    onnx.save(proto, out + '.tmp')
    os.replace(out + '.tmp', out)
    return {'compile_s': statistics.median(seconds), 'compile_runs_s': seconds, 'compiled_bytes': os.path.getsize(out),
            'nodes': len(proto.graph.node)}


# --------------------------------------------------------------------------------------------------
# LXT's import (its ViT patch map imports torchvision, which has no CPU build for this torch)
# --------------------------------------------------------------------------------------------------

def import_lxt():
    """LXT 2.1's efficient mode, with the torchvision module its ViT patch map names stubbed
    (there is no CPU torchvision for this torch; the BERT/GPT-2/LLaMA maps do not need it)."""
    import importlib.machinery
    import types

    if "torchvision" not in sys.modules:
        def mod(name):
            m = types.ModuleType(name)
            m.__spec__ = importlib.machinery.ModuleSpec(name, None)
            return m
        tv, models, vit = mod("torchvision"), mod("torchvision.models"), mod("torchvision.models.vision_transformer")
        vit.nn = types.SimpleNamespace(**{n: type(n, (), {}) for n in ("GELU", "LayerNorm", "MultiheadAttention")})
        tv.models, models.vision_transformer = models, vit
        sys.modules.update({"torchvision": tv, "torchvision.models": models, "torchvision.models.vision_transformer": vit})
    import lxt.efficient
    return lxt.efficient


# --------------------------------------------------------------------------------------------------
# the worker: one contender in a fresh process, driven over stdin/stdout
# --------------------------------------------------------------------------------------------------

def _ort_plain(path: str, threads: int):
    """onnxruntime's defaults as ``run.ort_options`` sets them (memory pattern on, sequential, all
    graph optimizations); copied here: importing ``run`` would pull torch into this process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_mem_pattern = True
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def _plain_contender(name: str, T: int, dtype: str, threads: int, p: dict):
    session = _ort_plain(p['onnx64' if dtype == 'float64' else 'onnx32'], threads)
    x = feeds(name, T)

    def setup(target):
        return target

    def call():
        logits = session.run(['logits'], x)[0]
        return None, logits

    return setup, call


def _lrpc_contender(name: str, T: int, dtype: str, threads: int, p: dict, shrink: bool = False):
    import onnxruntime as ort

    from lrpc.runtime.session import make_session

    session = make_session(p['lrpc64' if dtype == 'float64' else 'lrpc32'], providers=['CPUExecutionProvider'],
                           threads=threads)
    x = feeds(name, T)
    options = None
    if shrink:
        # --shrink: hand the arena back after each call (as methods.py does); off by default: on
        # GPT-2 6 x 768 at T = 256 it made each call 20 % slower (0.62 against 0.50 s)
        options = ort.RunOptions()
        options.add_run_config_entry('memory.enable_memory_arena_shrinkage', 'cpu:0')

    def setup(target):
        x['lrp_target'] = np.asarray(target, dtype=np.int64).reshape(-1)
        return target

    def call():
        logits, relevance = session.run(['logits', 'relevance'], x, options)
        return relevance, logits

    return setup, call


def _lxt_contender(name: str, T: int, dtype: str, threads: int, p: dict, identity_eps: float | None = None):
    import torch

    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings('ignore')
    efficient = import_lxt()
    if identity_eps is not None:
        # the identity rule's stabilizer, a default argument of its autograd function (1e-10)
        from lxt.efficient.rules import identity_rule_implicit_fn

        identity_rule_implicit_fn.forward.__defaults__ = (identity_eps,)
    efficient.monkey_patch(modeling_module(name), verbose=False)   # before the model is built (BERT's classes)
    model = model_class(name)(make_config(name))
    model.load_state_dict(torch.load(p['weights'], weights_only=True), strict=True)
    model = (model.double() if dtype == 'float64' else model.float()).eval()
    for param in model.parameters():
        param.requires_grad_(False)    # relevance needs the input's gradient only (as LXT's examples do)
    x = {k: torch.from_numpy(v) for k, v in feeds(name, T).items()}
    embedding = model.get_input_embeddings()
    causal = is_causal(name)
    kwargs = {'use_cache': False} if causal else {}
    state = {}

    def forward():
        embeds = embedding(x['input_ids']).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, attention_mask=x['attention_mask'], **kwargs).logits
        return embeds, logits[:, -1] if causal else logits

    def setup(target):
        if target is None:
            with torch.no_grad():
                _, explained = forward()
            target = explained.argmax(-1).tolist()
        state['target'] = torch.as_tensor(target, dtype=torch.long).reshape(-1)
        return [int(t) for t in state['target']]

    def call():
        embeds, explained = forward()
        chosen = explained.gather(1, state['target'][:, None]).sum()
        chosen.backward()
        relevance = (embeds * embeds.grad).detach()
        return relevance.numpy(), explained.detach().numpy()

    return setup, call


def worker(contender: str, name: str, T: int, dtype: str, threads: int, k: str, shrink: bool = False,
           identity_eps: float | None = None) -> int:
    """One contender over ``workers.serve``: ``save`` writes the last relevance and logits."""
    p = paths(name, k)

    def make():
        if contender == 'lrpc':
            return _lrpc_contender(name, T, dtype, threads, p, shrink)
        if contender == 'lxt':
            return _lxt_contender(name, T, dtype, threads, p, identity_eps)
        return _plain_contender(name, T, dtype, threads, p)

    def save(results, path):
        relevance, logits = results[-1]
        np.savez(path, logits=logits, **({} if relevance is None else {'relevance': relevance}))

    return _protocol().serve(make, save)


def Worker(contender, name, T, dtype, k, args, log, extra=()):
    """A contender's process, as the parent sees it (LXT's in its own virtualenv)."""
    return _protocol().Worker(
        contender, [os.path.realpath(__file__), '--worker', contender, name, str(T), dtype, str(args.threads),
                    '--key', k, *(['--shrink'] if args.shrink else []), *extra], log,
        '.bench/transformers-workers.log', args.threads,
        python=args.lxt_python if contender == 'lxt' else sys.executable, cwd=ROOT)


def RssSampler():
    return _protocol().RssSampler()


# --------------------------------------------------------------------------------------------------
# the parent: prepare, compile, drive the workers
# --------------------------------------------------------------------------------------------------

def child(args, log, sampler, *argv) -> dict:
    """One of this file's helper modes in a child process of the main venv; its JSON result."""
    process = subprocess.Popen([sys.executable, os.path.realpath(__file__), *argv], stdout=subprocess.PIPE,
                               stderr=log, text=True, cwd=ROOT,
                               env=dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS='ignore'))
    sampler.pids.add(process.pid)
    out, _ = process.communicate()
    sampler.pids.discard(process.pid)
    line = next((x for x in out.splitlines() if x.startswith('RESULT ')), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f'{" ".join(argv)} failed (exit status {process.returncode}); see '
                           '.bench/transformers-workers.log')
    return json.loads(line[len('RESULT '):])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.abs(b).max())
    return float(np.abs(a - b).max() / (scale if scale > 0 else 1.0))


def _timing(seconds: list[float]) -> dict:
    return {'median_s': statistics.median(seconds), 'min_s': min(seconds), 'max_s': max(seconds),
            'runs': len(seconds), 'all_s': seconds}


def _start(c, name, T, dtype, k, args, log, sampler, extra) -> 'Worker':
    w = Worker(c, name, T, dtype, k, args, log, extra if c == 'lxt' else ())
    sampler.pids.add(w.process.pid)
    if 'error' in w.hello:
        w.kill()
        raise RuntimeError(f'{c} failed to load: {w.hello["error"]}')
    return w


def _finish(c, w, row, outputs, path) -> None:
    """Save the last call's outputs, end the worker, record its peaks."""
    w.ask('save', path=path)
    with np.load(path) as data:
        outputs[c] = {f: data[f] for f in data.files}
    status = w.close()
    row['peak'][c] = status['VmHWM']
    # the calls' own peak: the high-water mark after the reset (the setup's resident set included)
    if row['reset'][c].get('reset'):
        row['calls_peak'][c] = status['VmHWM']
    row['process_peak'][c] = max(status['VmHWM'], row['load_peak'][c])


def drive(name: str, T: int, dtype: str, contenders: list[str], k: str, args, log, sampler, warmup: int,
          repeats: int, tag: str, sequential: bool = False, variant: str = '', lxt_extra=()) -> dict:
    """The contenders of one (model, T, dtype) in their own processes: calls interleaved (lrpc, LXT,
    plain, lrpc, ...), or with ``sequential`` one process after the other (only one alive at a time:
    the largest runs). LXT goes first either way: its forward picks the explained logits (arg-max)
    and the others are given them."""
    row = {'model': name, 'T': T, 'dtype': dtype, 'errors': [], 'sequential': sequential, 'setup_rss': {},
           'load_peak': {}, 'load_s': {}, 'reset': {}, 'peak': {}, 'calls_peak': {}, 'process_peak': {}}
    workers, outputs, times = {}, {}, {c: [] for c in contenders}
    out_dir = os.path.join(DIR, 'out')
    os.makedirs(out_dir, exist_ok=True)
    out = {c: os.path.join(out_dir, f'{name}.T{T}.{dtype}{variant}.{c}.npz') for c in contenders}
    start_order = (['lxt'] if 'lxt' in contenders else []) + [c for c in contenders if c != 'lxt']
    target = None

    def calls(c, w, index):
        seconds = w.ask('run')['s']
        if index >= warmup:
            times[c].append(seconds)
        print(f'    {tag} {c} call {index + 1}: {seconds:.3g} s' + (' (warm-up)' if index < warmup else ''), flush=True)

    def begin(c):
        nonlocal target
        w = workers[c] = _start(c, name, T, dtype, k, args, log, sampler, lxt_extra)
        if target is None:
            target = w.ask('setup')['target'] if c == 'lxt' else w.ask(
                'setup', target=[0] * MODELS[name]['batch'])['target']
        else:
            w.ask('setup', target=target)
        row['setup_rss'][c], row['load_peak'][c], row['load_s'][c] = w.hello['VmRSS'], w.hello['VmHWM'], w.hello['load_s']
        row['reset'][c] = w.ask('reset')
        return w

    try:
        if sequential:
            for c in start_order:
                w = begin(c)
                for index in range(warmup + repeats):
                    calls(c, w, index)
                _finish(c, workers.pop(c), row, outputs, out[c])
                sampler.pids.discard(w.process.pid)
        else:
            for c in start_order:
                begin(c)
            for index in range(warmup + repeats):
                for c in contenders:
                    calls(c, workers[c], index)
            for c in contenders:
                _finish(c, workers.pop(c), row, outputs, out[c])
        row['target'] = target
        row['time'] = {c: _timing(t) for c, t in times.items() if t}
        if 'lrpc' in outputs and 'lxt' in outputs:
            lrpc_logits = outputs['lrpc']['logits']
            row['agreement'] = rel_err(outputs['lrpc']['relevance'], outputs['lxt']['relevance'])
            row['logits_err'] = rel_err(lrpc_logits[:, -1] if lrpc_logits.ndim == 3 else lrpc_logits,
                                        outputs['lxt']['logits'])
            r = outputs['lxt']['relevance']
            row['lxt_sum'] = r.reshape(r.shape[0], -1).sum(1).tolist()
            row['lxt_logit'] = [float(outputs['lxt']['logits'][i, t]) for i, t in enumerate(target)]
            row['relevance_shape'] = list(outputs['lrpc']['relevance'].shape)
        row['outputs'] = {c: out[c] for c in outputs}
    except Exception as error:     # noqa: BLE001
        row['errors'].append(f'{type(error).__name__}: {error}')
    finally:
        for w in workers.values():
            w.kill()
        sampler.pids.clear()
    return row


# --------------------------------------------------------------------------------------------------
# float64: is the lrpc-LXT gap float32 rounding?
# --------------------------------------------------------------------------------------------------

#: the stabilizers switched off (as far as each allows): lrpc's ε must be positive, LXT's identity
#: rule takes its ε as a default argument
EPS_OFF_LRPC, EPS_OFF_LXT = 1e-16, 1e-30


def _split_composite(dense: float, merge: float, ln: float):
    """AttnLRP with the ε of its dense layers, merges (Add/Sub/Concat) and LayerNorm rule apart."""
    from lrpc.composites import (Composite, DropoutLayer, GlobalMap, GlobalTypeMap, LayerNormLayer, MergeLayer,
                                 NormalizationLayer, ReshapingLayer)
    from lrpc.rules import EpsilonRule, LayerNormRule, PassRule, TaylorRule

    return Composite(GlobalMap(EpsilonRule(dense)), GlobalTypeMap({
        LayerNormLayer: LayerNormRule(ln), NormalizationLayer: PassRule(), DropoutLayer: PassRule(),
        ReshapingLayer: PassRule(), 'Softmax': TaylorRule(), MergeLayer: EpsilonRule(merge)}))


def compile64(name: str, k: str, epsilon: str, out: str) -> dict:
    """Runs in a child: ``lrpc.compile`` of the float64 export. lrpc refuses the file at its last
    two checks (the ONNX checker, an onnxruntime session); in this process only they are wrapped so
    that their refusal is recorded instead of raised, and the file is written for
    :func:`evaluate64`. ``epsilon``: a number (AttnLRP's ε), or ``dense=…,merge=…,ln=…``."""
    import onnx

    import lrpc
    import lrpc.compiler as compiler

    refusals = []

    def recording(original):
        def wrapped(*a, **kw):
            try:
                return original(*a, **kw)
            except Exception as error:     # noqa: BLE001
                refusals.append(f'{type(error).__name__}: {str(error)[:400]}')
        return wrapped

    compiler.check = recording(compiler.check)
    compiler._verify_loads = recording(compiler._verify_loads)
    if '=' in epsilon:
        e = {a: float(b) for a, b in (kv.split('=') for kv in epsilon.split(','))}
        composite = _split_composite(e['dense'], e['merge'], e['ln'])
    else:
        composite = f'AttnLRP(epsilon={float(epsilon)})'
    start = time.perf_counter()
    proto = lrpc.compile(paths(name, k)['onnx64'], composite, normalize_output_relevance=False, verbose=False)
    seconds = time.perf_counter() - start
    onnx.save(proto, out + '.tmp')
    os.replace(out + '.tmp', out)
    return {'refusals': refusals, 'compile_s': seconds}


def evaluate64(name: str, path: str, target: str, out: str) -> dict:
    """Runs in a child: the float64 file in ``onnx.reference.ReferenceEvaluator`` (numpy, every
    op in float64; onnxruntime has no float64 kernels for Erf and OneHot). Two stand-ins:
    GatherElements by ``np.take_along_axis`` (the evaluator's fails on BERT's token-type
    lookup) and binary ops that promote mixed float32/float64 operands as numpy does (lrpc's
    constants are float64 where the model's own float32 islands, LLaMA's RMSNorm and softmax, meet
    them)."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        op_domain = ''

        def _run(self, data, indices, axis=None):
            return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis], indices), axis=axis),)

    def binary(op_name, fn):
        def _run(self, a, b):
            return (np.asarray(fn(a, b)),)
        return type(op_name, (OpRun,), {'op_domain': '', '_run': _run})

    promoting = [binary(n, f) for n, f in (('Add', np.add), ('Sub', np.subtract), ('Mul', np.multiply),
                                           ('Div', np.divide), ('Pow', np.power), ('Equal', np.equal),
                                           ('Greater', np.greater), ('GreaterOrEqual', np.greater_equal),
                                           ('Less', np.less), ('LessOrEqual', np.less_equal))]
    x = feeds(name)
    x['lrp_target'] = np.asarray([int(t) for t in target.split(',')], dtype=np.int64)
    start = time.perf_counter()
    evaluator = ReferenceEvaluator(path, new_ops=[GatherElements, *promoting])
    with np.errstate(all='ignore'):
        logits, relevance = evaluator.run(['logits', 'relevance'], x)
    np.savez(out, relevance=relevance, logits=logits)
    return {'evaluate_s': time.perf_counter() - start, 'dtype': str(relevance.dtype),
            'nan': int(np.isnan(relevance).sum()), **_protocol().status()}


def embedding_sum(name: str, k: str, at: str) -> dict:
    """Runs in a child: the summed input embeddings (GPT-2: token + position; BERT: word + position
    + token type 0) at ``at`` = ``sample,token,feature``, and its rank by magnitude among all."""
    import torch

    sd = torch.load(paths(name, k)['weights'], weights_only=True)
    ids = feeds(name)['input_ids']
    family = MODELS[name]['family']
    if family == 'gpt2':
        x = sd['transformer.wte.weight'].double().numpy()[ids] + sd['transformer.wpe.weight'].double().numpy()[
            None, :ids.shape[1]]
    elif family == 'bert':
        e = 'bert.embeddings.'
        x = (sd[e + 'word_embeddings.weight'].double().numpy()[ids]
             + sd[e + 'position_embeddings.weight'].double().numpy()[None, :ids.shape[1]]
             + sd[e + 'token_type_embeddings.weight'].double().numpy()[0])
    else:
        return {}
    i = tuple(int(v) for v in at.split(','))
    a = np.abs(x)
    return {'value': float(x[i]), 'rank': int((a < a[i]).sum()), 'count': int(a.size),
            'median_abs': float(np.median(a))}


def float64_study(name: str, row32: dict, k: str, args, log, sampler) -> dict:
    """lrpc and LXT in float64 (one untimed call each), with their stabilizers as in float32 and
    switched off, against each other and the float32 results."""
    res = {'errors': []}
    T = MODELS[name]['T']
    target = ','.join(str(t) for t in row32['target'])
    runs = {'default': (str(LXT_EPSILON), ()), 'off': (str(EPS_OFF_LRPC), ('--lxt-identity-eps', str(EPS_OFF_LXT)))}
    if args.float64_split:
        runs['merge'] = (f'dense={EPS_OFF_LRPC},merge={LXT_EPSILON},ln={EPS_OFF_LRPC}', None)
    rel = {}
    try:
        for tag, (epsilon, lxt_extra) in runs.items():
            if lxt_extra is not None:
                r = drive(name, T, 'float64', ['lxt'], k, args, log, sampler, 0, 1, f'{name} float64 ({tag})',
                          variant=f'.{tag}', lxt_extra=lxt_extra)
                if r['errors']:
                    raise RuntimeError('; '.join(r['errors']))
                res[f'lxt_target_{tag}'] = r['target']
                with np.load(r['outputs']['lxt']) as data:
                    rel[f'lxt_{tag}'] = data['relevance']
            stem = os.path.join(DIR, 'out', f'{name}.float64.{tag}')
            res[f'compile_{tag}'] = child(args, log, sampler, '--compile64', name, k, epsilon, stem + '.lrp.onnx')
            res[f'evaluate_{tag}'] = child(args, log, sampler, '--evaluate64', name, stem + '.lrp.onnx', target,
                                           stem + '.lrpc.npz')
            os.remove(stem + '.lrp.onnx')
            with np.load(stem + '.lrpc.npz') as data:
                rel[f'lrpc_{tag}'] = data['relevance']
            print(f'    {name} float64 ({tag}): lrpc vs LXT '
                  f'{rel_err(rel[f"lrpc_{tag}"], rel["lxt_off" if tag == "merge" else f"lxt_{tag}"]):.2e}', flush=True)
        with np.load(row32['outputs']['lrpc']) as a, np.load(row32['outputs']['lxt']) as b:
            l32, x32 = a['relevance'], b['relevance']
        res['refusals'] = res['compile_default']['refusals']
        res['agreement32'] = row32['agreement']
        res['agreement64'] = rel_err(rel['lrpc_default'], rel['lxt_default'])
        res['agreement64_off'] = rel_err(rel['lrpc_off'], rel['lxt_off'])
        if 'lrpc_merge' in rel:
            res['agreement64_merge'] = rel_err(rel['lrpc_merge'], rel['lxt_off'])
        res['lrpc32_vs_lxt64'] = rel_err(l32, rel['lxt_default'])
        res['lxt32_vs_lxt64'] = rel_err(x32, rel['lxt_default'])
        res['lrpc32_vs_lrpc64'] = rel_err(l32, rel['lrpc_default'])
        res['lxt_eps_effect'] = rel_err(rel['lxt_default'], rel['lxt_off'])
        res['lrpc_eps_effect'] = rel_err(rel['lrpc_default'], rel['lrpc_off'])
        d = np.abs(rel['lrpc_default'] - rel['lxt_default'])
        at = np.unravel_index(int(d.argmax()), d.shape)
        res['max_at'] = [int(v) for v in at]
        res['max_at_rel'] = float(d[at] / abs(rel['lxt_default'][at]))
        res['max_at_lxt'] = float(rel['lxt_default'][at])
        res['token_share'] = float(np.abs(rel['lxt_default'][:, at[1]]).sum() / np.abs(rel['lxt_default']).sum())
        if MODELS[name]['family'] in ('gpt2', 'bert'):
            res['embedding_sum'] = child(args, log, sampler, '--embedding-sum', name, k, ','.join(map(str, at)))
    except Exception as error:     # noqa: BLE001
        res['errors'].append(f'{type(error).__name__}: {error}')
    return res


def slopes(xs, ys) -> dict:
    """Log-log slopes between consecutive sizes and the least-squares exponent over all."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    steps = [float((ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i])) for i in range(len(xs) - 1)]
    fit = float(np.polyfit(lx, ly, 1)[0]) if len(xs) > 1 else float('nan')
    return {'steps': steps, 'fit': fit}


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

def _s(v, digits=2):
    return 'n/a' if v is None else f'{v:.{digits}f}'


def _t(v):
    """Seconds: two decimals, three significant digits below 0.1 s (the tiny models)."""
    return 'n/a' if v is None else (f'{v:.2f}' if v >= 0.1 else f'{v:.3g}')


#: the forward plus a relevance pass of as many products: the least an explanation takes, in plain inferences
FLOOR_OVER_PLAIN = 2.0


def _verdict(ok) -> str:
    return 'n/a' if ok is None else ('PASS' if ok else 'FAIL')


def goals(row: dict, comp: dict) -> dict:
    t, p = row.get('time', {}), row.get('process_peak', {})
    speed = t['lxt']['median_s'] / t['lrpc']['median_s'] if 'lxt' in t and 'lrpc' in t else None
    # lrpc's file runs the model's forward and then the relevance pass, which multiplies by every
    # weight once more (transposed) and by each factor of every activation product (Q·Kᵀ, A·V):
    # at least the forward's products again, so at least 2 x plain inference; LXT / (2 x plain)
    # is the most any explainer of that form could gain over LXT
    ceiling = t['lxt']['median_s'] / (FLOOR_OVER_PLAIN * t['plain']['median_s']) if 'lxt' in t and 'plain' in t \
        else None
    return {'speedup': speed, 'ceiling': ceiling,
            'speed': None if speed is None else speed >= GOALS['speed'],
            'memory': None if not (p.get('lrpc') and p.get('lxt')) else p['lrpc'] <= p['lxt'],
            'compile': None if comp.get('compile_s') is None else comp['compile_s'] <= GOALS['compile_s']}


def _speed_verdict(g) -> str:
    v = _verdict(g['speed'])
    if g['speed'] is False and g['ceiling'] is not None and g['ceiling'] < GOALS['speed']:
        v += f' (goal above the ceiling, LXT / ({FLOOR_OVER_PLAIN:g} × plain) = {g["ceiling"]:.2f}×)'
    return v


def table_lines(rows, compiled) -> list[str]:
    lines = ['| model | lrpc s | LXT s | plain s | LXT/lrpc | lrpc GiB | LXT GiB | plain GiB | compile s | '
             'max\\|ΔR\\|/max\\|R_LXT\\| | lrpc ≥ 3× faster than LXT | lrpc memory ≤ LXT\'s | compile ≤ 10 s |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |']
    for r in rows:
        t, p = r.get('time', {}), r.get('process_peak', {})
        comp = compiled.get(r['model'], {})
        g = goals(r, comp)
        med = {c: t[c]['median_s'] if c in t else None for c in ('lrpc', 'lxt', 'plain')}
        gib = {c: p[c] / GIB if c in p else None for c in ('lrpc', 'lxt', 'plain')}
        agreement = 'n/a' if r.get('agreement') is None else f'{r["agreement"]:.1e}'
        speedup = 'n/a' if g['speedup'] is None else f'{g["speedup"]:.2f}×'
        lines.append(f'| {MODELS[r["model"]]["label"]} | {_t(med["lrpc"])} | {_t(med["lxt"])} | {_t(med["plain"])} '
                     f'| {speedup} | {_s(gib["lrpc"])} | {_s(gib["lxt"])} | {_s(gib["plain"])} | '
                     f'{_s(comp.get("compile_s"), 1)} | {agreement} | {_speed_verdict(g)} | {_verdict(g["memory"])} | '
                     f'{_verdict(g["compile"])} |')
    return lines


def detail_lines(rows, compiled) -> list[str]:
    lines = ['| model | lrpc min / max s | LXT min / max s | LXT / (2 × plain) | lrpc calls GiB | LXT calls GiB | '
             'resident after setup GiB (lrpc / LXT / plain) | export / compiled MiB | logits rel. diff | '
             'Σ R_LXT / logit |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        t, cp, su = r.get('time', {}), r.get('calls_peak', {}), r.get('setup_rss', {})
        comp = compiled.get(r['model'], {})
        g = goals(r, comp)

        def span(c):
            return f'{_t(t[c]["min_s"])} / {_t(t[c]["max_s"])}' if c in t else 'n/a'

        def gib(d, c):
            return f'{d[c] / GIB:.2f}' if c in d else 'n/a'
        cons = 'n/a'
        if r.get('lxt_sum'):
            cons = ', '.join(f'{s / lg:.3f}' for s, lg in zip(r['lxt_sum'], r['lxt_logit']))
        size = (f'{comp["export_bytes"] / 2**20:.0f} / {comp["compiled_bytes"] / 2**20:.0f}'
                if comp.get('compiled_bytes') else 'n/a')
        logits = 'n/a' if r.get('logits_err') is None else f'{r["logits_err"]:.1e}'
        ceiling = 'n/a' if g['ceiling'] is None else f'{g["ceiling"]:.2f}×'
        lines.append(f'| {MODELS[r["model"]]["label"]} | {span("lrpc")} | {span("lxt")} | {ceiling} | '
                     f'{gib(cp, "lrpc")} | {gib(cp, "lxt")} | {gib(su, "lrpc")} / {gib(su, "lxt")} / {gib(su, "plain")} '
                     f'| {size} | {logits} | {cons} |')
    return lines


def float64_lines(rows, f64) -> list[str]:
    split = any('agreement64_merge' in f for f in f64.values())
    lines = ['| model | float32: lrpc vs LXT | float64: lrpc vs LXT | float64, stabilizers off | '
             + ('float64, lrpc\'s ε on merges only | ' if split else '')
             + 'lrpc float32 vs LXT float64 | LXT float32 vs LXT float64 | lrpc float32 vs lrpc float64 | '
             'lrpc ε = 1e-10 vs 1e-16 (float64) | LXT ε = 1e-10 vs 1e-30 (float64) |',
             '| --- | ---: | ---: | ---: | ' + ('---: | ' if split else '') + '---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        f = f64.get(r['model'])
        if not f or f.get('errors'):
            continue
        merge = f'{f["agreement64_merge"]:.1e} | ' if split and 'agreement64_merge' in f else ('n/a | ' if split else '')
        lines.append(f'| {MODELS[r["model"]]["label"]} | {f["agreement32"]:.1e} | {f["agreement64"]:.1e} | '
                     f'{f["agreement64_off"]:.1e} | {merge}{f["lrpc32_vs_lxt64"]:.1e} | {f["lxt32_vs_lxt64"]:.1e} | '
                     f'{f["lrpc32_vs_lrpc64"]:.1e} | {f["lrpc_eps_effect"]:.1e} | {f["lxt_eps_effect"]:.1e} |')
    return lines


def float64_findings(f64) -> list[str]:
    out = []
    for name, f in f64.items():
        if f.get('errors'):
            continue
        label = MODELS[name]['label']
        ratio = f['agreement64'] / f['agreement32'] if f['agreement32'] else float('nan')
        verdict = ('not float32 accumulation: float64 keeps most of it' if ratio >= 0.5 else
                   'float32 accumulation in the main: float64 removes most of it' if ratio <= 0.1 else
                   'partly float32 accumulation')
        if f['agreement64_off'] <= 0.1 * f['agreement64']:
            verdict += '; it is the stabilizers (lrpc\'s ε-rule on linear layers and sums, which LXT does not have)'
        line = (f'- {label}: lrpc vs LXT {f["agreement32"]:.1e} in float32, {f["agreement64"]:.1e} in float64 '
                f'({ratio:.2f} of it): {verdict}; with both stabilizers off (lrpc ε = {EPS_OFF_LRPC:g}, LXT\'s '
                f'identity-rule ε = {EPS_OFF_LXT:g}) {f["agreement64_off"]:.1e}')
        if 'agreement64_merge' in f:
            line += (f'; lrpc\'s ε = {LXT_EPSILON:g} on the merges (Add/Sub/Concat: residual and embedding sums) '
                     f'alone, all else off: {f["agreement64_merge"]:.1e}')
        s, t, h = f['max_at']
        line += (f'. Largest difference at sample {s}, token {t}, feature {h} ({100 * f["max_at_rel"]:.2g} % of '
                 f'that element\'s relevance; token {t} carries {100 * f["token_share"]:.2g} % of |R|)')
        if MODELS[name]['family'] == 'llama':
            line += ('. (LLaMA in float64 is not float64 throughout: transformers\' `LlamaRMSNorm` and eager '
                     'softmax compute in float32 (`.to(torch.float32)`, `softmax(..., dtype=torch.float32)`), in the '
                     'export and in LXT\'s patched RMSNorm alike; that bounds what its float64 columns can show)')
        e = f.get('embedding_sum')
        if e:
            line += (f'; the summed input embeddings there: {e["value"]:.2g} (rank {e["rank"]} of {e["count"]} by '
                     f'magnitude, median |x| {e["median_abs"]:.2g}; ε/|x| = {LXT_EPSILON / abs(e["value"]):.1g})')
        out.append(line)
    refusals = sorted({r.split(': ', 1)[-1] for f in f64.values() for r in f.get('refusals', [])})
    if refusals:
        out.append('- lrpc.compile refuses the float64 exports (its last checks): ' + '; '.join(
            f'`{r}`' for r in refusals) + '. The float64 lrpc numbers above come from the same compilation with '
            'those two checks recording instead of raising (in that child process only), the file run in '
            '`onnx.reference.ReferenceEvaluator` (numpy float64; GatherElements by `np.take_along_axis`, binary ops '
            'promoting mixed float32/float64 operands as numpy does)')
    return out


def scaling_lines(name, srows, fits) -> list[str]:
    lines = ['| T | lrpc s | LXT s | LXT/lrpc | lrpc GiB | LXT GiB | lrpc calls GiB | LXT calls GiB | '
             'max\\|ΔR\\|/max\\|R_LXT\\| |',
             '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in srows:
        t, p, cp = r.get('time', {}), r.get('process_peak', {}), r.get('calls_peak', {})
        lt, xt = (t[c]['median_s'] if c in t else None for c in ('lrpc', 'lxt'))
        ratio = f'{xt / lt:.2f}×' if lt and xt else 'n/a'
        g = {c: _s(p[c] / GIB) if c in p else 'n/a' for c in ('lrpc', 'lxt')}
        gc = {c: _s(cp[c] / GIB) if c in cp else 'n/a' for c in ('lrpc', 'lxt')}
        agreement = 'n/a' if r.get('agreement') is None else f'{r["agreement"]:.1e}'
        lines.append(f'| {r["T"]} | {_t(lt)} | {_t(xt)} | {ratio} | {g["lrpc"]} | {g["lxt"]} | {gc["lrpc"]} | '
                     f'{gc["lxt"]} | {agreement} |')
    keys = ('time_lrpc', 'time_lxt', 'mem_lrpc', 'mem_lxt', 'act_lrpc', 'act_lxt')
    lines += ['', '| exponent in T (log-log slope) | lrpc time | LXT time | lrpc memory | LXT memory | '
              'lrpc calls memory − resident after setup | LXT calls memory − resident after setup |',
              '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    sizes = [r['T'] for r in srows if not r['errors'] and 'time' in r]
    for i in range(len(sizes) - 1):
        lines.append(f'| {sizes[i]} → {sizes[i + 1]} | ' + ' | '.join(
            _s(fits[k]['steps'][i]) if k in fits else 'n/a' for k in keys) + ' |')
    if len(sizes) > 2:
        lines.append(f'| least squares over {", ".join(map(str, sizes))} | ' + ' | '.join(
            _s(fits[k]['fit']) if k in fits else 'n/a' for k in keys) + ' |')
    return lines


def scaling_fits(srows) -> dict:
    ok = [r for r in srows if not r['errors'] and 'time' in r]
    if len(ok) < 2:
        return {}
    T = [r['T'] for r in ok]
    fits = {}
    for c in ('lrpc', 'lxt'):
        fits[f'time_{c}'] = slopes(T, [r['time'][c]['median_s'] for r in ok])
        fits[f'mem_{c}'] = slopes(T, [r['process_peak'][c] for r in ok])
        if all(c in r.get('calls_peak', {}) for r in ok):
            added = [r['calls_peak'][c] - r['setup_rss'][c] for r in ok]
            if all(a > 0 for a in added):
                fits[f'act_{c}'] = slopes(T, added)
    return fits


def findings(rows, compiled) -> list[str]:
    """The goals' verdicts in words, with the numbers that bound them."""
    out = []
    for r in rows:
        t, p, su, cp = (r.get(k, {}) for k in ('time', 'process_peak', 'setup_rss', 'calls_peak'))
        if not all(c in t for c in ('lrpc', 'lxt', 'plain')):
            continue
        g = goals(r, compiled.get(r['model'], {}))
        label = MODELS[r['model']]['label']
        lxt_plain = t['lxt']['median_s'] / t['plain']['median_s']
        lrpc_plain = t['lrpc']['median_s'] / t['plain']['median_s']
        parts = [f'lrpc {g["speedup"]:.2f}× LXT\'s speed, {lrpc_plain:.2f}× plain inference; LXT takes '
                 f'{lxt_plain:.2f}× plain inference, and the floor is {FLOOR_OVER_PLAIN:g}× (the forward, then a '
                 'relevance pass of as many products), so the most any such explainer could gain over LXT is '
                 f'{g["ceiling"]:.2f}×']
        if 'lrpc' in p and 'lxt' in p:
            parts.append(f'memory lrpc {p["lrpc"] / GIB:.2f} against LXT {p["lxt"] / GIB:.2f} GiB (resident after '
                         f'setup {su["lrpc"] / GIB:.2f} against {su["lxt"] / GIB:.2f}; the calls alone peak at '
                         f'{cp.get("lrpc", 0) / GIB:.2f} against {cp.get("lxt", 0) / GIB:.2f})')
        out.append(f'- {label}: ' + '; '.join(parts))
    return out


def _protocol():
    """``benchmarks/workers.py`` (the contenders' process protocol), loaded by path like run.py;
    it imports only the standard library, so LXT's environment loads it too."""
    import importlib.util

    module = sys.modules.get('lrpc_bench_workers')
    if module is None:
        spec = importlib.util.spec_from_file_location('lrpc_bench_workers', os.path.join(HERE, 'workers.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def _run_module():
    """``benchmarks/run.py`` (machine_info, section_head, write_section), loaded by path: this
    folder stays off ``sys.path`` (see the top of this file)."""
    import importlib.util

    saved = list(sys.path)
    sys.path.append(HERE)           # run.py imports models.py from here; after the libraries
    try:
        spec = importlib.util.spec_from_file_location('lrpc_bench_run', os.path.join(HERE, 'run.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module      # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def markdown_lines(record: dict, info: dict, run) -> list[str]:
    args = record['args']
    rows, compiled, f64 = record['rows'], record['compiled'], record['float64']
    versions = ', '.join(f'{k} {v}' for k, v in info['versions'].items() if k in ('onnxruntime', 'onnx', 'torch',
                                                                                  'numpy', 'lrpc'))
    lines = [
        *run.section_head('Transformers: AttnLRP against LXT 2.1 (efficient mode)', info),
        f'- Python {info["python"]}; {versions}; transformers {record["transformers_main"]} (export, lrpc); LXT '
        f'environment: {record["lxt_env"]}',
        f'- Command: `{record["command"]}` ({record["elapsed_s"] / 60:.1f} min; all its processes together peaked at '
        f'{record["peak_all_bytes"] / GIB:.1f} GiB resident)',
        f'- {args["threads"]} threads for torch and onnxruntime; median of {args["repeats"]} timed calls after '
        f'{args["warmup"]} warm-up, calls interleaved (lrpc, LXT, plain), each contender in its own fresh process; '
        'memory ("GiB"): each process\'s `VmHWM` at its end (interpreter, libraries, loading, weights and every call '
        'included), "calls GiB": the high-water mark of the calls alone (`VmHWM` reset after setup; the resident '
        'weights included); compile: `lrpc.compile` from the export in its own process, median of '
        f'{args["compile_repeats"]}',
        f'- lrpc: `lrpc.compile(export, "{COMPOSITE}", normalize_output_relevance=False)`: ε as LXT\'s (its only '
        'stabilizer, `x + 1e-10` in the identity rule\'s ratio f(x)/x, fixed inside `lxt/efficient/rules.py`; its '
        'linear layers and sums are plain gradients, ε = 0); unnormalized: relevance starts at the logit, as LXT\'s '
        'Gradient × Input does. Opened as `lrpc.LRP` opens a compiled file: `lrpc.runtime.session.make_session` of its path '
        '(onnxruntime reads the file itself; no memory pattern, no pre-packing of product weights, as the file\'s '
        '`lrpc.pack_weights` says)'
        + (', the arena shrunk after each call' if args.get('shrink') else '')
        + ', fed `input_ids`, `attention_mask` and `lrp_target` (LXT\'s arg-max); plain: the export in onnxruntime '
        'with its defaults',
        '- LXT 2.1: `lxt.efficient.monkey_patch(modeling_<family>)` on transformers 4.52.4 (LXT\'s tested version), '
        'the same config and `state_dict` (`load_state_dict(strict=True)`), parameters without gradients, eval mode; '
        'per call: the embedding lookup, the forward from `inputs_embeds.requires_grad_()`, `backward()` of the '
        'explained logit (batch: their sum), relevance `inputs_embeds * inputs_embeds.grad`',
        '- Models: transformers\' own seeded initialization (std 0.02) built once, saved with `torch.save`; '
        '`attn_implementation="eager"` on both sides; exported by torch\'s legacy exporter (opset 17, dynamic batch '
        f'and sequence) from transformers {record["transformers_main"]}; random token ids, mask of ones. GPT-2: '
        'vocabulary 50257, tied head; LLaMA: vocabulary 32000, SwiGLU 2816, RoPE; BERT: vocabulary 30522, FFN 3072, '
        '2 labels; causal LMs explain the last position\'s arg-max logit, BERT each sample\'s arg-max class',
        '- Agreement: max|R_lrpc − R_LXT| / max|R_LXT| over the batch. Goals: lrpc ≥ 3× faster than LXT (medians), '
        'lrpc\'s process peak ≤ LXT\'s, compile ≤ 10 s',
        '',
        *table_lines(rows, compiled),
        '',
        'Spread of the timed calls, the ceiling of any speed-up over LXT for an explainer that runs the forward and '
        f'then a relevance pass of as many products (LXT / ({FLOOR_OVER_PLAIN:g} × plain)), memory of the calls and after setup, file sizes, logits (lrpc against LXT, the explained '
        'position), LXT\'s conservation (Σ R / explained logit, per sample):',
        '',
        *detail_lines(rows, compiled),
        '',
        *findings(rows, compiled),
        '',
    ]
    if f64:
        lines += ['Float32 rounding or a real difference? The same weights in float64 (`model.double()` exported; '
                  'LXT on the float64 model; one call each; max|ΔR| / max|R_reference|, the reference the right-hand '
                  'one). "Stabilizers off": lrpc compiled with ε = 1e-16, LXT\'s identity-rule ε set to 1e-30 '
                  '(`identity_rule_implicit_fn.forward.__defaults__`):', '',
                  *float64_lines(rows, f64), '', *float64_findings(f64), '']
    s = record.get('scaling')
    if s:
        m = MODELS[s['model']]
        lines += [f'One size up: {m["label"]} ({m["layers"]} layers × {m["hidden"]}, {m["heads"]} heads, vocabulary '
                  f'{m["vocab"]}; compiled in {s["compile"]["compile_s"]:.1f} s), lrpc and LXT, fresh processes per '
                  f'T, one at a time (the largest runs take several GiB each), median of {s["repeats"]} after '
                  f'{s["warmup"]} warm-up:', '', *scaling_lines(s['model'], s['rows'], s['fits']), '']
    for r in rows + (s['rows'] if s else []):
        for e in r.get('errors', []):
            lines.append(f'- {MODELS[r["model"]]["label"]} T = {r["T"]}: {e}')
    for name, f in f64.items():
        for e in f.get('errors', []):
            lines.append(f'- {MODELS[name]["label"]} float64: {e}')
    return lines


def parse_args(argv=None):
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--lxt-python', default=os.path.join(ROOT, '.venv-lxt', 'bin', 'python'),
                        help='the python of the LXT 2.1 environment (transformers 4.52.4; default .venv-lxt)')
    parser.add_argument('--models', nargs='+', choices=list(MODELS), default=None,
                        help='models (default gpt2 llama bert; --quick: the tiny ones)')
    parser.add_argument('--scaling', choices=[m for m in MODELS if 'sizes' in MODELS[m]] + ['none'], default=None,
                        help='the scaling model (default gpt2-12x1024; --quick: gpt2-tiny-scale; none: skip)')
    parser.add_argument('--sizes', nargs='+', type=int, default=None, help='sequence lengths of the scaling runs')
    parser.add_argument('--repeats', type=int, default=3, help='timed calls per contender (median; default 3)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed calls first (default 1)')
    parser.add_argument('--scaling-repeats', type=int, default=3, help='timed calls in the scaling runs (default 3)')
    parser.add_argument('--compile-repeats', type=int, default=1, help='compilations per model (median; default 1)')
    parser.add_argument('--threads', type=int, default=cores, help=f'threads for torch and onnxruntime (default {cores})')
    parser.add_argument('--quick', action='store_true', help='tiny models (seconds)')
    parser.add_argument('--float64', action=argparse.BooleanOptionalAction, default=None,
                        help='the float64 comparison (default: on; off with --quick)')
    parser.add_argument('--float64-split', action=argparse.BooleanOptionalAction, default=None,
                        help='float64 also with lrpc\'s ε on the merges (Add/Sub/Concat) alone, all else off (one '
                             'more compile and evaluation per model; default: with --float64)')
    parser.add_argument('--shrink', action='store_true',
                        help='lrpc: shrink onnxruntime\'s arena after each call (less memory held between calls, '
                             'slower calls)')
    parser.add_argument('--from-json', default=None,
                        help='write the section from a recorded run (.bench/transformers-latest.json), running nothing')
    parser.add_argument('--output', default=None, help='write/update this benchmark\'s section of this Markdown file')
    parser.add_argument('--worker', nargs=5, help=argparse.SUPPRESS)
    parser.add_argument('--prepare', nargs=2, help=argparse.SUPPRESS)
    parser.add_argument('--compile', nargs=3, help=argparse.SUPPRESS)
    parser.add_argument('--key', help=argparse.SUPPRESS)
    parser.add_argument('--lxt-identity-eps', type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument('--compile64', nargs=4, help=argparse.SUPPRESS)
    parser.add_argument('--evaluate64', nargs=4, help=argparse.SUPPRESS)
    parser.add_argument('--embedding-sum', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = list(QUICK if args.quick else FULL)
    if args.scaling is None:
        args.scaling = QUICK_SCALING if args.quick else FULL_SCALING
    if args.float64 is None:
        args.float64 = not args.quick
    if args.float64_split is None:
        args.float64_split = args.float64
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        contender, name, T, dtype, threads = args.worker
        return worker(contender, name, int(T), dtype, int(threads), args.key, args.shrink, args.lxt_identity_eps)
    for mode, fn in (('compile64', compile64), ('evaluate64', evaluate64), ('embedding_sum', embedding_sum)):
        if getattr(args, mode):
            print('RESULT ' + json.dumps(fn(*getattr(args, mode))), flush=True)
            return 0
    if args.prepare:
        print('RESULT ' + json.dumps(prepare(args.prepare[0], args.prepare[1] == '1')), flush=True)
        return 0
    if args.compile:
        name, dtype, repeats = args.compile
        print('RESULT ' + json.dumps(compile_model(name, dtype, int(repeats))), flush=True)
        return 0
    if args.from_json:  # the section again from a recorded run (its text changed, not its numbers)
        with open(args.from_json) as handle:
            record = json.load(handle)
        run = _run_module()
        path = args.output if os.path.isabs(args.output or '') else os.path.join(ROOT, args.output or 'BENCHMARKS.md')
        run.write_section(path, markdown_lines(record, record['machine'], run), BEGIN, END)
        print(f'wrote {path} from {args.from_json}', flush=True)
        return 0
    if not os.path.exists(args.lxt_python):
        raise SystemExit(f'no LXT environment at {args.lxt_python}: `make .venv-lxt/.installed` builds it')

    started = time.perf_counter()
    sampler = RssSampler()
    os.makedirs(DIR, exist_ok=True)
    print(f'transformers benchmark: {", ".join(args.models)}; scaling {args.scaling}; {args.threads} threads; median '
          f'of {args.repeats} after {args.warmup} warm-up', flush=True)
    compiled, rows, f64 = {}, [], {}
    scaling = None
    with open(os.path.join(CACHE, 'transformers-workers.log'), 'w') as log:
        for name in args.models:
            prep = child(args, log, sampler, '--prepare', name, '1' if args.float64 else '0')
            k = prep['key']
            comp = child(args, log, sampler, '--compile', name, 'float32', str(args.compile_repeats), '--key', k)
            compiled[name] = {**prep, **comp}
            print(f'  {name}: compiled in {comp["compile_s"]:.2f} s ({comp["compiled_bytes"] / 2**20:.0f} MiB)',
                  flush=True)
            row = drive(name, MODELS[name]['T'], 'float32', ['lrpc', 'lxt', 'plain'], k, args, log, sampler,
                        args.warmup, args.repeats, name)
            rows.append(row)
            t, p = row.get('time', {}), row.get('process_peak', {})
            print(f'  {name}: ' + '; '.join(f'{c} {t[c]["median_s"]:.3f} s, {p.get(c, 0) / GIB:.2f} GiB' for c in t)
                  + (f'; agreement {row["agreement"]:.2e}' if row.get('agreement') is not None else '')
                  + ''.join(f'\n  ERROR {e}' for e in row['errors']), flush=True)
            if args.float64 and not row['errors']:
                f64[name] = float64_study(name, row, k, args, log, sampler)
                f = f64[name]
                if not f.get('errors'):
                    print(f'  {name} float64: lrpc vs LXT {f["agreement64"]:.2e} (float32 {f["agreement32"]:.2e}), '
                          f'stabilizers off {f["agreement64_off"]:.2e}; lrpc32 vs LXT64 {f["lrpc32_vs_lxt64"]:.2e}; '
                          f'LXT32 vs LXT64 {f["lxt32_vs_lxt64"]:.2e}', flush=True)
                else:
                    print(f'  {name} float64: ERROR {f["errors"]}', flush=True)
        if args.scaling != 'none':
            name = args.scaling
            sizes = args.sizes or list(MODELS[name]['sizes'])
            prep = child(args, log, sampler, '--prepare', name, '0')
            k = prep['key']
            comp = child(args, log, sampler, '--compile', name, 'float32', '1', '--key', k)
            print(f'  {name}: compiled in {comp["compile_s"]:.2f} s', flush=True)
            srows = []
            for T in sizes:
                # one process at a time: at T = 1024 lrpc alone peaks near 8 GiB
                r = drive(name, T, 'float32', ['lrpc', 'lxt'], k, args, log, sampler, args.warmup,
                          args.scaling_repeats, f'{name} T={T}', sequential=True)
                srows.append(r)
                t, p = r.get('time', {}), r.get('process_peak', {})
                print(f'  {name} T={T}: ' + '; '.join(f'{c} {t[c]["median_s"]:.2f} s, {p.get(c, 0) / GIB:.2f} GiB'
                                                      for c in t)
                      + ''.join(f'\n  ERROR {e}' for e in r['errors']), flush=True)
            scaling = {'model': name, 'sizes': sizes, 'rows': srows, 'fits': scaling_fits(srows),
                       'compile': {**prep, **comp}, 'repeats': args.scaling_repeats, 'warmup': args.warmup}
    peak_all = sampler.stop()
    elapsed = time.perf_counter() - started
    for line in table_lines(rows, compiled):
        print(line)
    if scaling:
        for line in scaling_lines(scaling['model'], scaling['rows'], scaling['fits']):
            print(line)
    for line in findings(rows, compiled):
        print(line)
    if f64:
        for line in float64_lines(rows, f64) + float64_findings(f64):
            print(line)
    print(f'total {elapsed:.0f} s; all processes together peaked at {peak_all / GIB:.2f} GiB', flush=True)

    from importlib import metadata

    run = _run_module()
    info = run.machine_info(args.threads)
    lxt_env = subprocess.run([args.lxt_python, '-c', 'from importlib import metadata as m; print(", ".join(f"{p} '
                              '{m.version(p)}" for p in ("lxt", "transformers", "torch")))'],
                             capture_output=True, text=True).stdout.strip()
    command = 'python benchmarks/transformer_scale.py' + (' ' + ' '.join(sys.argv[1:]) if argv is None and sys.argv[1:]
                                                       else '')
    record = {'machine': info, 'command': command, 'elapsed_s': elapsed, 'peak_all_bytes': peak_all,
              'args': vars(args), 'compiled': compiled, 'rows': rows, 'float64': f64, 'scaling': scaling,
              'transformers_main': metadata.version('transformers'), 'lxt_env': lxt_env,
              'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    with open(os.path.join(CACHE, 'transformers-latest.json'), 'w') as handle:
        json.dump(record, handle, indent=1)
    if args.output:
        path = args.output if os.path.isabs(args.output) else os.path.join(ROOT, args.output)
        run.write_section(path, markdown_lines(record, info, run), BEGIN, END)
        print(f'wrote {args.output}', flush=True)
    errors = [e for r in rows + (scaling['rows'] if scaling else []) for e in r['errors']]
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
