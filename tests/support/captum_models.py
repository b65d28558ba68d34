"""Models and helpers for the Captum parity tests (``tests/test_methods_captum.py``).

- :func:`smooth_mlp`: an MLP with GELU, Tanh, Sigmoid and SiLU activations (``[N, 12] -> [N, 5]``);
- :func:`torch_encoder`: ``torch.nn.TransformerEncoderLayer`` (GELU, post-norm, batch first)
  with a mean-pool + Linear head (``[N, T, 16] -> [N, 4]``);
- :func:`written_encoder`: the same kind of block written out (a position embedding added,
  pre-norm, softmax attention, tanh-GELU MLP, final LayerNorm), batch the leading axis throughout;
- :class:`NormFirst`: ``LayerNorm`` straight on the input, then Linear (``[N, 4] -> [N, 3]``);
- :func:`export_bytes`: the ONNX export (``support.export.export_onnx``) as bytes, with
  ``torch.backends.mha`` fast path off (the legacy exporter would otherwise trace
  ``aten::_transformer_encoder_layer_fwd``, which has no ONNX form);
- :class:`AtEmbedding`: a Hugging Face model as a function of its word-embedding *output*
  (a forward hook puts the given tensor there), ids and mask unchanged, for Captum;
- :func:`matching_tensor`: the ONNX tensor whose value equals a torch module's output.

Every parameter is drawn at random (``support.random_weights.randomize`` / the zoo's He init),
so LayerNorm scales and biases are not the trivial 1 / 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from . import export, transformer_zoo as tz, zoo
from .random_weights import randomize

MLP_FEATURES = 12
SEQUENCE = 5
WIDTH = 16


def smooth_mlp(seed: int = 0) -> nn.Module:
    """``[N, 12]``: Linear-GELU-Linear-Tanh-Linear-Sigmoid-Linear-SiLU-Linear, 5 classes."""
    return zoo._build(lambda: nn.Sequential(OrderedDict([
        ('fc1', nn.Linear(MLP_FEATURES, 24)),
        ('gelu', nn.GELU()),
        ('fc2', nn.Linear(24, 24)),
        ('tanh', nn.Tanh()),
        ('fc3', nn.Linear(24, 24)),
        ('sigmoid', nn.Sigmoid()),
        ('fc4', nn.Linear(24, 16)),
        ('silu', nn.SiLU()),
        ('fc5', nn.Linear(16, 5)),
    ])), seed)


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (2 heads, GELU, post-norm) + mean over T + Linear."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0, activation='gelu', batch_first=True)
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class WrittenEncoder(nn.Module):
    """A learned position embedding added to the input, then a pre-norm block written out:
    ``x + Wo·softmax(QKᵀ/√d)V`` on ``LN(x)``, then
    ``x + W2·gelu_tanh(W1·LN(x))``, a final LayerNorm, mean over T, Linear."""

    def __init__(self, heads: int = 2, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.heads = heads
        self.position = nn.Parameter(torch.zeros(SEQUENCE, WIDTH))
        self.norm1 = nn.LayerNorm(WIDTH)
        self.query = nn.Linear(WIDTH, WIDTH)
        self.key = nn.Linear(WIDTH, WIDTH)
        self.value = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, hidden)
        self.act = nn.GELU(approximate='tanh')
        self.fc2 = nn.Linear(hidden, WIDTH)
        self.norm3 = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, classes)

    def _split(self, t):  # [N, T, D] -> [N, H, T, D/H]
        return t.unflatten(-1, (self.heads, WIDTH // self.heads)).transpose(1, 2)

    def forward(self, x):
        x = x + self.position
        h = self.norm1(x)
        q, k, v = self._split(self.query(h)), self._split(self.key(h)), self._split(self.value(h))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(WIDTH // self.heads), dim=-1)
        x = x + self.out((weights @ v).transpose(1, 2).flatten(2))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(self.norm3(x).mean(1))


class NormFirst(nn.Module):
    """``Linear(LayerNorm(x))``: the explained input goes straight into a LayerNormalization."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.norm(x))


def norm_first(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        model = NormFirst()
    return randomize(model, seed).float()


def torch_encoder(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        model = TorchEncoder()
    return randomize(model, seed).float()


def written_encoder(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        model = WrittenEncoder()
    return randomize(model, seed).float()


@contextlib.contextmanager
def no_mha_fastpath():
    """``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` without the fused
    inference kernel (taken under ``torch.no_grad()`` in eval mode)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def export_bytes(model: nn.Module, x: np.ndarray, exporter: str) -> bytes:
    """``support.export.export_onnx`` (input ``input``, output ``logits``, dynamic batch) as bytes.
    ``exporter``: ``legacy``, ``legacy-nofold`` (BatchNormalization kept) or ``dynamo``.

    Cached on disk next to ``transformer_zoo``'s exports (``$LRPC_TEST_CACHE``), keyed by the
    model's class, parameters and buffers, the example's shape, the exporter, these support
    files and the torch version: test workers share one export, and reruns reuse it."""
    from filelock import FileLock

    digest = hashlib.sha256()
    here = Path(__file__).parent
    for source in ('captum_models.py', 'export.py'):
        digest.update((here / source).read_bytes())
    digest.update(repr((type(model).__qualname__, x.shape[1:], exporter, torch.__version__)).encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    path = tz._cache_dir() / f'captum-{type(model).__name__}-{exporter}-{digest.hexdigest()[:20]}.onnx'
    with FileLock(str(path) + '.lock'):
        if not path.exists():
            with tempfile.TemporaryDirectory() as directory, no_mha_fastpath():
                written = export.export_onnx(model, x, os.path.join(directory, 'model.onnx'),
                                             dynamo=exporter == 'dynamo',
                                             do_constant_folding=exporter != 'legacy-nofold')
                tmp = path.with_suffix('.tmp')
                tmp.write_bytes(Path(written).read_bytes())
                os.replace(tmp, path)
    return path.read_bytes()


class AtEmbedding(nn.Module):
    """``(embeddings, ids, mask) -> logits``: the Hugging Face model run on ``ids`` and
    ``mask`` with its word-embedding lookup's output replaced by ``embeddings`` (a forward
    hook), so position / token-type embeddings, LayerNorm and the mask are the model's own."""

    def __init__(self, model: nn.Module, position: int | None = None):
        super().__init__()
        self.model, self.position = model, position  # position: a causal LM's explained one

    def forward(self, embeddings, ids, mask):
        layer = self.model.get_input_embeddings()
        handle = layer.register_forward_hook(lambda module, args, output: embeddings)
        try:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
        return logits if self.position is None else logits[:, self.position]


def module_output(model: nn.Module, module: nn.Module, x: np.ndarray) -> np.ndarray:
    """The output of ``module`` (a submodule of ``model``) on ``x``."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, output: seen.append(output.detach().numpy()))
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        handle.remove()
    return seen[0]


def matching_tensor(data: bytes, feeds: dict, value: np.ndarray) -> tuple[str, str]:
    """``(tensor name, producing node name)`` of the one intermediate tensor of the ONNX
    model ``data`` whose value on ``feeds`` equals ``value`` (same shape, within 1e-4 of
    its largest entry): the ONNX counterpart of a torch module's output."""
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(data))
    typed = {vi.name: vi for vi in model.graph.value_info}
    producer = {out: node.name for node in model.graph.node for out in node.output}
    candidates = [vi for name, vi in typed.items()
                  if name in producer and len(vi.type.tensor_type.shape.dim) == value.ndim
                  and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    model.graph.output.extend(candidates)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])
    names = [vi.name for vi in candidates]
    values = session.run(names, feeds)
    scale = float(np.abs(value).max())
    hits = [n for n, v in zip(names, values) if v.shape == value.shape and np.abs(v - value).max() <= 1e-4 * scale]
    if len(hits) != 1:
        raise LookupError(f'{len(hits)} tensors match the module output ({hits})')
    return hits[0], producer[hits[0]]
