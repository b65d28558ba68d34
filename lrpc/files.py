"""Reading and writing files so that a failure or an interrupt never leaves half a result.

- :func:`load_model`: any ONNX file (external data included, beyond 2 GiB) or bytes or a
  ``ModelProto``, validated, with one clear error for every way a file can be wrong.
- :func:`atomic_path`: a temp file renamed over the target on success.
- :func:`save_model`: a model, with its weights in a side file when asked or when near the
  2 GiB protobuf limit; the side file's name carries a hash of its content, so a reader
  never pairs one run's ``.onnx`` with another run's data.
- :class:`OutputFolder`: a folder of results written into a temporary sibling and moved
  into place as a whole.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

from .errors import LrpcError, ModelLoadError

# protobuf cannot serialize messages of 2 GiB or more; weights beyond this go to a side file
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# weights above this size are left out where only shapes matter (checker, shape inference)
LARGE_INITIALIZER_BYTES = 1 << 20


def load_model(source) -> onnx.ModelProto:
    """Read and validate an ONNX model from a path, bytes or a ``ModelProto``."""
    if isinstance(source, onnx.ModelProto):
        model, label, path = source, "model", None
    elif isinstance(source, (bytes, bytearray)):
        label, path = "model bytes", None
        try:
            model = onnx.load_from_string(bytes(source))
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{label}: not a readable ONNX model ({_first_line(exc)})") from None
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        model = _read(path)
    else:
        raise ModelLoadError(f"the model must be a path, bytes or an onnx.ModelProto, not {type(source).__name__}")
    if not model.graph.node:
        raise ModelLoadError(f"{label}: not an ONNX model (no graph nodes; empty, truncated or another format)")
    _check_opset(model, label)
    sorted_model = _in_topological_order(model)
    check(sorted_model, label, path if sorted_model is model else None)
    return sorted_model


def check(model: onnx.ModelProto, label: str, path: Path | None = None, full: bool = False) -> None:
    """The ONNX checker, on the file when there is one (onnx reads files of any size
    itself), else on the message (without its large weights beyond the protobuf limit).
    Ops onnxruntime registers in the default domain (``SimplifiedLayerNormalization``,
    ``LayerNormalization`` before opset 17), which its optimizer and onnxruntime-genai's
    builder write, are checked against onnxruntime's schemas instead of onnx's."""
    contrib = runtime_default_domain_ops(model)
    if contrib:
        model, path = _contrib_ops_set_aside(model, contrib), None
    try:
        if path is not None:
            onnx.checker.check_model(str(path), full_check=full)
        elif _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            with without_large_initializers(model):
                onnx.checker.check_model(model, full_check=full)
        else:
            onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelLoadError(f"{label}: invalid ONNX model ({_first_line(exc)})") from None


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) domain the model imports; 0 if none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def runtime_default_domain_ops(model: onnx.ModelProto) -> set[str]:
    """Op types of ``model``'s default-domain nodes that onnx does not define at the model's
    opset and onnxruntime does (its contrib ops registered in the default domain)."""
    opset = default_opset(model)
    types = {n.op_type for g in all_graphs(model.graph) for n in g.node if n.domain in ("", "ai.onnx")}
    unknown = {t for t in types if not _onnx_defines(t, opset)}
    return unknown & _runtime_default_domain_schemas(opset) if unknown else set()


def _onnx_defines(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


def _runtime_default_domain_schemas(opset: int) -> set[str]:
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:  # no onnxruntime: onnx's schemas are all there is
        return set()
    return {s.name for s in get_all_operator_schema() if s.domain == "" and s.since_version <= opset}


#: where :func:`check` puts onnxruntime's default-domain ops for onnx's checker, which
#: validates everything else and takes a domain it has no schemas for as opaque
RUNTIME_CHECK_DOMAIN = "ai.onnxruntime.default"


def _contrib_ops_set_aside(model: onnx.ModelProto, ops: set[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for graph in all_graphs(out.graph):
        for node in graph.node:
            if node.domain in ("", "ai.onnx") and node.op_type in ops:
                node.domain = RUNTIME_CHECK_DOMAIN
    out.opset_import.append(helper.make_opsetid(RUNTIME_CHECK_DOMAIN, 1))
    return out


def _in_topological_order(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its nodes in topological order: itself when they are, else a sorted
    copy. onnxruntime's quantizer and float16 converter write files that are not sorted,
    which onnxruntime runs and the ONNX checker refuses; the order is only an order. A cycle
    is left for the checker to report."""
    graph = model.graph
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if any(x not in known for x in node.input):
            break
        known.update(node.output)
    else:
        return model  # sorted (reads from outer scopes in subgraphs are the checker's business)
    try:
        ordered = toposorted(list(graph.node))
    except LrpcError:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return out


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_graphs(g)


def toposorted(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after its inputs' producers (onnxruntime's
    quantizer and float16 converter write files that are not sorted; subgraph nodes'
    outer reads count as inputs of the node that holds them)."""
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{produced[x] for x in node_reads(n) if x in produced and produced[x] != i} for i, n in enumerate(nodes)]
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for d in deps:
            users.setdefault(d, []).append(i)
    waiting = [len(d) for d in needs]
    ready = collections.deque(i for i, w in enumerate(waiting) if w == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise LrpcError("the graph has a cycle: it cannot be put in topological order")
    return [nodes[i] for i in order]


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors ``node`` reads, its subgraphs' reads from outer scopes included."""
    names = {x for x in node.input if x}
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for sub in all_graphs(g):
                for n in sub.node:
                    names.update(x for x in n.input if x)
    return names


def _read(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    try:
        if path.stat().st_size >= 2**31:
            raise ValueError("the file is larger than 2 GiB; keep the weights in an external data file")
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if any(t.data_location == TensorProto.EXTERNAL for t in _all_initializers(model)):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # onnx refuses data outside the folder, links, absolute paths
            raise ModelLoadError(f"{path}: its external data cannot be read ({_first_line(exc)}); the data "
                                 "file must be a plain file in the model's folder, named relatively") from None
    return model


def read_metadata(path) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file at ``path``, read without its graph: onnx can
    only parse the whole message (the file's weights twice in memory, then freed but not
    returned to the system), and a compiled file is handed to onnxruntime by path. Scans the
    top-level fields of the ``ModelProto`` in the protobuf wire format, seeking past the
    others; {} for anything it cannot read (the full load then says what is wrong)."""
    def varint(read) -> int:
        value = shift = 0
        while True:
            byte = read(1)
            if not byte:
                raise EOFError
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def fields(read, end: int, tell, skip):
        while tell() < end:
            key = varint(read)
            number, wire = key >> 3, key & 7
            if wire == 0:
                yield number, varint(read)
            elif wire == 2:
                size = varint(read)
                if tell() + size > end:
                    raise ValueError("field past the end")
                yield number, (tell(), size)
                skip(tell() + size)
            elif wire in (1, 5):
                skip(tell() + (8 if wire == 1 else 4))
            else:
                raise ValueError(f"wire type {wire}")

    metadata: dict[str, str] = {}
    try:
        with open(path, "rb") as handle:
            end = os.fstat(handle.fileno()).st_size
            for number, value in list(fields(handle.read, end, handle.tell, handle.seek)):
                if number != 14 or not isinstance(value, tuple):  # ModelProto.metadata_props = 14
                    continue
                handle.seek(value[0])
                entry = onnx.StringStringEntryProto.FromString(handle.read(value[1]))
                metadata[entry.key] = entry.value
    except (OSError, EOFError, ValueError, DecodeError):
        return {}
    return metadata


def _all_initializers(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def _check_opset(model: onnx.ModelProto, label: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version > newest:
            raise ModelLoadError(f"{label}: opset {entry.version} is newer than any this onnx knows "
                                 f"(up to {newest}); export with an older opset")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def without_large_initializers(model: onnx.ModelProto, limit: int = LARGE_INITIALIZER_BYTES):
    """Temporarily turn large initializers into typed graph inputs: the checker and shape
    inference need their shapes only, and a model of 2 GiB or more cannot be handed to them
    whole."""
    graph = model.graph
    kept, moved = [], []
    for tensor in graph.initializer:
        (moved if len(tensor.raw_data) > limit else kept).append(tensor)
    if not moved:
        yield model
        return
    listed = {i.name for i in graph.input}
    added = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved if t.name not in listed]
    saved = list(graph.initializer)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(added)
    try:
        yield model
    finally:
        del graph.input[len(graph.input) - len(added):]
        del graph.initializer[:]
        graph.initializer.extend(saved)


def save_with_placeholder_weights(model: onnx.ModelProto, folder, limit: int = LARGE_INITIALIZER_BYTES) -> Path:
    """``model`` written into ``folder`` with each initializer larger than ``limit`` read from
    a sparse file of zeros: for a runtime that must load the graph (kernel lookup, types,
    shapes) but never computes with it. Nothing of the weights is copied or written, so a
    model of any size is checked in the time its graph takes (a compiled GPT-2 6 x 768: 0.5
    instead of 3 s serialized and loaded whole)."""
    folder = Path(folder)
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, name, getattr(model, name))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.metadata_props.extend(model.metadata_props)
    source, graph = model.graph, light.graph
    graph.name = source.name
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, name).extend(getattr(source, name))
    data, offset = "placeholder_weights.bin", 0
    for tensor in source.initializer:
        # ByteSize, not len(raw_data): reading a bytes field copies it
        if tensor.ByteSize() <= limit or tensor.data_type == TensorProto.STRING:
            graph.initializer.append(tensor)
            continue
        length = int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        stand_in = graph.initializer.add()
        stand_in.name, stand_in.data_type = tensor.name, tensor.data_type
        stand_in.dims.extend(tensor.dims)
        stand_in.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data), ("offset", str(offset)), ("length", str(length))):
            entry = stand_in.external_data.add()
            entry.key, entry.value = key, value
        offset += -(-length // 4096) * 4096
    with open(folder / data, "wb") as handle:
        handle.truncate(offset)  # a hole: zeros that take no disk and no time
    path = folder / "model.onnx"
    path.write_bytes(light.SerializeToString())
    return path


# -- writing -------------------------------------------------------------------------------------


def _plain_permissions(path) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give them what a plain open()/mkdir() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


#: what this process has put in place, in order: a command interrupted after its result
#: was written says so instead of "nothing was written"
WRITTEN: list[Path] = []

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def committing(path):
    """Run the renames that put ``path`` in place with SIGINT/SIGTERM held back.

    A stop request that arrives meanwhile is raised again after the block, so a result is
    either wholly in place (and listed in :data:`WRITTEN`) or not touched at all, never
    half moved. The handlers are swapped, not the signal mask: a mask holds only the
    calling thread, and the kernel hands a process signal to any thread that does not
    block it (onnxruntime's pool). Only the main thread can set handlers; elsewhere
    nothing is held.
    """
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in _STOP_SIGNALS} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        yield
        WRITTEN.append(Path(path))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside ``path``; on success it is renamed over ``path``.

    A failure (or an interrupt) leaves no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _plain_permissions(tmp)
        with committing(path):
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _weight_bytes(model: onnx.ModelProto) -> int:
    """From shapes and types: reading a tensor's data would copy it."""
    total = 0
    for t in model.graph.initializer:
        try:
            size = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            size = 4
        total += int(np.prod(t.dims, dtype=np.float64)) * size
    return total


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on the folder itself (no lock file left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _data_token(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    for tensor in model.graph.initializer:
        digest.update(tensor.name.encode())
        digest.update(tensor.raw_data or tensor.SerializeToString())
    return digest.hexdigest()[:16]


def _referenced_data(path: Path) -> set[str]:
    """Names of the external data files the model at ``path`` points to (none if unreadable)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    names = set()
    for tensor in _all_initializers(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return names


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None) -> Path:
    """Write a model atomically; with ``external_data`` (automatic for models near the
    2 GiB protobuf limit) the weights go to ``<name>.<content hash>.data`` beside it.

    Both files are written under temporary names first. The data file is named after its
    content and moved into place before the model file, under a lock on the folder, so a
    reader never sees one run's model with another run's data; data files no model there
    refers to any more are removed (the previous one is kept for readers still on it).
    """
    path = Path(path)
    if external_data is None:
        external_data = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    if not external_data:
        with atomic_path(path) as tmp:
            onnx.save(model, tmp)
        return path
    data_name = f"{path.name}.{_data_token(model)}.data"
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        staged = Path(staging) / path.name
        # small tensors (shapes, scalars) stay inline: runtimes read those while building
        # the graph, before any external data is loaded
        onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        staged_data = Path(staging) / data_name
        for f in (staged, staged_data):
            if f.exists():
                _plain_permissions(f)
        with _folder_lock(path.parent), committing(path):
            previous = _referenced_data(path) if path.exists() else set()
            if staged_data.exists():
                os.replace(staged_data, path.parent / data_name)
            os.replace(staged, path)
            for stale in path.parent.glob(f"{path.name}.*.data"):
                if stale.name != data_name and stale.name not in previous:
                    stale.unlink(missing_ok=True)
    return path


class OutputFolder:
    """Results written into a temporary sibling folder and moved into place as a whole.

    ``with OutputFolder(out) as tmp:`` write into ``tmp``; on success ``out`` is replaced
    by it (an earlier result folder moves aside first and is then removed), on failure or
    interrupt the temporary folder is removed and ``out`` stays as it was. A folder that
    exists, is not empty and holds no ``marker`` file is refused: it is not an earlier
    result, and lrpc does not replace other people's files.
    """

    def __init__(self, path, marker: str = "summary.json"):
        self.path = Path(path)
        self.marker = marker
        self.tmp: Path | None = None

    def check(self) -> None:
        """Refuse unusable targets before any work is done."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise LrpcError(f"{path}: exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / self.marker).exists():
            raise LrpcError(f"{path}: the folder holds other files; give a new or empty folder, or an earlier "
                            "output folder of this command")
        parent = path.resolve().parent
        if not parent.exists():
            raise LrpcError(f"{path}: the folder {parent} does not exist")
        if not parent.is_dir():
            raise LrpcError(f"{path}: {parent} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LrpcError(f"{path}: cannot write in {parent}")

    def __enter__(self) -> Path:
        self.check()
        parent = self.path.resolve().parent
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent))
        return self.tmp

    def __exit__(self, kind, value, traceback) -> bool:
        tmp, self.tmp = self.tmp, None
        if kind is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        _plain_permissions(tmp)
        with committing(self.path):
            aside = None
            if self.path.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=tmp.parent))
                os.replace(self.path, aside / "previous")
            os.replace(tmp, self.path)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        return False
