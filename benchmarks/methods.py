"""Gradient methods: lrpc's compiled IntegratedGradients and SmoothGrad against Captum.

Run from the repository root::

    python benchmarks/methods.py                          # full run (6-9 min on 2 cores)
    python benchmarks/methods.py --quick                  # tiny models, under a minute
    python benchmarks/methods.py --output BENCHMARKS.md   # and rewrite its section there

For each model and method, on the same seeded weights, the same seeded input and the same
explained class:

* ``lrpc``: ``lrpc.compile(model, method="IntegratedGradients(steps=32)")`` (Gauss-Legendre,
  baseline 0) or ``method="SmoothGrad(samples=50, stdev=0.1)"``, the file in an onnxruntime
  session made as lrpc makes its own (``lrpc.runtime.session.make_session``: ``ORT_ENABLE_ALL``,
  no memory pattern, CPU), fed the input and ``lrp_target``. The S copies are one
  onnxruntime call of S·N rows.
* ``Captum``: ``IntegratedGradients(model).attribute(x, target=t, n_steps=32,
  method='gausslegendre', internal_batch_size=32)`` and ``NoiseTunnel(Saliency(model))
  .attribute(x, nt_type='smoothgrad', nt_samples=50, nt_samples_batch_size=50, stdevs=0.1,
  target=t, abs=False)`` on the torch model, its parameters with ``requires_grad=False``
  (neither side computes weight gradients; with them on, Captum's BERT processes peaked about
  10 % higher in a trial, ResNet-50's about the same).

Models: ResNet-50 (``benchmarks/models.py``, batch 1, 224×224) and a BERT-base-like encoder
(``transformers.BertForSequenceClassification``, 6 layers × 768, 12 heads, T = 128, batch 1,
Hugging Face's own seeded random initialization). lrpc's file takes ``input_ids`` and
``attention_mask`` and attributes at the word-embedding output; Captum gets the same point: a
forward of the word embeddings (``model(inputs_embeds=e, attention_mask=m)``), so its
IntegratedGradients (baseline 0) integrates and its NoiseTunnel adds the noise where lrpc does.
``--quick``: a ResNet with one basic block per stage at 32×32 and a 2 × 64 BERT at T = 16.

Each contender runs in its own fresh process (``--worker``); the parent drives the two in
lock-step (lrpc, Captum, lrpc, Captum, ...), so that a slow patch of the machine hits both alike:
``--warmup`` calls, then ``--repeats`` timed calls, median reported. Each process's peak
resident set (``VmHWM``, as ``memory.py`` reads it: interpreter, libraries, model and session
included) is read when it ends; the lrpc process imports onnxruntime and lrpc's session helper,
not torch. The parent also samples the resident sets of all its processes together (the
benchmark's own peak). Compile time: ``lrpc.compile`` from the cached export, median of
``--compile-repeats``, in a child process. Agreement: IntegratedGradients
``max|a_lrpc − a_Captum| / max|a_Captum|``; SmoothGrad the Pearson correlation (the noise
draws differ), next to the correlation of two Captum calls (two draws of its own noise: the
most one can expect).

Exports are cached under ``.bench/models/`` (ResNet-50 as ``models.onnx_path`` names it, the
others keyed by their configuration and the torch/transformers versions), compiled files under
``.bench/compiled/``, the last results in ``.bench/methods-latest.json``. ``--output FILE``
rewrites the section between ``<!-- lrpc-methods-bench:begin -->`` and
``<!-- lrpc-methods-bench:end -->``.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, '.bench')
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import workers as protocol  # noqa: E402  (benchmarks/workers.py: the contenders' process protocol)

BEGIN, END = '<!-- lrpc-methods-bench:begin -->', '<!-- lrpc-methods-bench:end -->'
OPSET = 17

#: the benchmark's models: images ``[N, C, H, W]`` or token ids ``[N, T]`` with a mask
MODELS = {
    'resnet50': {'kind': 'image', 'shape': (3, 224, 224), 'label': 'ResNet-50, 224×224'},
    'bert': {'kind': 'text', 'layers': 6, 'hidden': 768, 'heads': 12, 'intermediate': 3072, 'vocab': 30522,
             'positions': 512, 'labels': 2, 'T': 128, 'label': 'BERT 6 × 768, T = 128'},
    # --quick
    'resnet-tiny': {'kind': 'image', 'shape': (3, 32, 32), 'label': 'ResNet (1, 1, 1, 1 basic blocks), 32×32'},
    'bert-tiny': {'kind': 'text', 'layers': 2, 'hidden': 64, 'heads': 2, 'intermediate': 256, 'vocab': 1000,
                  'positions': 64, 'labels': 2, 'T': 16, 'label': 'BERT 2 × 64, T = 16'},
}
FULL_MODELS = ('resnet50', 'bert')
MODEL_NOTES = {
    'resnet50': 'ResNet-50 of `benchmarks/models.py` (He init, BatchNorm statistics), input N(0, 1)',
    'bert': '`BertForSequenceClassification` of a `BertConfig` with 6 layers, hidden 768, 12 heads, FFN 3072, '
            'vocabulary 30522, 2 labels, Hugging Face\'s seeded random initialization (std 0.02), SDPA attention, 128 '
            'random token ids, mask of ones',
    'resnet-tiny': 'ResNet with one basic block per stage (`benchmarks/models.py`), 10 classes, 32×32',
    'bert-tiny': 'BERT of 2 layers × 64, 2 heads, FFN 256, vocabulary 1000, T = 16',
}
QUICK_MODELS = ('resnet-tiny', 'bert-tiny')

#: method key -> (lrpc expression, label)
METHODS = {
    'ig': ('IntegratedGradients(steps=32, method="gausslegendre")', 'IntegratedGradients (32 steps, Gauss-Legendre)'),
    'sg': ('SmoothGrad(samples=50, stdev=0.1)', 'SmoothGrad (50 samples, σ = 0.1)'),
}
STEPS, SAMPLES, STDEV = 32, 50, 0.1
SEED = 0


# --------------------------------------------------------------------------------------------------
# models and inputs (the lrpc worker needs only the inputs: numpy, no torch)
# --------------------------------------------------------------------------------------------------

def example_feeds(name: str) -> dict:
    """The seeded batch of one: ``{'input': x}`` (images, as ``models.example_input(1)``) or
    ``{'input_ids': ids, 'attention_mask': ones}`` (text)."""
    spec = MODELS[name]
    rng = np.random.default_rng(SEED)
    if spec['kind'] == 'image':
        return {'input': rng.standard_normal((1, *spec['shape'])).astype(np.float32)}
    ids = rng.integers(min(1000, spec['vocab'] // 2), spec['vocab'], (1, spec['T'])).astype(np.int64)
    return {'input_ids': ids, 'attention_mask': np.ones_like(ids)}


def bert_config(name: str):
    from transformers import BertConfig

    spec = MODELS[name]
    return BertConfig(vocab_size=spec['vocab'], hidden_size=spec['hidden'], num_hidden_layers=spec['layers'],
                      num_attention_heads=spec['heads'], intermediate_size=spec['intermediate'],
                      max_position_embeddings=spec['positions'], num_labels=spec['labels'])


def build(name: str):
    """The torch model of ``name`` with its seeded weights, eval mode, float32."""
    import torch

    import models

    if name == 'resnet50':
        return models.build('resnet50', SEED)
    if name == 'resnet-tiny':
        with torch.random.fork_rng(devices=[]):
            model = models.ResNet(models.BasicBlock, (1, 1, 1, 1), num_classes=10)
        return models._support('zoo').init_parameters(model, SEED)
    from transformers import BertForSequenceClassification

    # Hugging Face's own initialization (normal, std 0.02; LayerNorm 1/0), seeded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = BertForSequenceClassification(bert_config(name))
    return model.float().eval()


def onnx_path(name: str) -> str:
    """The cached ONNX export of :func:`build` (legacy exporter, opset 17, dynamic batch; text:
    dynamic sequence too); exported on first use."""
    import torch

    import models

    cache = os.path.join(CACHE, 'models')
    if name == 'resnet50':
        return models.onnx_path('resnet50', cache, SEED)
    os.makedirs(cache, exist_ok=True)
    spec = MODELS[name]
    versions = [torch.__version__.split('+')[0]]
    if spec['kind'] == 'text':
        import transformers

        versions.append(transformers.__version__)
        source = repr(bert_config(name).to_dict())
    else:
        with open(models.__file__, 'rb') as handle:
            source = handle.read().decode()
    key = hashlib.sha256(repr((source, spec, versions, SEED, OPSET)).encode()).hexdigest()[:10]
    path = os.path.join(cache, f'{name}-seed{SEED}-torch{versions[0]}-opset{OPSET}-{key}.onnx')
    if os.path.exists(path):
        return path
    import contextlib
    import io
    import warnings

    model = build(name)
    feeds = {k: torch.from_numpy(v) for k, v in example_feeds(name).items()}
    names = list(feeds)
    if spec['kind'] == 'text':
        axes = {n: {0: 'batch', 1: 'sequence'} for n in names}
    else:
        axes = {n: {0: 'batch'} for n in names}
    axes['logits'] = {0: 'batch'}
    tmp = f'{path}.tmp'
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter('ignore')
        torch.onnx.export(model, tuple(feeds.values()), tmp, dynamo=False, input_names=names,
                          output_names=['logits'], opset_version=OPSET, dynamic_axes=axes,
                          do_constant_folding=True)
    os.replace(tmp, path)
    return path


def compiled_path(name: str, method: str) -> str:
    return os.path.join(CACHE, 'compiled', f'{name}.{method}.methods.lrp.onnx')


def prepare(name: str, methods: list[str], compile_repeats: int) -> dict:
    """Runs in a child process: export (cached), then compile each method ``compile_repeats``
    times (median) and write the compiled file."""
    import onnx

    import lrpc

    start = time.perf_counter()
    path = onnx_path(name)
    result = {'export': path, 'export_s': time.perf_counter() - start, 'export_bytes': os.path.getsize(path),
              'methods': {}}
    for method in methods:
        seconds, proto = [], None
        for _ in range(max(1, compile_repeats)):
            proto = None
            start = time.perf_counter()
            proto = lrpc.compile(path, method=METHODS[method][0], verbose=False)
            seconds.append(time.perf_counter() - start)
        out = compiled_path(name, method)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        onnx.save(proto, out)
        result['methods'][method] = {'compile_s': statistics.median(seconds), 'compile_runs_s': seconds,
                                     'compiled_bytes': os.path.getsize(out),
                                     'nodes': len(proto.graph.node)}
        del proto
    return result


# --------------------------------------------------------------------------------------------------
# the worker: one contender in a fresh process, driven over stdin/stdout
# --------------------------------------------------------------------------------------------------

def _lrpc_contender(name: str, method: str, threads: int, shrink: bool = True):
    import onnxruntime as ort

    from lrpc.runtime.session import make_session

    feeds = example_feeds(name)
    session = make_session(compiled_path(name, method), providers=['CPUExecutionProvider'], threads=threads)
    options = None
    if shrink:
        # hand the arena back after each call: the idle lrpc process then does not hold its peak
        # while the Captum process runs (this process's peak and its times are unchanged)
        options = ort.RunOptions()
        options.add_run_config_entry('memory.enable_memory_arena_shrinkage', 'cpu:0')

    def setup(target):
        feeds['lrp_target'] = np.asarray([target], dtype=np.int64)
        return target

    def call():
        logits, attribution = session.run(['logits', 'attribution'], feeds, options)
        return attribution, logits

    return setup, call


def _captum_contender(name: str, method: str, threads: int, shrink: bool = True, double: bool = False):
    """``double``: the float64 reference (model and input in float64, the explained class given,
    IntegratedGradients in batches of 8 steps: the same sum in a quarter of the memory)."""
    import torch

    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings('ignore')
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    model = build(name)
    if double:
        model = model.double()
    for p in model.parameters():
        p.requires_grad_(False)   # attributions need the input's gradient only, as lrpc's file
    feeds = example_feeds(name)
    if MODELS[name]['kind'] == 'image':
        x = torch.from_numpy(feeds['input'])
        forward = model
    else:
        mask = torch.from_numpy(feeds['attention_mask'])
        with torch.no_grad():
            x = model.get_input_embeddings()(torch.from_numpy(feeds['input_ids']))

        def forward(embeds):   # the model from its word embeddings (positions, token types, LayerNorm inside)
            return model(inputs_embeds=embeds, attention_mask=mask.expand(embeds.shape[0], -1)).logits
    x = x.double() if double else x
    torch.manual_seed(SEED)    # NoiseTunnel's noise
    state = {}

    def setup(target):
        with torch.no_grad():
            state['logits'] = forward(x).float().numpy()
        state['target'] = int(state['logits'].argmax(1)[0]) if target is None else int(target)
        return state['target']

    if method == 'ig':
        explainer = IntegratedGradients(forward)

        def attribute():
            return explainer.attribute(x, target=state['target'], n_steps=STEPS, method='gausslegendre',
                                       internal_batch_size=8 if double else STEPS)
    else:
        explainer = NoiseTunnel(Saliency(forward))

        def attribute():
            return explainer.attribute(x, nt_type='smoothgrad', nt_samples=SAMPLES, nt_samples_batch_size=SAMPLES,
                                       stdevs=STDEV, target=state['target'], abs=False)

    def call():
        return attribute().detach().numpy(), state['logits']

    return setup, call


def worker(contender: str, name: str, method: str, threads: int, shrink: bool = True) -> int:
    """One contender over ``protocol.serve``: ``save`` writes the last two attributions and the logits."""
    def make():
        if contender == 'lrpc':
            return _lrpc_contender(name, method, threads, shrink)
        return _captum_contender(name, method, threads, shrink, double=contender == 'captum64')

    def save(results, path):
        np.savez(path, logits=results[-1][1], **{f'attribution{i}': r[0] for i, r in enumerate(results)})

    return protocol.serve(make, save, keep=2)


def Worker(contender: str, name: str, method: str, threads: int, log, shrink: bool = True) -> protocol.Worker:
    """A contender's process, as the parent sees it."""
    return protocol.Worker(contender, [os.path.abspath(__file__), '--worker', contender, name, method, str(threads),
                                      str(int(shrink))], log, '.bench/methods-workers.log', threads, cwd=ROOT,
                          close_timeout=60)


RssSampler = protocol.RssSampler


def _rel_err(a, b) -> float:
    scale = float(np.abs(b).max())
    return float(np.abs(np.asarray(a, np.float64) - b).max() / (scale if scale > 0 else 1.0))


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel())[0, 1])


def _last(saved: dict) -> np.ndarray:
    """The attribution of the last call among what a worker saved."""
    return saved[max(k for k in saved if k.startswith('attribution'))]


def _timing(seconds: list[float]) -> dict:
    return {'median_s': statistics.median(seconds), 'min_s': min(seconds), 'max_s': max(seconds),
            'runs': len(seconds), 'all_s': seconds}


def bench(name: str, method: str, args, sampler: RssSampler, log) -> dict:
    """The two contenders of ``(name, method)`` in their own processes, calls interleaved."""
    row = {'model': name, 'method': method, 'errors': []}
    contenders = ['lrpc'] + ([] if args.no_captum else ['captum'])
    workers = {}
    try:
        # Captum first: it computes the explained class (the arg-max of its logits), lrpc is given it
        for contender in reversed(contenders):
            workers[contender] = Worker(contender, name, method, args.threads, log, not args.no_shrink)
            sampler.pids.add(workers[contender].process.pid)
            if 'error' in workers[contender].hello:
                row['errors'].append(f'{contender}: {workers[contender].hello["error"]}')
                workers.pop(contender).close()
                continue
        if 'lrpc' not in workers:
            return row
        workers = {c: workers[c] for c in contenders if c in workers}    # calls: lrpc, Captum, lrpc, ...
        target = workers['captum'].ask('setup')['target'] if 'captum' in workers else 0
        if 'captum' not in workers:
            target = int(np.asarray(example_logits_lrpc(workers['lrpc'])).argmax())
        workers['lrpc'].ask('setup', target=target)
        row['target'] = target
        row['setup_rss'] = {c: w.hello['VmRSS'] for c, w in workers.items()}
        row['load_s'] = {c: w.hello['load_s'] for c, w in workers.items()}
        times = {c: [] for c in workers}
        for index in range(args.warmup + args.repeats):
            for contender, w in workers.items():
                seconds = w.ask('run')['s']
                if index >= args.warmup:
                    times[contender].append(seconds)
                print(f'    {name} {method} {contender} call {index + 1}: {seconds:.2f} s'
                      + (' (warm-up)' if index < args.warmup else ''), flush=True)
        row['time'] = {c: _timing(t) for c, t in times.items()}
        outputs = {}
        directory = os.path.join(CACHE, 'methods-out')
        os.makedirs(directory, exist_ok=True)
        for contender, w in workers.items():
            path = os.path.join(directory, f'{name}.{method}.{contender}.npz')
            w.ask('save', path=path)
            with np.load(path) as data:
                outputs[contender] = {k: data[k] for k in data.files}
        row['peak'] = {}
        for contender in list(workers):
            row['peak'][contender] = workers.pop(contender).close()['VmHWM']
        row['attribution_shape'] = list(outputs['lrpc']['attribution0'].shape)
        if method == 'ig' and 'captum' in outputs and not args.no_reference:
            # the float64 reference, alone in its own process after the two have ended (untimed)
            reference = Worker('captum64', name, method, args.threads, log)
            workers['captum64'] = reference
            sampler.pids.add(reference.process.pid)
            if 'error' in reference.hello:
                raise RuntimeError(f'captum64: {reference.hello["error"]}')
            reference.ask('setup', target=target)
            row['reference_s'] = reference.ask('run')['s']
            path = os.path.join(directory, f'{name}.{method}.captum64.npz')
            reference.ask('save', path=path)
            workers.pop('captum64').close()
            with np.load(path) as data:
                ref = data['attribution0']
            row['vs_float64'] = {c: _rel_err(_last(outputs[c]), ref) for c in ('lrpc', 'captum')}
        if 'captum' in outputs:
            a, b = outputs['lrpc'], outputs['captum']
            row['logits_err'] = _rel_err(a['logits'], b['logits'])
            if method == 'ig':
                row['agreement'] = _rel_err(_last(a), _last(b))
            else:
                row['agreement'] = _pearson(_last(a), _last(b))
                if 'attribution1' in b:
                    row['captum_self'] = _pearson(b['attribution0'], b['attribution1'])
                if 'attribution1' in a:
                    row['lrpc_self'] = _pearson(a['attribution0'], a['attribution1'])
    except Exception as error:     # noqa: BLE001
        row['errors'].append(f'{type(error).__name__}: {error}')
    finally:
        for w in workers.values():
            try:
                w.process.kill()
                w.process.wait(timeout=30)
            except Exception:     # noqa: BLE001
                pass
        sampler.pids.clear()
    return row


def example_logits_lrpc(w: Worker):
    """Without Captum: lrpc's own arg-max (one untimed call with target 0)."""
    w.ask('setup', target=0)
    w.ask('run')
    directory = os.path.join(CACHE, 'methods-out')
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, 'target.npz')
    w.ask('save', path=path)
    with np.load(path) as data:
        return data['logits'][0]


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

GIB = 2 ** 30


def _x(value) -> str:
    return 'n/a' if value is None else f'{value:.2f}×'


def table_lines(rows: list[dict], compiled: dict) -> list[str]:
    lines = ['| model | method | lrpc s | Captum s | lrpc/Captum time | lrpc GiB | Captum GiB | lrpc/Captum memory '
             '| compile s | agreement |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |']
    for r in rows:
        t, p = r.get('time', {}), r.get('peak', {})
        lt, ct = (t.get(c, {}).get('median_s') for c in ('lrpc', 'captum'))
        lp, cp = p.get('lrpc'), p.get('captum')
        comp = compiled.get(r['model'], {}).get('methods', {}).get(r['method'], {})
        agreement = 'n/a'
        if r.get('agreement') is not None:
            if r['method'] == 'ig':
                agreement = f'max rel. diff {r["agreement"]:.1e}'
                if r.get('vs_float64'):
                    agreement += (f' (against float64: lrpc {r["vs_float64"]["lrpc"]:.1e}, '
                                  f'Captum {r["vs_float64"]["captum"]:.1e})')
            else:
                agreement = f'Pearson {r["agreement"]:.4f}' + (
                    f' (Captum vs Captum {r["captum_self"]:.4f})' if r.get('captum_self') is not None else '')
        lines.append(
            f'| {MODELS[r["model"]]["label"]} | {METHODS[r["method"]][1]} | '
            f'{"n/a" if lt is None else f"{lt:.2f}"} | {"n/a" if ct is None else f"{ct:.2f}"} | '
            f'{_x(lt / ct if lt and ct else None)} | {"n/a" if lp is None else f"{lp / GIB:.2f}"} | '
            f'{"n/a" if cp is None else f"{cp / GIB:.2f}"} | {_x(lp / cp if lp and cp else None)} | '
            f'{comp.get("compile_s", float("nan")):.1f} | {agreement} |')
    return lines


def per_round(row: dict):
    """The median over rounds of lrpc's time / Captum's in the same round (the two calls next to
    each other in time: the least exposed to the host's slow and fast patches)."""
    t = row.get('time', {})
    if 'lrpc' not in t or 'captum' not in t:
        return None
    return statistics.median(a / b for a, b in zip(t['lrpc']['all_s'], t['captum']['all_s']))


def detail_lines(rows: list[dict], compiled: dict) -> list[str]:
    lines = ['| model | method | lrpc min / max s | Captum min / max s | lrpc/Captum per round (median) | '
             'lrpc resident after setup GiB | Captum resident after setup GiB | compiled file MiB | logits rel. diff |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in rows:
        t = r.get('time', {})

        def span(c):
            return f'{t[c]["min_s"]:.2f} / {t[c]["max_s"]:.2f}' if c in t else 'n/a'
        setup = r.get('setup_rss', {})
        comp = compiled.get(r['model'], {}).get('methods', {}).get(r['method'], {})

        def gib(c):
            return f'{setup[c] / GIB:.2f}' if c in setup else 'n/a'
        logits = 'n/a' if r.get('logits_err') is None else f'{r["logits_err"]:.1e}'
        size = f'{comp["compiled_bytes"] / 2**20:.0f}' if comp.get('compiled_bytes') else 'n/a'
        lines.append(f'| {MODELS[r["model"]]["label"]} | {METHODS[r["method"]][1]} | {span("lrpc")} | '
                     f'{span("captum")} | {_x(per_round(r))} | {gib("lrpc")} | {gib("captum")} | {size} | {logits} |')
    return lines


def markdown_lines(rows, compiled, info, args, command, elapsed_s, peak_all) -> list[str]:
    import run

    from importlib import metadata

    try:
        transformers_version = metadata.version('transformers')
    except metadata.PackageNotFoundError:
        transformers_version = 'not installed'
    versions = ', '.join(f'{k} {v}' for k, v in info['versions'].items() if k != 'zennit')
    lines = [
        *run.section_head('Gradient methods: IntegratedGradients and SmoothGrad against Captum', info),
        f'- Python {info["python"]}; {versions}, transformers {transformers_version}',
        f'- Command: `{command}` ({elapsed_s / 60:.1f} min; all its processes together peaked at '
        f'{peak_all / GIB:.1f} GiB resident)',
        f'- {info["threads"]} threads for torch and onnxruntime; batch 1; median of {args.repeats} timed calls after '
        f'{args.warmup} warm-up call{"s" if args.warmup != 1 else ""}, the two contenders\' calls interleaved, each '
        'contender in its own fresh process; peak memory: that process\'s `VmHWM` at its end (interpreter, '
        'libraries, weights, session and every call included; the lrpc process does not import torch); compile: '
        f'`lrpc.compile` from the export, median of {args.compile_repeats}; the same seeded weights, input and '
        'explained class (Captum\'s arg-max) for both',
        '- lrpc: the compiled file in a session made as `lrpc.runtime.session.make_session` makes it '
        '(`ORT_ENABLE_ALL`, no memory pattern, CPUExecutionProvider), fed the input and `lrp_target`; the 32 steps / '
        '50 samples are one onnxruntime call of 32 / 50 rows'
        + ('' if args.no_shrink else '; each call with the run option `memory.enable_memory_arena_shrinkage=cpu:0`, '
           'which hands the arena back after the call, so that the idle lrpc process does not hold its peak while '
           'Captum\'s runs (the peak of the lrpc process itself is the same; in an A/B on ResNet-50 SmoothGrad the '
           'times were within the host\'s noise)'),
        '- Captum: `IntegratedGradients(f).attribute(x, target=t, n_steps=32, method=\'gausslegendre\', '
        'internal_batch_size=32)`; `NoiseTunnel(Saliency(f)).attribute(x, nt_type=\'smoothgrad\', nt_samples=50, '
        'nt_samples_batch_size=50, stdevs=0.1, target=t, abs=False)`; BERT: `f(e) = model(inputs_embeds=e, '
        'attention_mask=m).logits` of the word embeddings `e`, where lrpc attributes (baseline 0, noise added there); '
        'the torch parameters with `requires_grad=False` (neither side computes weight gradients)',
        '- Models: ' + '; '.join(MODEL_NOTES[m] for m in dict.fromkeys(r['model'] for r in rows))
        + '; exported by torch\'s legacy exporter (opset 17)',
        '- Agreement: IntegratedGradients max|a_lrpc − a_Captum| / max|a_Captum|, and each one\'s against Captum '
        'in float64 (model and input in float64, same class; run apart, untimed); SmoothGrad the Pearson correlation '
        '(the noise draws differ), beside that of two Captum calls (two draws of its own noise)',
        '',
        *table_lines(rows, compiled),
        '',
        'Spread of the timed calls (this host has slow and fast patches: the same call can take twice as long a '
        'minute later), lrpc\'s time over Captum\'s within each round, memory after setup (before the first call), '
        'compiled file, logits:',
        '',
        *detail_lines(rows, compiled),
        '',
    ]
    for r in rows:
        for error in r.get('errors', []):
            lines.append(f'- {MODELS[r["model"]]["label"]}, {r["method"]}: {error}')
        if r.get('lrpc_self') is not None:
            lines.append(f'- {MODELS[r["model"]]["label"]} SmoothGrad: two lrpc calls correlate at {r["lrpc_self"]:.4f} '
                         '(each call draws new noise)')
    lines += findings(rows)
    return lines


def findings(rows: list[dict]) -> list[str]:
    """What the numbers say, in words: where lrpc is slower or larger than Captum, and whether an
    IntegratedGradients difference is more than float32 rounding."""
    out = []
    for r in rows:
        t, p = r.get('time', {}), r.get('peak', {})
        if 'lrpc' not in t or 'captum' not in t:
            continue
        label = f'{MODELS[r["model"]]["label"]}, {METHODS[r["method"]][1].split(" ")[0]}'
        time_ratio = t['lrpc']['median_s'] / t['captum']['median_s']
        memory_ratio = p['lrpc'] / p['captum'] if p.get('lrpc') and p.get('captum') else None
        worse = []
        if time_ratio > 1:
            worse.append(f'{100 * (time_ratio - 1):.0f} % slower (per round {_x(per_round(r))})')
        if memory_ratio and memory_ratio > 1:
            worse.append(f'{100 * (memory_ratio - 1):.0f} % more memory ({(p["lrpc"] - p["captum"]) / GIB:.2f} GiB)')
        if worse:
            out.append(f'- **lrpc behind Captum** on {label}: ' + ', '.join(worse))
        ref = r.get('vs_float64')
        if ref and r.get('agreement') is not None and r['agreement'] > 1e-4:
            out.append(f'- {label}: the {r["agreement"]:.1e} between the two is of the size of float32 rounding '
                       f'here: against Captum in float64, lrpc is {ref["lrpc"]:.1e} off and Captum\'s own float32 '
                       f'result {ref["captum"]:.1e}')
    return out


def print_rows(rows, compiled):
    for line in table_lines(rows, compiled):
        print(line)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', choices=list(MODELS), default=None,
                        help='models (default resnet50 bert; --quick: resnet-tiny bert-tiny)')
    parser.add_argument('--methods', nargs='+', choices=list(METHODS), default=list(METHODS),
                        help='ig: IntegratedGradients(32 steps), sg: SmoothGrad(50 samples); default both')
    parser.add_argument('--repeats', type=int, default=3, help='timed calls per contender (median; default 3)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed calls first (default 1)')
    parser.add_argument('--compile-repeats', type=int, default=1, help='compilations per file (median; default 1)')
    parser.add_argument('--threads', type=int, default=cores, help=f'threads for torch and onnxruntime (default {cores})')
    parser.add_argument('--quick', action='store_true', help='tiny models (a minute or so)')
    parser.add_argument('--no-captum', action='store_true', help='lrpc alone')
    parser.add_argument('--no-reference', action='store_true',
                        help='skip the float64 Captum IntegratedGradients the two are also compared with')
    parser.add_argument('--output', default=None, help='write/update this benchmark\'s section of this Markdown file')
    parser.add_argument('--no-shrink', action='store_true',
                        help='keep onnxruntime\'s arena between lrpc\'s calls (the idle lrpc process then holds its '
                             'peak while Captum runs: ResNet-50 SmoothGrad needs about 8.5 GiB in all)')
    parser.add_argument('--worker', nargs=5, help=argparse.SUPPRESS)
    parser.add_argument('--prepare', nargs='+', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else FULL_MODELS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        contender, name, method, threads, shrink = args.worker
        return worker(contender, name, method, int(threads), shrink == '1')
    if args.prepare:
        name, repeats, *methods = args.prepare
        result = prepare(name, methods, int(repeats))
        print('PREPARED ' + json.dumps(result), flush=True)
        return 0

    started = time.perf_counter()
    sampler = RssSampler()
    os.makedirs(CACHE, exist_ok=True)
    print(f'gradient methods benchmark: {", ".join(args.models)}; {", ".join(args.methods)}; {args.threads} threads; '
          f'median of {args.repeats} after {args.warmup} warm-up', flush=True)
    compiled, rows = {}, []
    with open(os.path.join(CACHE, 'methods-workers.log'), 'w') as log:
        for name in args.models:
            # export and compile in a child: the parent stays small (its memory counts in the total)
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--prepare', name,
                                      str(args.compile_repeats), *args.methods], stdout=subprocess.PIPE,
                                     stderr=log, text=True, cwd=ROOT,
                                     env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            sampler.pids.add(child.pid)
            out, _ = child.communicate()
            sampler.pids.clear()
            line = next((x for x in out.splitlines() if x.startswith('PREPARED ')), None)
            if child.returncode != 0 or line is None:
                raise SystemExit(f'preparing {name} failed (exit status {child.returncode}); see '
                                 '.bench/methods-workers.log')
            compiled[name] = json.loads(line[len('PREPARED '):])
            for method, c in compiled[name]['methods'].items():
                print(f'  {name} {method}: compiled in {c["compile_s"]:.2f} s, {c["compiled_bytes"] / 2**20:.0f} MiB',
                      flush=True)
            for method in args.methods:
                row = bench(name, method, args, sampler, log)
                rows.append(row)
                t, p = row.get('time', {}), row.get('peak', {})
                parts = [f'{c} {t[c]["median_s"]:.2f} s, {p.get(c, 0) / GIB:.2f} GiB' for c in t]
                if row.get('agreement') is not None:
                    parts.append(('max rel. diff ' if method == 'ig' else 'Pearson ') + f'{row["agreement"]:.3g}')
                print(f'  {name} {method}: ' + '; '.join(parts) + ''.join(f'\n  ERROR {e}' for e in row['errors']),
                      flush=True)
    peak_all = sampler.stop()
    elapsed = time.perf_counter() - started
    print_rows(rows, compiled)
    print(f'total {elapsed:.0f} s; all processes together peaked at {peak_all / GIB:.2f} GiB', flush=True)

    import run

    info = run.machine_info(args.threads)
    command = 'python benchmarks/methods.py' + (' ' + ' '.join(sys.argv[1:]) if argv is None and sys.argv[1:] else '')
    record = {'machine': info, 'command': command, 'elapsed_s': elapsed, 'peak_all_bytes': peak_all,
              'args': vars(args), 'compiled': compiled, 'rows': rows,
              'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    with open(os.path.join(CACHE, 'methods-latest.json'), 'w') as handle:
        json.dump(record, handle, indent=1)
    if args.output:
        path = args.output if os.path.isabs(args.output) else os.path.join(ROOT, args.output)
        run.write_section(path, markdown_lines(rows, compiled, info, args, command, elapsed, peak_all), BEGIN, END)
        print(f'wrote {args.output}', flush=True)
    return 1 if any(r['errors'] for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
