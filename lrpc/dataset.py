"""Explaining a dataset on Dask: many processes (or machines), one session each.

``lrpc explain-dataset`` / :func:`explain_dataset` plans every sample in the driver (headers
only), cuts the plan into shards, and hands each shard to a Dask worker: the worker opens
the compiled file once (an onnxruntime session per worker process, kept between shards),
reads and preprocesses its samples, explains them batch by batch, and writes
``shard_NNNNN.npz`` (``relevance``, the explained ``output``, ``target``; for a file
compiled with ``--targets K``, ``relevance`` ``[n, K, ...]`` and ``target`` ``[n, K]``). The
driver shows a progress bar and writes ``index.json`` last; the folder appears whole or not
at all (:class:`lrpc.files.OutputFolder`).

Dask, not Ray: a Ray node's raylet and GCS listen on every interface even when given a
127.0.0.1 address, while a Dask cluster started here (:func:`local_cluster`) listens on
127.0.0.1 only. Pass ``scheduler="tcp://host:8786"`` to use a running cluster instead; its
workers must see the same files (a shared file system).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LrpcError

#: one session per worker process, kept between shards: ``{model path: LRP}``
_SESSIONS: dict = {}


@dataclass
class DatasetResult:
    folder: Path
    samples: int
    shards: int
    seconds: float


def local_cluster(workers: int = 2, threads: int = 1):
    """A Dask cluster of ``workers`` processes on this machine, listening on 127.0.0.1 only
    (scheduler, workers and nannies), without a dashboard."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None, protocol="tcp://", worker_dashboard_address=None,
                        silence_logs=50, env={"OMP_NUM_THREADS": str(threads)})


def _explain_shard(model: str, samples: list, spec, prep, batch_size: int, threads: int, path: str) -> int:
    """Runs on a worker: explain one shard and write it; returns the number of samples."""
    from .images import load
    from .runtime import LRP

    analyzer = _SESSIONS.get(model)
    if analyzer is None:
        analyzer = _SESSIONS[model] = LRP(model, threads=threads, providers=["cpu"])
    relevance, output, target = [], [], []
    k = analyzer.targets
    for start in range(0, len(samples), batch_size):
        x, _ = load(samples[start:start + batch_size], spec, prep)
        explanation = analyzer.analyze(x)
        val, chosen = explanation.val, explanation.output_selection
        if k > 1:  # a file of K targets: [K·b, ...] target-major -> [b, K, ...], sample-major like the shards
            val = val.reshape(k, len(x), *val.shape[1:]).swapaxes(0, 1)
            chosen = chosen.reshape(k, len(x)).T
        relevance.append(val)
        output.append(explanation.output)
        target.append(chosen)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, relevance=np.concatenate(relevance), output=np.concatenate(output),
             target=np.concatenate(target))
    os.replace(tmp, path)
    return len(samples)


def explain_dataset(model, inputs, output_dir, composite=None, *, scheduler: str | None = None, workers: int = 2,
                    shard_size: int = 1024, batch_size: int = 32, threads: int = 1, preprocess=None,
                    layout: str | None = None, progress: bool = True) -> DatasetResult:
    """Explain every sample of ``inputs`` (``.npy`` files, images, folders of them) with
    ``model`` (a plain model, compiled here with ``composite``, or a compiled file) on Dask;
    shards of ``shard_size`` samples go to ``output_dir``. ``scheduler``: the address of a
    running Dask scheduler; else a local cluster of ``workers`` processes is started and
    stopped. ``threads``: onnxruntime's intra-op threads per worker; ``preprocess``
    (:class:`lrpc.images.Preprocess`) and ``layout`` as for ``lrpc explain``."""
    import time

    from .files import OutputFolder, save_model
    from .images import Preprocess, model_input, plan
    from .runtime import LRP

    for name, value in (("workers", workers), ("shard_size", shard_size), ("batch_size", batch_size),
                        ("threads", threads)):
        if int(value) < 1:
            raise LrpcError(f"{name} must be at least 1, got {value}")
    try:
        import distributed  # noqa: F401  (only whether it is there)
    except ImportError:
        raise LrpcError("explain-dataset needs Dask: pip install 'lrpc[cpu,dataset]'") from None
    started = time.perf_counter()
    analyzer = LRP(model, composite)
    if analyzer.other_inputs:
        raise LrpcError("explain-dataset explains models with one input; use lrpc explain with --feed")
    prep = preprocess or Preprocess()
    spec = model_input(analyzer.session, analyzer.input_name, layout)
    samples = plan(inputs, spec, prep)
    if not samples:
        raise LrpcError("no samples found in the inputs")
    folder = OutputFolder(output_dir, marker="index.json")
    folder.check()
    shards = [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]
    with folder as tmp:
        compiled = tmp / "model.lrp.onnx"
        if analyzer.path is not None:  # a compiled file: copied as it is, never parsed here
            shutil.copyfile(analyzer.path, compiled)
        else:
            save_model(analyzer.model, compiled)
        names = [f"shard_{i:05d}.npz" for i in range(len(shards))]
        _run_shards(str(compiled), shards, spec, prep, batch_size, threads, [str(tmp / n) for n in names],
                    scheduler, workers, progress)
        index = {"model": "model.lrp.onnx", "samples": len(samples),
                 "shards": [{"file": n, "first": i * shard_size, "count": len(s)} for i, (n, s) in
                            enumerate(zip(names, shards))],
                 "inputs": [s.name for s in samples]}
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return DatasetResult(Path(output_dir), len(samples), len(shards), time.perf_counter() - started)


def _run_shards(model, shards, spec, prep, batch_size, threads, paths, scheduler, workers, progress) -> None:
    from distributed import Client, as_completed

    cluster = None if scheduler else local_cluster(workers, threads)
    try:
        with Client(scheduler or cluster) as client:
            futures = [client.submit(_explain_shard, model, shard, spec, prep, batch_size, threads, path, pure=False)
                       for shard, path in zip(shards, paths)]
            total = sum(len(s) for s in shards)
            bar = _progress(total) if progress and sys.stderr.isatty() else None
            try:
                for future in as_completed(futures):
                    done = future.result()  # a worker's error is raised here, in the driver
                    if bar is not None:
                        bar[0].advance(bar[1], done)
            finally:
                if bar is not None:
                    bar[0].stop()
                for future in futures:
                    future.cancel()
    finally:
        if cluster is not None:
            cluster.close()


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from rich.console import Console

    progress = Progress("explaining", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True,
                        console=Console(stderr=True))
    task = progress.add_task("samples", total=total)
    progress.start()
    return progress, task


def read_dataset(folder) -> dict:
    """The shards of an ``explain-dataset`` folder joined: ``relevance``, ``output``,
    ``target`` (arrays in sample order) and ``inputs`` (sample names)."""
    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    parts = [np.load(folder / shard["file"]) for shard in index["shards"]]
    joined = {key: np.concatenate([p[key] for p in parts]) for key in ("relevance", "output", "target")}
    return {**joined, "inputs": index["inputs"]}
