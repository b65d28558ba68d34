"""Tiny Hugging Face transformers with every parameter randomized, and their ONNX exports.

Models are built from configs (nothing is downloaded): BERT for sequence classification,
ViT for image classification, GPT-2 with its LM head and a LLaMA-style causal LM (RMSNorm,
SwiGLU, rotary embeddings, grouped key/value heads). Hugging Face initializes biases to 0
and LayerNorm to γ = 1, β = 0, which hides mistakes: :func:`build` randomizes every
parameter.

Exports (:func:`export_bytes`) are cached on disk, keyed by everything that decides them
(this file, torch and transformers versions, the options), so a test run builds each
once whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .export import _quiet
from .random_weights import randomize

NAMES = ("bert", "vit", "gpt2", "llama")
ATTENTIONS = ("eager", "sdpa")
SEQUENCE = 7
VOCAB = 50
HIDDEN = 32

# exporter -> default opset: the legacy exporter writes LayerNormalization from 17 on
# (decomposed below), dynamo exports need 18
OPSETS = {"legacy": 17, "dynamo": 18}


def build(name: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    """The model in eval mode, float32, every parameter drawn from N(0, 0.3²) (LayerNorm
    and RMSNorm scales from 1 + N(0, 0.3²), so activations keep their size)."""
    from transformers import (AlbertConfig, AlbertForSequenceClassification, BertConfig,
                              BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification,
                              RobertaConfig, RobertaForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              ViTConfig, ViTForImageClassification)

    torch.manual_seed(seed)
    common = dict(attn_implementation=attn)
    if name == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, num_labels=3, **common))
    elif name == "albert":  # not in NAMES: shared layers, a factorized embedding, the tanh GELU after a bias
        model = AlbertForSequenceClassification(AlbertConfig(
            vocab_size=VOCAB, embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=32, num_labels=3, hidden_act="gelu_new", **common))
    elif name == "distilbert":  # not in NAMES: no token types, its own attention module
        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32,
            num_labels=3, **common))
    elif name == "roberta":  # not in NAMES: positions offset past the padding index
        model = RobertaForSequenceClassification(RobertaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, num_labels=3, **common))
    elif name == "vit":
        model = ViTForImageClassification(ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=5, **common))
    elif name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32,
                                           **common))
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=32, **common))
    else:
        raise KeyError(name)
    return randomize(model, seed)


def is_text(name: str) -> bool:
    return name != "vit"


def is_causal_lm(name: str) -> bool:
    return name in ("gpt2", "llama")


@dataclass
class Example:
    """Inputs of one batch: ``ids`` + ``mask`` (text) or ``pixels`` (ViT)."""

    ids: np.ndarray | None = None
    mask: np.ndarray | None = None
    pixels: np.ndarray | None = None

    def feeds(self, embeds: np.ndarray | None = None) -> dict:
        if self.pixels is not None:
            return {"input": self.pixels}
        first = {"input": self.ids} if embeds is None else {"input": embeds}
        return {**first, "mask": self.mask}


def example(name: str, n: int = 3, seed: int = 1) -> Example:
    """A batch; BERT's last sample has its last two positions padded (masked attention)."""
    rng = np.random.default_rng(seed)
    if not is_text(name):
        return Example(pixels=rng.standard_normal((n, 3, 16, 16)).astype(np.float32))
    ids = rng.integers(0, VOCAB, (n, SEQUENCE)).astype(np.int64)
    mask = np.ones_like(ids)
    if name == "bert" and n > 1:
        mask[-1, -2:] = 0
    return Example(ids=ids, mask=mask)


def embed(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """The word-embedding lookup (where relevance of token inputs is reported)."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.from_numpy(ids)).numpy()


def logits_fn(name: str, mask: np.ndarray | None = None):
    """``forward(model, x) -> logits`` with ``x`` the explained float tensor: pixels, or the
    word embeddings of the ids (the model adds position / token-type embeddings itself)."""
    if not is_text(name):
        return lambda model, x: model(pixel_values=x).logits

    def forward(model, x):
        kwargs = {"use_cache": False} if is_causal_lm(name) else {}
        return model(inputs_embeds=x, attention_mask=torch.from_numpy(mask), **kwargs).logits

    return forward


class _Exported(torch.nn.Module):
    """The model as exported: ``(input, mask) -> logits`` (ids or embeddings) or ``(input)``."""

    def __init__(self, name: str, model: torch.nn.Module, embeds: bool):
        super().__init__()
        self.name, self.model, self.embeds = name, model, embeds

    def forward(self, x, mask=None):
        if not is_text(self.name):
            return self.model(pixel_values=x).logits
        kwargs = {"use_cache": False} if is_causal_lm(self.name) else {}
        first = {"inputs_embeds": x} if self.embeds else {"input_ids": x}
        return self.model(**first, attention_mask=mask, **kwargs).logits


def _cache_dir() -> Path:
    root = Path(os.environ.get("LRPC_TEST_CACHE", Path(tempfile.gettempdir()) / "lrpc-test-exports"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _key(*parts) -> str:
    import transformers

    source = Path(__file__).read_bytes() + (Path(__file__).parent / "random_weights.py").read_bytes()
    digest = hashlib.sha256(source + repr((parts, torch.__version__, transformers.__version__)).encode())
    return digest.hexdigest()[:20]


def export_bytes(name: str, attn: str = "eager", exporter: str = "legacy", opset: int | None = None,
                 embeds: bool = False, seed: int = 0, half: bool = False) -> bytes:
    """The ONNX export (cached on disk): inputs ``input`` (ids, embeddings or pixels) and,
    for text, ``mask``; output ``logits``; batch and sequence axes dynamic. ``half``: the
    model in float16 (``model.half()``: float16 weights, inputs and outputs, and the float32
    islands the model's own code keeps, its softmax upcast)."""
    from filelock import FileLock

    opset = opset or OPSETS[exporter]
    key = _key(name, attn, exporter, opset, embeds, seed, half)
    path = _cache_dir() / f"{name}-{attn}-{exporter}-{opset}-{int(embeds)}-{seed}-{int(half)}-{key}.onnx"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            data = _export(name, attn, exporter, opset, embeds, seed, half)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    return path.read_bytes()


def _export(name, attn, exporter, opset, embeds, seed, half=False) -> bytes:
    model = build(name, attn, seed)
    wrapper = _Exported(name, model.half() if half else model, embeds).eval()
    ex = example(name, n=2)
    floats = (lambda t: t.half()) if half else (lambda t: t)  # noqa: E731
    if ex.pixels is not None:
        args, names = (floats(torch.from_numpy(ex.pixels)),), ["input"]
    else:
        first = floats(torch.from_numpy(embed(model, ex.ids))) if embeds else torch.from_numpy(ex.ids)
        args, names = (first, torch.from_numpy(ex.mask)), ["input", "mask"]
    text = is_text(name)
    with tempfile.TemporaryDirectory() as directory, _quiet(), torch.no_grad():
        path = os.path.join(directory, "model.onnx")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=64)
            seq = torch.export.Dim("sequence", min=2, max=32)
            dims = ({0: batch, 1: seq}, {0: batch, 1: seq}) if text else ({0: batch},)
            torch.onnx.export(wrapper, args, path, dynamo=True, input_names=names, output_names=["logits"],
                              opset_version=opset, dynamic_shapes=dims, external_data=False, report=False,
                              verbose=False)
        else:
            axes = {n: {0: "batch", 1: "sequence"} if text else {0: "batch"} for n in names}
            axes["logits"] = {0: "batch", 1: "sequence"} if is_causal_lm(name) else {0: "batch"}
            torch.onnx.export(wrapper, args, path, dynamo=False, input_names=names, output_names=["logits"],
                              opset_version=opset, dynamic_axes=axes)
        with open(path, "rb") as handle:
            return handle.read()
