"""lrpc benchmark: plain onnxruntime inference vs lrpc's compiled explanation vs Zennit vs Captum.

Run from the repository root::

    python benchmarks/run.py                      # full run (several minutes)
    python benchmarks/run.py --quick              # smoke test, one small model, well under a minute
    python benchmarks/run.py --output BENCHMARKS.md --profile

For every (model, batch) the same seeded weights and the same seeded input go to

* ``ORT``: the exported ONNX model in an onnxruntime session (plain inference);
* ``lrpc``: ``lrpc.compile(model, <composite>)`` run in an onnxruntime session with the same options,
  fed the input only (arg-max explained), which returns the logits and the relevance;
* ``Zennit``: ``zennit.attribution.Gradient`` with the composite mirroring lrpc's preset
  (``tests/support/zennit_ref.py``) on the BatchNorm-fused torch model; the timed call is the
  attributor call (forward, arg-max one-hot output relevance, modified backward);
* ``Captum``: ``captum.attr.LRP`` where Captum supports the model, with the closest rules Captum has
  (``Alpha1_Beta0_Rule`` on convolutions, ``EpsilonRule`` elsewhere; Captum has no Flat rule and needs
  the target class up front, which is computed outside the timed call). Timed only, no parity check.

Every time is the median of ``--repeats`` calls after ``--warmup`` calls; torch and onnxruntime use the
same number of threads. The timed calls of one (model, batch) are interleaved (ORT, lrpc, Zennit, Captum,
ORT, ...), so that interference from other load on the machine hits all contenders alike; the best
(minimum) times are recorded too. Session creation, compilation and composite registration are measured
apart.
Parity: once per model, lrpc's relevance vs Zennit's (run once more in float64, outside the timing)
on the same input, as ``max|R_lrpc - R_zennit| / max|R_zennit|``.
``--profile`` adds onnxruntime's profile of the compiled model (time per op type, forward vs relevance
pass) for ResNet-50 at batch 1 and for the configurations with the worst lrpc/ORT and Zennit/lrpc ratios.

Exports and compiled files are cached under ``.bench/`` (git-ignored); raw results are written to
``.bench/results-latest.json``. ``--output FILE`` writes (or replaces) the results section of FILE
between the markers ``<!-- lrpc-bench:begin -->`` and ``<!-- lrpc-bench:end -->``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, '.bench')
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import models  # benchmarks/models.py

# the full benchmark: (model, batch)
DEFAULT_CONFIGS = (('resnet50', 1), ('resnet50', 8), ('vgg16', 1), ('mobilenet_v2', 8))
QUICK_CONFIGS = (('mobilenet_v2', 1),)

BEGIN = '<!-- lrpc-bench:begin -->'
END = '<!-- lrpc-bench:end -->'

# the project's targets
TARGET_ZENNIT_SPEEDUP = 3.0      # Zennit time / lrpc time, worst model
TARGET_ORT_RATIO = 3.0           # lrpc time / plain ORT time, worst model
TARGET_COMPILE_S = 5.0           # compiling ResNet-50
TARGET_SIZE_RATIO = 1.1          # compiled file / original file


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        ms = [s * 1e3 for s in seconds]
        return cls(statistics.median(ms), min(ms), max(ms), len(ms))


# --------------------------------------------------------------------------------------------------
# the contenders
# --------------------------------------------------------------------------------------------------

def ort_options(threads: int, profile_prefix: str | None = None, mem_pattern: bool = True):
    """Session options of the timings; ``mem_pattern=False`` is what lrpc's own sessions use
    (``lrpc.runtime.session.make_session``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_mem_pattern = mem_pattern
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3      # no "lrp_target appears in graph inputs" warning
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def ort_session(model, threads: int, profile_prefix: str | None = None, providers=('CPUExecutionProvider',),
                mem_pattern: bool = True):
    """``(session, seconds to create it)``; ``model`` is a path or serialized bytes."""
    import onnxruntime as ort

    start = time.perf_counter()
    session = ort.InferenceSession(model, ort_options(threads, profile_prefix, mem_pattern), providers=list(providers))
    if session.get_providers()[0] != providers[0]:  # onnxruntime falls back to the CPU without a word
        raise RuntimeError(f'{providers[0]} is not available: the session runs on {session.get_providers()}')
    return session, time.perf_counter() - start


def make_composite(expression: str):
    """lrpc composite from a preset name or expression (``EpsilonPlusFlat``, ``EpsilonPlus(epsilon=1e-6)``)."""
    from lrpc.expressions import parse_composite

    return parse_composite(expression)


def compile_lrpc(onnx_path: str, composite: str, repeats: int):
    """Compile ``repeats`` times; returns ``(median seconds, all seconds, serialized compiled model)``."""
    import lrpc

    seconds = []
    compiled = None
    for _ in range(max(1, repeats)):
        comp = make_composite(composite)
        start = time.perf_counter()
        proto = lrpc.compile(onnx_path, comp, verbose=False)
        compiled = proto.SerializeToString()
        seconds.append(time.perf_counter() - start)
        del proto
    return statistics.median(seconds), seconds, compiled


def zennit_composite(composite: str):
    """The Zennit composite mirroring the lrpc preset expression ``composite`` (``EpsilonPlusFlat``,
    ``EpsilonGammaBox(low=-3.0, high=3.0)``, ``EpsilonPlus(epsilon=1e-6)``); keyword literals only."""
    import ast

    ref = models.zennit_ref()
    try:
        node = ast.parse(composite.strip(), mode='eval').body
    except SyntaxError as error:
        raise ValueError(f'cannot parse composite {composite!r}') from error
    if isinstance(node, ast.Name):
        name, kwargs = node.id, {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        name = node.func.id
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
    else:
        raise ValueError(f'no Zennit mirror for {composite!r}: a preset name with keyword arguments only')
    if name not in ref.PRESETS:
        raise ValueError(f'no Zennit mirror for composite {composite!r} (known: {", ".join(ref.PRESETS)})')
    return ref.composite(name, **kwargs)


def zennit_runner(torch_model, composite: str):
    """``(attributor, call)``: Zennit's Gradient attributor with the mirrored composite (enter it to
    register the composite) and ``call(x) -> relevance``."""
    import torch

    ref = models.zennit_ref()
    zennit = ref.import_zennit()
    model = models.for_zennit(torch_model)
    attributor = zennit.attribution.Gradient(model=model, composite=zennit_composite(composite))

    def one_hot_argmax(output):
        return torch.nn.functional.one_hot(output.argmax(1), output.shape[1]).to(output.dtype)

    def call(x):
        _, relevance = attributor(x, one_hot_argmax)
        return relevance

    return attributor, call


def zennit_float64(torch_model, composite: str, x):
    """Zennit's relevance in float64 (the parity reference; float32 Zennit itself can be off by ~1e-3
    where a ZPlus denominator is small)."""
    import torch

    ref = models.zennit_ref()
    zennit = ref.import_zennit()
    model = models.for_zennit(torch_model).double()
    xt = torch.from_numpy(x).double()
    with zennit.attribution.Gradient(model=model, composite=zennit_composite(composite)) as attributor:
        _, relevance = attributor(xt, lambda out: torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(out.dtype))
    result = relevance.detach().numpy()
    del model, attributor, relevance
    gc.collect()
    return result


CAPTUM_RULES_NOTE = 'Alpha1_Beta0 on convs, Epsilon(1e-6) on the first conv and on Linear, Captum defaults elsewhere'


def captum_unsupported(model) -> str | None:
    """Why Captum's LRP cannot explain ``model`` (its leaf modules), or None."""
    from captum.attr._core.lrp import (
        SUPPORTED_LAYERS_WITH_RULES,
        SUPPORTED_NON_LINEAR_LAYERS,
    )
    from torch import nn

    missing = sorted({type(m).__name__ for m in model.modules()
                      if next(m.children(), None) is None and not isinstance(m, nn.Identity)
                      and type(m) not in SUPPORTED_LAYERS_WITH_RULES and type(m) not in SUPPORTED_NON_LINEAR_LAYERS})
    if missing:
        return f'no LRP rule for {", ".join(missing)}'
    return None


def captum_runner(torch_model):
    """``call(x, target)`` running Captum's LRP on the BatchNorm-fused model, or a string (why not)."""
    try:
        import captum  # noqa: F401
        from captum.attr import LRP
        from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule
    except Exception as error:     # noqa: BLE001
        return f'not installed: captum does not import ({type(error).__name__}: {error})'
    from torch import nn

    model = models.for_captum(torch_model)
    reason = captum_unsupported(model)
    if reason:
        return reason

    class _LRP(LRP):
        # BatchNorm fused into the conv leaves nn.Identity modules: no hooks, the relevance passes
        def _get_layers(self, module):
            super()._get_layers(module)
            self.layers = [layer for layer in self.layers if not isinstance(layer, nn.Identity)]

    import warnings
    warnings.filterwarnings('ignore', message='Input Tensor 0 did not already require gradients')
    lrp = _LRP(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

    def call(x, target):
        # Captum deletes the rules after every call: attach them again
        for conv in convs:
            conv.rule = Alpha1_Beta0_Rule()
        convs[0].rule = EpsilonRule(epsilon=1e-6)
        for linear in linears:
            linear.rule = EpsilonRule(epsilon=1e-6)
        return lrp.attribute(x, target=target)

    return call


# --------------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------------

@dataclass
class Row:
    model: str
    batch: int
    ort: Timing | None = None
    ort_init_s: float | None = None
    lrpc: Timing | None = None
    lrpc_init_s: float | None = None
    zennit: Timing | None = None
    captum: Timing | None = None
    captum_note: str | None = None
    compile_s: float | None = None
    compile_runs_s: list[float] = field(default_factory=list)
    original_bytes: int | None = None
    compiled_bytes: int | None = None
    parity: float | None = None
    zennit32_err: float | None = None
    logits_err: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def lrpc_over_ort(self):
        return self.lrpc.median_ms / self.ort.median_ms if self.lrpc and self.ort else None

    @property
    def zennit_over_lrpc(self):
        return self.zennit.median_ms / self.lrpc.median_ms if self.zennit and self.lrpc else None

    @property
    def captum_over_lrpc(self):
        return self.captum.median_ms / self.lrpc.median_ms if self.captum and self.lrpc else None

    @property
    def size_ratio(self):
        return self.compiled_bytes / self.original_bytes if self.compiled_bytes and self.original_bytes else None


def _rel_err(a, b):
    import numpy as np

    scale = float(np.abs(b).max())
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max() / (scale if scale > 0 else 1.0))


def log(message: str) -> None:
    print(f'  {message}', flush=True)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``). torch frees a
    backward pass's tensors into the heap, which keeps them resident: with Zennit and Captum
    taking turns in one process at batch 8, the harness otherwise holds both peaks at once
    (ResNet-50: 9.2 GiB). Called between timed calls, never inside one."""
    import ctypes

    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def measure_interleaved(contenders: dict, warmup: int, repeats: int, budget_s: float = 0.0, min_repeats: int = 3):
    """Time several callables in rounds (A, B, C, A, B, C, ...) so that a slow patch of the machine
    (other load on the host) hits all of them alike. Returns ``{name: (Timing, last result)}``.
    The freed heap is handed back after each call (:func:`release_freed_memory`), untimed.

    ``budget_s`` (0: none): a contender that has spent that many seconds and has at least
    ``min_repeats`` timed calls leaves the remaining rounds."""
    results = {}
    for name, fn in contenders.items():
        for _ in range(warmup):
            results[name] = fn()
            release_freed_memory()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(max(1, repeats)):
        for name, fn in contenders.items():
            spent = times[name]
            if budget_s and sum(spent) > budget_s and len(spent) >= min_repeats:
                continue
            start = time.perf_counter()
            results[name] = fn()
            spent.append(time.perf_counter() - start)
            release_freed_memory()
    return {name: (Timing.of(times[name]), results.get(name)) for name in contenders}


def bench_model(name: str, batches: list[int], args, console) -> list[Row]:
    """All contenders of one model, batch by batch; the timed calls are interleaved (see
    :func:`measure_interleaved`); every framework uses the same weights and the same input."""
    import numpy as np
    import torch

    rows = [Row(name, batch) for batch in batches]
    path = models.onnx_path(name, os.path.join(CACHE, 'models'))
    original_bytes = os.path.getsize(path)
    torch_model = models.build(name)

    # compile once per model: the compiled file keeps the dynamic batch axis
    seconds, runs, compiled = compile_lrpc(path, args.composite, args.compile_repeats)
    compiled_path = os.path.join(CACHE, 'compiled', os.path.basename(path).replace('.onnx', '.lrp.onnx'))
    os.makedirs(os.path.dirname(compiled_path), exist_ok=True)
    with open(compiled_path, 'wb') as handle:
        handle.write(compiled)
    log(f'{name}: compile {seconds:.2f} s (runs: {", ".join(f"{s:.2f}" for s in runs)}), '
        f'{len(compiled) / 1e6:.1f} MB vs {original_bytes / 1e6:.1f} MB')
    for row in rows:
        row.compile_s, row.compile_runs_s = seconds, runs
        row.original_bytes, row.compiled_bytes = original_bytes, len(compiled)

    ort_sess, ort_init = ort_session(path, args.threads)
    lrpc_sess, lrpc_init = ort_session(compiled, args.threads)
    del compiled
    lrpc_outputs = [o.name for o in lrpc_sess.get_outputs()]
    log(f'{name}: session init: plain {ort_init:.2f} s, compiled {lrpc_init:.2f} s')

    zennit_ctx = zennit_call = None
    if not args.no_zennit:
        try:
            zennit_ctx, zennit_call = zennit_runner(torch_model, args.composite)
            zennit_ctx.__enter__()
        except Exception as error:     # noqa: BLE001
            zennit_ctx = zennit_call = None
            for row in rows:
                row.errors.append(f'Zennit: {type(error).__name__}: {error}')
            log(f'{name}: Zennit unavailable: {type(error).__name__}: {error}')
    captum_call = None
    if not args.no_captum:
        captum_call = captum_runner(torch_model)
        if isinstance(captum_call, str):
            note = captum_call if captum_call.startswith('not installed') else f'unsupported: {captum_call}'
            for row in rows:
                row.captum_note = note
            log(f'{name}: Captum {note}')
            captum_call = None

    try:
        for index, row in enumerate(rows):
            x = models.example_input(row.batch, seed=row.batch)
            xt = torch.from_numpy(x)
            feed = {models.INPUT_NAME: x}
            row.ort_init_s, row.lrpc_init_s = ort_init, lrpc_init
            logits = ort_sess.run(None, feed)[0]
            contenders = {
                'ort': lambda feed=feed: ort_sess.run(None, feed),
                'lrpc': lambda feed=feed: lrpc_sess.run(None, feed),
            }
            if zennit_call is not None:
                xz = torch.from_numpy(x.copy())     # Zennit sets requires_grad on its input
                contenders['zennit'] = lambda xz=xz: zennit_call(xz)
            if captum_call is not None:
                # Captum needs the target class up front: the arg-max, computed here (not timed)
                target = torch.from_numpy(np.asarray(logits).argmax(1))
                try:
                    captum_call(xt, target)
                    contenders['captum'] = lambda xt=xt, target=target: captum_call(xt, target)
                except Exception as error:     # noqa: BLE001
                    row.captum_note = f'unsupported: {type(error).__name__}: {str(error).splitlines()[0][:120]}'
                    log(f'{name} b{row.batch}: Captum failed: {row.captum_note}')
            measured = measure_interleaved(contenders, args.warmup, args.repeats, args.budget)
            row.ort = measured['ort'][0]
            row.lrpc, out = measured['lrpc']
            result = dict(zip(lrpc_outputs, out))
            row.logits_err = _rel_err(result[models.OUTPUT_NAME], logits)
            if 'zennit' in measured:
                row.zennit, relevance = measured['zennit']
                if index == 0 and not args.no_parity:     # parity once per model, against float64 Zennit
                    reference = zennit_float64(torch_model, args.composite, x)
                    parity = _rel_err(result['relevance'], reference)
                    zennit32 = _rel_err(relevance.detach().numpy(), reference)
                    for other in rows:
                        other.parity, other.zennit32_err = parity, zennit32
                    del reference
                del relevance
            if 'captum' in measured:
                row.captum = measured['captum'][0]
            del measured, contenders, out, result
            parts = [f'ORT {row.ort.median_ms:.1f} ms', f'lrpc {row.lrpc.median_ms:.1f} ms']
            if row.zennit:
                parts.append(f'Zennit {row.zennit.median_ms:.1f} ms')
            if row.captum:
                parts.append(f'Captum {row.captum.median_ms:.1f} ms')
            parity = '' if row.parity is None or index else (
                f'; parity vs float64 Zennit: lrpc {row.parity:.1e}, float32 Zennit {row.zennit32_err:.1e}')
            log(f'{name} b{row.batch}: ' + ', '.join(parts) + f' (medians of {row.lrpc.runs}){parity}')
            gc.collect()
            release_freed_memory()
    finally:
        if zennit_ctx is not None:
            zennit_ctx.__exit__(None, None, None)
        ort_sess = lrpc_sess = zennit_ctx = zennit_call = captum_call = torch_model = None
        gc.collect()
    return rows


# --------------------------------------------------------------------------------------------------
# onnxruntime profile of the compiled model
# --------------------------------------------------------------------------------------------------

def profile_model(name: str, batch: int, args) -> dict:
    """Per-op-type time of one plain and one compiled session (``lrp/`` nodes = the relevance pass).

    The first profiled run is a warm-up and is left out."""
    path = models.onnx_path(name, os.path.join(CACHE, 'models'))
    compiled_path = os.path.join(CACHE, 'compiled', os.path.basename(path).replace('.onnx', '.lrp.onnx'))
    if not os.path.exists(compiled_path):
        _, _, compiled = compile_lrpc(path, args.composite, 1)
        os.makedirs(os.path.dirname(compiled_path), exist_ok=True)
        with open(compiled_path, 'wb') as handle:
            handle.write(compiled)
    x = models.example_input(batch, seed=batch)
    runs = max(2, args.profile_runs)
    summary = {'model': name, 'batch': batch, 'runs': runs - 1}
    prof_dir = os.path.join(CACHE, 'profiles')
    os.makedirs(prof_dir, exist_ok=True)
    for kind, model_path in (('ort', path), ('lrpc', compiled_path)):
        session, _ = ort_session(model_path, args.threads, os.path.join(prof_dir, f'{name}-b{batch}-{kind}'))
        for _ in range(runs):
            session.run(None, {models.INPUT_NAME: x})
        trace = session.end_profiling()
        del session
        gc.collect()
        with open(trace) as handle:
            events = json.load(handle)
        model_runs = sorted((e for e in events if e.get('cat') == 'Session' and e.get('name') == 'model_run'),
                            key=lambda e: e['ts'])
        skip_until = model_runs[0]['ts'] + model_runs[0]['dur'] if model_runs else -1
        per_op: dict[tuple[str, str], list[float]] = {}
        for event in events:
            if event.get('cat') != 'Node' or not event.get('name', '').endswith('_kernel_time'):
                continue
            if event['ts'] <= skip_until:
                continue
            op = event.get('args', {}).get('op_name', '?')
            if event['name'].startswith('lrp/'):
                part = 'relevance'
            elif op in ('ReorderInput', 'ReorderOutput'):
                part = 'layout'      # inserted by onnxruntime's NCHWc transformer
            else:
                part = 'forward'
            entry = per_op.setdefault((op, part), [0.0, 0])
            entry[0] += event['dur'] / 1e3
            entry[1] += 1
        total_ms = [r['dur'] / 1e3 for r in model_runs[1:]]
        summary[kind] = {
            'run_ms_median': statistics.median(total_ms) if total_ms else None,
            'ops': sorted(([op, part, ms / (runs - 1), count // (runs - 1)] for (op, part), (ms, count) in per_op.items()),
                          key=lambda item: -item[2]),
            'trace': os.path.relpath(trace, ROOT),
        }
        del events
    return summary


def print_profile(summary: dict, console, top: int = 15) -> None:
    from rich.table import Table

    lrpc_ops = summary['lrpc']['ops']
    kernel_total = sum(item[2] for item in lrpc_ops) or 1.0
    ort_ms = summary['ort']['run_ms_median']
    table = Table(title=f'onnxruntime profile, compiled {summary["model"]} batch {summary["batch"]} '
                        f'({summary["runs"]} runs; run {summary["lrpc"]["run_ms_median"]:.0f} ms, '
                        f'plain model {ort_ms:.0f} ms)')
    for column in ('op type', 'part', 'ms / run', 'share', 'nodes'):
        table.add_column(column, justify='left' if column in ('op type', 'part') else 'right')
    for op, part, ms, count in lrpc_ops[:top]:
        table.add_row(op, part, f'{ms:.1f}', f'{100 * ms / kernel_total:.1f}%', str(count))
    console.print(table)
    console.print('  kernel time by part: ' + _parts_line(lrpc_ops))


def _parts_line(lrpc_ops) -> str:
    """``forward 52 ms (27%), layout 18 ms (10%), ...``: kernel time summed by part."""
    kernel_total = sum(item[2] for item in lrpc_ops) or 1.0
    by_part: dict[str, float] = {}
    for _, part, ms, _ in lrpc_ops:
        by_part[part] = by_part.get(part, 0.0) + ms
    return ', '.join(f'{part} {ms:.0f} ms ({100 * ms / kernel_total:.0f}%)' for part, ms in sorted(by_part.items()))


def profile_markdown(summary: dict, top: int = 15) -> str:
    lrpc_ops = summary['lrpc']['ops']
    kernel_total = sum(item[2] for item in lrpc_ops) or 1.0
    lines = [
        f'onnxruntime profile of the compiled {summary["model"]} at batch {summary["batch"]} '
        f'({summary["runs"]} profiled runs after one warm-up; median run {summary["lrpc"]["run_ms_median"]:.0f} ms, '
        f'the plain model {summary["ort"]["run_ms_median"]:.0f} ms under the profiler). Nodes named `lrp/…` are the '
        f'relevance pass, `ReorderInput`/`ReorderOutput` the layout conversions onnxruntime inserts around its '
        f'NCHWc convolutions (`layout`), the others the forward pass (onnxruntime may fuse nodes). Kernel time by part: '
        + _parts_line(lrpc_ops) + '.',
        '',
        '| op type | part | ms / run | share | nodes |',
        '| --- | --- | ---: | ---: | ---: |',
    ]
    for op, part, ms, count in lrpc_ops[:top]:
        lines.append(f'| {op} | {part} | {ms:.1f} | {100 * ms / kernel_total:.1f}% | {count} |')
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

def _fmt_ms(timing: Timing | None, note: str | None = None) -> str:
    if timing is None:
        return note or 'n/a'
    return f'{timing.median_ms:,.1f}'


def _fmt_x(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.2f}x'


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for row in rows:
        captum = _fmt_ms(row.captum, (row.captum_note or 'n/a').split(':')[0])
        out.append([
            row.model, str(row.batch), _fmt_ms(row.ort), _fmt_ms(row.lrpc), _fmt_ms(row.zennit), captum,
            _fmt_x(row.lrpc_over_ort), _fmt_x(row.zennit_over_lrpc), _fmt_x(row.captum_over_lrpc),
            'n/a' if row.compile_s is None else f'{row.compile_s:.2f}',
            'n/a' if row.lrpc_init_s is None else f'{row.lrpc_init_s:.2f}',
            _fmt_x(row.size_ratio).replace('x', '') if row.size_ratio else 'n/a',
            'n/a' if row.parity is None else f'{row.parity:.1e}',
        ])
    return out


HEADERS = ['model', 'batch', 'ORT ms', 'lrpc ms', 'Zennit ms', 'Captum ms', 'lrpc/ORT', 'Zennit/lrpc',
           'Captum/lrpc', 'compile s', 'lrpc init s', 'size ratio', 'parity err']


def targets(rows: list[Row]) -> list[tuple[str, bool | None, str]]:
    """``(target, passed, measured)`` for the issue's four targets; passed is None when not measured."""
    def worst(label, value, pick, ok, show):
        measured = [(value(row), row) for row in rows if value(row) is not None]
        if not measured:
            return (label, None, 'not measured')
        amount, row = pick(measured, key=lambda item: item[0])
        return (label, ok(amount), show(amount, row))

    return [
        worst(f'lrpc >= {TARGET_ZENNIT_SPEEDUP:g}x faster than Zennit (worst model)', lambda r: r.zennit_over_lrpc,
              min, lambda v: v >= TARGET_ZENNIT_SPEEDUP, lambda v, r: f'{v:.2f}x ({r.model} b{r.batch})'),
        worst(f'lrpc <= {TARGET_ORT_RATIO:g}x plain ORT inference (worst model)', lambda r: r.lrpc_over_ort,
              max, lambda v: v <= TARGET_ORT_RATIO, lambda v, r: f'{v:.2f}x ({r.model} b{r.batch})'),
        worst(f'compiling ResNet-50 < {TARGET_COMPILE_S:g} s',
              lambda r: r.compile_s if r.model == 'resnet50' else None,
              max, lambda v: v < TARGET_COMPILE_S, lambda v, r: f'{v:.2f} s'),
        worst(f'compiled file <= {TARGET_SIZE_RATIO:g}x the original (worst model)', lambda r: r.size_ratio,
              max, lambda v: v <= TARGET_SIZE_RATIO, lambda v, r: f'{v:.3f}x ({r.model})'),
    ]


def _verdict(passed: bool | None) -> str:
    return {True: 'PASS', False: 'FAIL', None: '—'}[passed]


def print_report(rows: list[Row], console) -> None:
    from rich.table import Table

    table = Table(title='lrpc benchmark (median ms; ratios of medians)')
    for header in HEADERS:
        table.add_column(header, justify='left' if header == 'model' else 'right')
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)
    for row in rows:
        if row.captum_note:
            console.print(f'  Captum, {row.model} b{row.batch}: {row.captum_note}')
        for error in row.errors:
            console.print(f'  [red]{row.model} b{row.batch}: {error}[/red]')
    for target, passed, measured in targets(rows):
        color = {True: 'green', False: 'red', None: 'yellow'}[passed]
        console.print(f'  [{color}]{_verdict(passed)}[/{color}] {target}: {measured}')


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except Exception:     # noqa: BLE001
        return ''


def machine_info(threads: int) -> dict:
    from importlib import metadata

    cpu = ''
    try:
        with open('/proc/cpuinfo') as handle:
            cpu = next((line.split(':', 1)[1].strip() for line in handle if line.startswith('model name')), '')
    except OSError:
        pass
    memory = ''
    try:
        with open('/proc/meminfo') as handle:
            kb = next(int(line.split()[1]) for line in handle if line.startswith('MemTotal'))
        memory = f'{kb / 2**20:.1f} GiB'
    except (OSError, StopIteration):
        pass
    os_name = platform.platform()
    try:
        with open('/etc/os-release') as handle:
            pretty = next((line.split('=', 1)[1].strip().strip('"') for line in handle if line.startswith('PRETTY_NAME')), '')
        if pretty:
            os_name = f'{pretty} ({platform.system()} {platform.release()})'
    except OSError:
        pass
    versions = {}
    for package in ('onnxruntime', 'onnx', 'torch', 'zennit', 'captum', 'numpy', 'lrpc'):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = 'not installed'
    commit = _run(['git', 'rev-parse', '--short', 'HEAD'])
    dirty = bool(_run(['git', 'status', '--porcelain', '--untracked-files=no', '--', 'lrpc']))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        'cpu': cpu or platform.processor() or 'unknown',
        'cores': cores,
        'threads': threads,
        'memory': memory,
        'os': os_name,
        'python': platform.python_version(),
        'versions': versions,
        'lrpc_commit': commit + (' + uncommitted changes in lrpc/' if dirty else ''),
    }


def markdown(rows: list[Row], info: dict, args, command: str, elapsed_s: float, peak_rss_gib: float,
             profiles: list[dict]) -> str:
    versions = ', '.join(f'{name} {version}' for name, version in info['versions'].items())
    lines = [
        BEGIN,
        '## Results',
        '',
        f'- Date: {datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}',
        f'- Machine: {info["cpu"]}, {info["cores"]} cores, {info["memory"]} memory, {info["os"]}',
        f'- Python {info["python"]}; {versions}',
        f'- lrpc at commit {info["lrpc_commit"] or "unknown"}',
        f'- Command: `{command}` ({elapsed_s / 60:.1f} min, peak resident memory {peak_rss_gib:.1f} GiB)',
        f'- Settings: {info["threads"]} threads for torch and onnxruntime (intra-op; sequential execution, '
        f'`ORT_ENABLE_ALL`, CPUExecutionProvider); composite `{args.composite}`; median of {args.repeats} '
        f'timed calls after {args.warmup} warm-up calls, the contenders\' calls interleaved'
        + (f' (fewer when a measurement exceeded {args.budget:g} s, at least 3)' if args.budget else '')
        + f'; compile time: median of {args.compile_repeats}; inputs N(0, 1), seeded; random seeded weights.',
        '',
        '| ' + ' | '.join(HEADERS) + ' |',
        '| ' + ' | '.join(['---'] + ['---:'] * (len(HEADERS) - 1)) + ' |',
    ]
    for cells in table_rows(rows):
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += [
        '',
        'Best (minimum) times of the same calls, less sensitive to interference from other load:',
        '',
        '| model | batch | ORT ms | lrpc ms | Zennit ms | Captum ms | lrpc/ORT | Zennit/lrpc |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ]
    for row in rows:
        def best(t):
            return 'n/a' if t is None else f'{t.min_ms:,.1f}'
        lrpc_ort = row.lrpc.min_ms / row.ort.min_ms if row.lrpc and row.ort else None
        zennit_lrpc = row.zennit.min_ms / row.lrpc.min_ms if row.zennit and row.lrpc else None
        lines.append(f'| {row.model} | {row.batch} | {best(row.ort)} | {best(row.lrpc)} | {best(row.zennit)} | '
                     f'{best(row.captum) if row.captum else (row.captum_note or "n/a").split(":")[0]} | '
                     f'{_fmt_x(lrpc_ort)} | {_fmt_x(zennit_lrpc)} |')
    lines += [
        '',
        ('Columns: `ORT` plain onnxruntime inference of the exported model; `lrpc` the compiled file in '
        'onnxruntime (logits and relevance in one call); `Zennit` `Gradient` attributor with the mirrored '
        'composite on the BatchNorm-fused torch model (forward + modified backward); `Captum` `captum.attr.LRP` '
        f'({CAPTUM_RULES_NOTE}; target given, not timed); `compile s` `lrpc.compile` from the file; `lrpc init s` '
        'creating the onnxruntime session of the compiled file (parameter folding happens there); `size ratio` '
        'compiled / original file; `parity err` max |R_lrpc − R_Zennit| / max |R_Zennit| against Zennit in float64 '
        'on the first batch of the model (the float32 Zennit run\'s own error is in the notes).'),
        '',
    ]
    notes = sorted({f'- Captum on {row.model}: {row.captum_note}' for row in rows if row.captum_note})
    notes += [f'- Parity on {row.model} (batch {row.batch}) against float64 Zennit: lrpc {row.parity:.1e}, '
              f'float32 Zennit {row.zennit32_err:.1e}'
              for row in rows if row.parity is not None and row is next(r for r in rows if r.model == row.model)]
    notes += [f'- {row.model} b{row.batch}: {error}' for row in rows for error in row.errors]
    if notes:
        lines += notes + ['']
    lines += ['Targets:', '']
    for target, passed, measured in targets(rows):
        lines.append(f'- **{_verdict(passed)}** {target}: {measured}')
    lines.append('')
    for summary in profiles:
        lines += [profile_markdown(summary), '']
    lines.append(END)
    return '\n'.join(lines)


def write_markdown(path: str, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the part of ``path`` between ``begin`` and ``end`` (``section`` holds both
    markers), or append it."""
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
        if begin in text and end in text:
            text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
        else:
            text = text.rstrip('\n') + '\n\n' + section + '\n'
    else:
        text = ('# Benchmarks\n\nWritten by `python benchmarks/run.py --output BENCHMARKS.md` '
                '(`make bench` runs the benchmark; see `benchmarks/run.py`).\n\n' + section + '\n')
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as handle:
        handle.write(text)
    os.replace(tmp, path)


def section_head(title: str, info: dict) -> list[str]:
    """The first lines of a BENCHMARKS.md section: title, date, machine and commit."""
    return [f'## {title}', '', f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} memory, {info['os']}; lrpc at commit "
            f"{info['lrpc_commit']}"]


def write_section(path: str, lines: list[str], begin: str, end: str) -> None:
    """``lines`` between ``begin`` and ``end`` in ``path`` (see :func:`write_markdown`)."""
    write_markdown(path, '\n'.join([begin, *lines, '', end]), begin, end)


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
    parser.add_argument('--models', nargs='+', choices=models.MODEL_NAMES, default=None,
                        help='models to run (default: all; batches as in the default plan unless --batches)')
    parser.add_argument('--batches', nargs='+', type=int, default=None,
                        help='batch sizes for every selected model (default plan: resnet50 1 and 8, vgg16 1, '
                             'mobilenet_v2 8)')
    parser.add_argument('--repeats', type=int, default=10, help='timed calls per measurement (median; default 10)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls first (default 2)')
    parser.add_argument('--budget', type=float, default=0.0,
                        help='seconds per measurement after which repeats stop early (at least 3; default 0: off)')
    parser.add_argument('--compile-repeats', type=int, default=3, help='compilations per model (median; default 3)')
    parser.add_argument('--threads', type=int, default=cores, help=f'threads for torch and onnxruntime (default {cores})')
    parser.add_argument('--composite', default='EpsilonPlusFlat', help='lrpc preset (Zennit mirrors it; default EpsilonPlusFlat)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke test: mobilenet_v2 at batch 1, 3 repeats, 1 warm-up, 1 compilation')
    parser.add_argument('--no-zennit', action='store_true', help='skip Zennit')
    parser.add_argument('--no-captum', action='store_true', help='skip Captum')
    parser.add_argument('--no-parity', action='store_true', help='skip the float64 Zennit parity check')
    parser.add_argument('--profile', action='store_true',
                        help='also profile the compiled model in onnxruntime (per op type): resnet50 at batch 1 if '
                             'selected, and the configurations with the worst lrpc/ORT and Zennit/lrpc ratios')
    parser.add_argument('--profile-runs', type=int, default=6, help='profiled runs (the first is left out; default 6)')
    parser.add_argument('--output', default=None, help='write/update the results section of this Markdown file')
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.compile_repeats = min(args.repeats, 3), min(args.warmup, 1), 1
        args.profile_runs = min(args.profile_runs, 3)
    return args


def plan(args) -> list[tuple[str, list[int]]]:
    if args.quick and args.models is None and args.batches is None:
        configs = list(QUICK_CONFIGS)
    else:
        selected = args.models or list(dict.fromkeys(name for name, _ in DEFAULT_CONFIGS))
        if args.quick and args.models is None:
            selected = [QUICK_CONFIGS[0][0]]
        if args.batches:
            configs = [(name, batch) for name in selected for batch in args.batches]
        else:
            configs = [(name, batch) for name, batch in DEFAULT_CONFIGS if name in selected]
            configs += [(name, 1) for name in selected if not any(n == name for n, _ in configs)]
    grouped: dict[str, list[int]] = {}
    for name, batch in configs:
        grouped.setdefault(name, []).append(batch)
    return list(grouped.items())


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))

    import torch
    from rich.console import Console

    torch.set_num_threads(args.threads)
    models.zennit_ref().import_zennit()     # the torchvision stub before anything imports zennit/captum
    console = Console() if sys.stdout.isatty() else Console(width=180)
    info = machine_info(args.threads)
    console.print(f'[bold]lrpc benchmark[/bold]: {info["cpu"]}, {info["cores"]} cores, {info["memory"]}; '
                  f'{args.threads} threads; composite {args.composite}; '
                  f'median of {args.repeats} after {args.warmup} warm-up')
    rows: list[Row] = []
    for name, batches in plan(args):
        console.print(f'[bold]{name}[/bold] (batch {", ".join(map(str, batches))})')
        rows += bench_model(name, batches, args, console)
        gc.collect()

    profiles = []
    if args.profile and rows:
        chosen = [(r.model, r.batch) for r in rows if r.model == 'resnet50' and r.batch == 1]
        measured = [r for r in rows if r.lrpc_over_ort is not None]
        if measured:
            worst = max(measured, key=lambda r: r.lrpc_over_ort)
            chosen.append((worst.model, worst.batch))
        measured = [r for r in rows if r.zennit_over_lrpc is not None]
        if measured:
            worst = min(measured, key=lambda r: r.zennit_over_lrpc)
            chosen.append((worst.model, worst.batch))
        for target in list(dict.fromkeys(chosen)) or [(rows[0].model, rows[0].batch)]:
            console.print(f'[bold]profiling[/bold] {target[0]} batch {target[1]}')
            summary = profile_model(*target, args)
            print_profile(summary, console)
            profiles.append(summary)

    elapsed = time.perf_counter() - started
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print_report(rows, console)
    console.print(f'  total {elapsed:.0f} s, peak resident memory {peak_rss_gib:.1f} GiB')

    command = 'python benchmarks/run.py' + (' ' + ' '.join(sys.argv[1:]) if argv is None and sys.argv[1:] else '')
    os.makedirs(CACHE, exist_ok=True)
    record = {
        'machine': info, 'command': command, 'elapsed_s': elapsed, 'peak_rss_gib': peak_rss_gib,
        'args': vars(args), 'rows': [asdict(row) for row in rows], 'profiles': profiles,
        'targets': [{'target': t, 'passed': p, 'measured': m} for t, p, m in targets(rows)],
        'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
    }
    with open(os.path.join(CACHE, 'results-latest.json'), 'w') as handle:
        json.dump(record, handle, indent=1)
    if args.output:
        write_markdown(os.path.join(ROOT, args.output) if not os.path.isabs(args.output) else args.output,
                       markdown(rows, info, args, command, elapsed, peak_rss_gib, profiles))
        console.print(f'  wrote {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
