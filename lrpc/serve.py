"""``lrpc serve``: a compiled file behind a real inference server (KServe v2 over HTTP and gRPC).

The server is NVIDIA Triton as PyTriton ships it (``pip install 'lrpc[cpu,serve]'``): its
bundled ``tritonserver`` speaks the protocol and batches requests dynamically; the batches
reach this process, which runs them in one onnxruntime session of the compiled file.

What a client sees (``tritonclient`` works unchanged):

* the model's inputs with their per-sample shapes, plus ``lrp_target`` (INT64 ``[1]`` per
  row, optional: -1 or left out = the arg-max); outputs: the model's own and ``relevance``
  (and whatever else the file returns: ``lrp_class``, ``lrp_report``...);
* requests are merged into batches; each row keeps its own target (filled with -1 where a
  request sent none). Triton closes a batch whenever the next request has a different set
  of inputs, so clients that always send ``lrp_target`` batch best;
* a bad request (target out of range, missing input) gets its own error, HTTP 400 /
  gRPC INVALID_ARGUMENT with one line, and the requests batched with it are answered
  normally. PyTriton has no per-request error, but the backend underneath does: the proxy
  model PyTriton hands to Triton is given a few lines that turn a marked response into
  ``InferenceResponse(error=...)`` (:func:`_install_request_errors`; pinned to the
  PyTriton release the ``serve`` extra installs, refused loudly on any other);
* it binds 127.0.0.1 unless ``--host`` says otherwise, and stops cleanly on SIGINT/SIGTERM.
"""
from __future__ import annotations

import logging
import os
import pathlib
import signal
import socket
import sysconfig
import time
from dataclasses import dataclass

import numpy as np

from .emit import REGION_NAME, TARGET_NAME
from .errors import LrpcError
from .runtime.analyzer import _numpy_type

log = logging.getLogger("lrpc.serve")

PYTRITON_VERSION = "0.7.0"
_ERROR_KEY = "__lrpc_request_error__"


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_name: str = "lrpc"
    max_batch_size: int = 64
    queue_delay_us: int = 2000
    providers: str | None = None
    threads: int | None = None
    ready_file: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RequestError(Exception):
    """One request's fault (answered with HTTP 400 / INVALID_ARGUMENT), not the batch's."""


class Handler:
    """Runs the batches Triton forms: checks each request, fills missing targets, one
    session run, split back per request."""

    def __init__(self, analyzer):
        self.analyzer = analyzer
        session = analyzer.session
        self.inputs = [i for i in session.get_inputs() if i.name not in (TARGET_NAME, REGION_NAME)]
        self.outputs = session.get_outputs()
        self.dtypes = [np.dtype(_numpy_type(o.type)) for o in self.outputs]
        # dense outputs: the whole output counts (no region over the wire yet)
        region = next((i for i in session.get_inputs() if i.name == REGION_NAME), None)
        self.region = None if region is None else np.ones([1] * len(region.shape), dtype=np.float32)

    def tensors(self):
        """PyTriton's input and output declarations: per-sample shapes, -1 where dynamic."""
        from pytriton.model_config import Tensor

        def per_sample(shape):
            return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape[1:]) or (1,)

        inputs = [Tensor(name=i.name, dtype=_numpy_type(i.type), shape=per_sample(i.shape)) for i in self.inputs]
        inputs.append(Tensor(name=TARGET_NAME, dtype=np.int64, shape=(1,), optional=True))
        outputs = [Tensor(name=o.name, dtype=dtype.type, shape=per_sample(o.shape))
                   for o, dtype in zip(self.outputs, self.dtypes)]
        return inputs, outputs

    def _check(self, request) -> dict:
        data = request.data
        missing = [i.name for i in self.inputs if i.name not in data]
        if missing:
            raise RequestError(f"missing input(s) {', '.join(missing)}")
        feeds = {i.name: np.asarray(data[i.name]) for i in self.inputs}
        rows = feeds[self.inputs[0].name].shape[0]
        if TARGET_NAME in data:
            target = np.asarray(data[TARGET_NAME]).reshape(-1).astype(np.int64)
            if target.size != rows:
                raise RequestError(f"{TARGET_NAME} has {target.size} row(s) for {rows} sample(s)")
            classes = self.analyzer._classes({k: v[:1] for k, v in feeds.items()})
            bad = target[(target < -1) | (target >= classes)]
            if bad.size:
                raise RequestError(f"{TARGET_NAME} {int(bad[0])} is out of range: -1 (the arg-max) "
                                   f"or 0..{classes - 1}")
        else:
            target = np.full(rows, -1, dtype=np.int64)
        feeds[TARGET_NAME] = target
        return feeds

    def _run(self, parts: list[dict]) -> list[dict]:
        """One session run over the concatenated requests."""
        feeds = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        rows = [len(p[TARGET_NAME]) for p in parts]
        if self.region is not None:
            feeds[REGION_NAME] = self.region
        # the declared numpy type exactly: onnxruntime may hand int64 back as numpy's
        # longlong, equal in size but not the type PyTriton's output check compares against
        # and one value per row ([N]: lrp_class, lrp_logit) as [N, 1]: Triton needs a dimension
        outputs = [value.view(dtype).reshape(len(value), -1) if value.ndim == 1 else value.view(dtype)
                   for value, dtype in zip(self.analyzer._run(feeds, sum(rows)), self.dtypes)]
        answers, start = [], 0
        for n in rows:
            answers.append({o.name: value[start:start + n] for o, value in zip(self.outputs, outputs)})
            start += n
        return answers

    def __call__(self, requests) -> list[dict]:
        checked: list = []
        for request in requests:
            try:
                checked.append(self._check(request))
            except RequestError as exc:
                checked.append(exc)
        good = [c for c in checked if isinstance(c, dict)]
        try:
            answers = iter(self._run(good)) if good else iter(())
            return [_request_error(str(c)) if isinstance(c, RequestError) else next(answers) for c in checked]
        except Exception:
            # the batch failed as a whole: find the culprit(s) by running each request alone
            results = []
            for c in checked:
                if isinstance(c, RequestError):
                    results.append(_request_error(str(c)))
                    continue
                try:
                    results.append(self._run([c])[0])
                except Exception as exc:  # noqa: BLE001 - reported to that request's client
                    results.append(_request_error(_first_line(exc)))
            return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _request_error(message: str) -> dict:
    return {_ERROR_KEY: np.array([b"INVALID_ARG", message.encode("utf-8")], dtype=object)}


_ANCHOR = "def _wrap_response(response: Response, requested_outputs_names, model_outputs_dict):\n"
_INJECTED = _ANCHOR + f'''    if response.data is not None and {_ERROR_KEY!r} in response.data:  # lrpc: one request's error
        _values = [bytes(v) for v in response.data[{_ERROR_KEY!r}].ravel().tolist()]
        _code = getattr(pb_utils.TritonError, _values[0].decode("ascii"), pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=[],
                                          error=pb_utils.TritonError(_values[1].decode("utf-8", "replace"), _code))
'''


def _patched(source: bytes) -> bytes:
    text = source.decode("utf-8")
    if _ERROR_KEY in text:
        return source
    if text.count(_ANCHOR) != 1:
        raise LrpcError(f"this PyTriton is not the release lrpc serve knows ({PYTRITON_VERSION}); install lrpc's "
                        "serve extra: pip install 'lrpc[cpu,serve]'")
    return text.replace(_ANCHOR, _INJECTED).encode("utf-8")


def _install_request_errors() -> None:
    """Per-request errors: the proxy ``model.py`` PyTriton sends to Triton answers a response
    that carries :data:`_ERROR_KEY` with ``InferenceResponse(error=...)``; its output
    validator lets that key through. Nothing in site-packages is changed."""
    from pytriton.models import model as model_module
    from pytriton.proxy import validators

    Model = model_module.Model
    if getattr(Model, "_lrpc_request_errors", False):
        return
    _patched((pathlib.Path(model_module.__file__).parent.parent / "proxy" / "model.py").read_bytes())
    proxy_files, generate = Model.get_proxy_model_files, Model.generate_model

    def get_proxy_model_files(self):
        files = proxy_files(self)
        key = f"file:{self.model_version}/model.py"
        files[key] = _patched(files[key])
        return files

    def generate_model(self, model_repository):
        generate(self, model_repository)
        path = pathlib.Path(model_repository) / self.model_name / str(self.model_version) / "model.py"
        path.write_bytes(_patched(path.read_bytes()))

    check = validators._validate_output_dtype_and_shape

    def validate(model_config, model_outputs, name, value):
        if name != _ERROR_KEY:
            check(model_config, model_outputs, name, value)

    Model.get_proxy_model_files, Model.generate_model = get_proxy_model_files, generate_model
    validators._validate_output_dtype_and_shape = validate
    Model._lrpc_request_errors = True


def _libpython_first() -> None:
    """Triton's Python backend stub links ``libpython3.X.so``; without help the loader may
    pick the system's (another patch release: the stub then fails to load the model).
    Triton inherits this process's environment, so this interpreter's own LIBDIR goes first."""
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not (libdir and library and (pathlib.Path(libdir) / library).exists()):
        return  # a static interpreter: nothing to point at
    rest = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *rest])


def serve(model_path, options: ServeOptions) -> int:
    """Serve a compiled file until SIGINT/SIGTERM; returns the exit code (0 on a signal)."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise LrpcError("lrpc serve needs PyTriton: pip install 'lrpc[cpu,serve]' (it pins numpy<2; give it its "
                        "own environment)") from None
    from .runtime import LRP
    from .runtime.analyzer import servable

    handler = Handler(LRP(servable(model_path), providers=options.providers, threads=options.threads))
    inputs, outputs = handler.tensors()
    ports = {key: getattr(options, f"{key}_port") or free_port(options.host) for key in ("http", "grpc", "metrics")}
    _libpython_first()
    _install_request_errors()
    config = TritonConfig(http_address=options.host, http_port=ports["http"], grpc_address=options.host,
                          grpc_port=ports["grpc"], metrics_address=options.host, metrics_port=ports["metrics"],
                          exit_timeout_secs=30, log_verbose=0)
    stopping: list[int] = []

    def stop(signum, _frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    # explicit handlers: a process started in the background may inherit SIGINT ignored,
    # and Python's default SIGTERM would leave Triton's workspace behind
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    triton = Triton(config=config)
    try:
        triton.bind(model_name=options.model_name, infer_func=handler, inputs=inputs, outputs=outputs,
                    config=ModelConfig(max_batch_size=options.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us)),
                    strict=True)
        triton.run()
        print(f"lrpc serve: {options.model_name} ready on {options.host} (HTTP {ports['http']}, gRPC "
              f"{ports['grpc']}, metrics {ports['metrics']}); Ctrl-C stops", flush=True)
        if options.ready_file:
            from .files import atomic_path
            import json

            with atomic_path(options.ready_file) as tmp:
                pathlib.Path(tmp).write_text(json.dumps({**ports, "pid": os.getpid(), "model": options.model_name}))
        # not triton.serve(): it would start a server that died after run() again
        while triton.is_alive():
            time.sleep(0.5)
        if not stopping:
            raise LrpcError("the inference server stopped on its own; see its log above")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        triton.stop()
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
