"""Transformers in every form people deploy them, made by the tools that make them, from
one tiny random-weight Hugging Face model each (BERT, DistilBERT, RoBERTa, DeBERTa-v2,
ALBERT, ViT, Swin, GPT-2, LLaMA, Qwen2, Mistral with a sliding window, Phi-3):

- ``optimum``: optimum's ``main_export`` (decoders as ``text-generation-with-past``, with
  ``past_key_values.*`` inputs and ``present.*`` outputs);
- ``genai``: onnxruntime-genai's model builder, fp32 (``GroupQueryAttention`` with rotary
  embeddings and a KV cache inside, ``SkipSimplifiedLayerNormalization``, packed QKV);
- ``optimized-1`` / ``optimized-2``: onnxruntime's transformer optimizer on the optimum
  export (its fusions; level 2 adds onnxruntime's own graph fusions, saved);
- ``dynamo-23``: ``torch.onnx.export(dynamo=True, opset_version=23)`` with SDPA attention
  (opset 23's ``Attention``, ``RotaryEmbedding``, ``RMSNormalization``; DeBERTa-v2 has no
  SDPA attention and is exported eager).

optimum and the builder live in their own environment (``make test`` builds ``.venv-deploy``
and names its interpreter in ``LRPC_DEPLOY_PYTHON``; see ``support/deploy_tools.py``), which
writes each model's Hugging Face folder and its forms once per cache key; the optimizer's and
torch's forms are made here, from the same folder. The reference is the plain torch.onnx
export (opset 17) of the folder, made here.

Same weights, same relevance: each form's relevance (at the embedding output for tokens)
equals the reference's within 1e-4 relative at ε = 1e-9 under AttnLRP and CP-LRP, with an
empty past; with a given past (treated as constants) the two decoder forms agree with each
other. The compiled file's outputs are the form's own."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import lrpc
from support import deploy_tools as tools
from support.export import _quiet
from support.runtimes import onnxruntime_run as _run, relative_error as _relative

EPSILON = 1e-9
TOLERANCE = 1e-4
BATCH, SEQUENCE = 2, 7
NAMES = tools.ENCODERS + tools.DECODERS
#: forms made in this environment from the deploy tools' folders
MADE_HERE = ("optimized-1", "optimized-2", "dynamo-23")
CASES = [(name, form) for form in ("optimum", *MADE_HERE) for name in NAMES] + [(name, "genai") for name in tools.GENAI]
#: the transformer optimizer's model type per model (the LLaMA family's fusions are the BERT
#: optimizer's norms)
OPTIMIZER_TYPES = {"vit": "vit", "swin": "swin", "gpt2": "gpt2"}
#: the fused ops each form must hold, so that no test passes on a file the tool left alone
RMS_DECODERS = ("llama", "qwen2", "mistral", "phi3")


def _expected_ops(name: str, form: str) -> set[str]:
    if form == "genai":
        return {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}
    if form.startswith("optimized"):
        norms = {"SkipSimplifiedLayerNormalization"} if name in RMS_DECODERS else {"SkipLayerNormalization"}
        return norms | ({"QuickGelu"} if form == "optimized-2" and name in RMS_DECODERS else set())
    if form == "dynamo-23" and name != "deberta":
        return {"Attention"} | ({"RotaryEmbedding", "RMSNormalization"} if name in RMS_DECODERS else set())
    return set()


def _batch(name: str, form: str) -> int:
    """torch's opset-23 decoders run at batch 1: onnxruntime's RotaryEmbedding kernel wants
    the cos/sin caches torch exports (``[1, S, h/2]``) at the input's batch size."""
    return 1 if form == "dynamo-23" and name in RMS_DECODERS else BATCH


def _deploy_python() -> str:
    python = os.environ.get("LRPC_DEPLOY_PYTHON")
    assert python and Path(python).exists(), (
        "LRPC_DEPLOY_PYTHON must name the interpreter of the deploy-tools environment (make test builds .venv-deploy)")
    return python


@functools.lru_cache(maxsize=None)
def _forms() -> Path:
    """The folder the deploy tools wrote, keyed by their script and the environment's
    interpreter (cached on disk across runs and workers)."""
    from filelock import FileLock

    python = _deploy_python()
    script = Path(tools.__file__)
    sources = script.read_bytes() + (script.parent / "random_weights.py").read_bytes()
    key = hashlib.sha256(sources + os.path.realpath(python).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LRPC_TEST_CACHE", Path(tempfile.gettempdir()) / "lrpc-test-exports"))
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"deploy-forms-{key}"
    names = NAMES
    with FileLock(str(folder) + ".lock"):
        missing = [n for n in names if not (folder / n / "done.json").exists()]
        if missing:
            done = subprocess.run([python, str(script), str(folder), *missing], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
    return folder


def _form(name: str, form: str) -> Path:
    if form not in MADE_HERE:
        return _forms() / name / form / "model.onnx"
    from filelock import FileLock

    key = hashlib.sha256(Path(__file__).read_bytes() + repr((torch.__version__, _versions())).encode())
    path = _forms() / name / f"{form}-{key.hexdigest()[:16]}.onnx"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            data = _optimized(name, int(form[-1])) if form.startswith("optimized") else _dynamo(name)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    return path


def _versions() -> tuple:
    import onnxruntime
    import transformers

    return transformers.__version__, onnxruntime.__version__


def _optimized(name: str, level: int) -> bytes:
    """onnxruntime's transformer optimizer on the optimum export."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = (0, 0) if name == "swin" else (4, tools.HIDDEN)  # Swin's widths differ by stage: detected
    with _quiet():
        model = optimize_model(str(_form(name, "optimum")), model_type=OPTIMIZER_TYPES.get(name, "bert"),
                               num_heads=heads, hidden_size=hidden, opt_level=level, verbose=False)
    return model.model.SerializeToString()


def _dynamo(name: str) -> bytes:
    """torch's dynamo exporter at opset 23, batch and sequence dynamic."""
    model = _hf_model(name, "eager" if name == "deberta" else "sdpa")
    feeds = _feeds(name)
    names = ["pixel_values"] if name in tools.IMAGES else ["input_ids", "attention_mask"]
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    batch, sequence = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=2, max=32)
    dims = {"x": {0: batch}} if name in tools.IMAGES else {"x": {0: batch, 1: sequence}, "mask": {0: batch, 1: sequence}}
    with tempfile.TemporaryDirectory() as directory, _quiet(), torch.no_grad():
        path = os.path.join(directory, "model.onnx")
        torch.onnx.export(_Logits(name, model).eval(), args, path, dynamo=True, opset_version=23, input_names=names,
                          output_names=["logits"], dynamic_shapes=dims, external_data=False, report=False,
                          verbose=False)
        return Path(path).read_bytes()


def _hf_model(name: str, attention: str):
    import transformers as t

    auto = (t.AutoModelForImageClassification if name in tools.IMAGES else
            t.AutoModelForCausalLM if name in tools.DECODERS else t.AutoModelForSequenceClassification)
    return auto.from_pretrained(_forms() / name / "hf", attn_implementation=attention).eval()


class _Logits(torch.nn.Module):
    """The model's logits from ids and mask (or pixels), without a cache."""

    def __init__(self, name: str, model):
        super().__init__()
        self.name, self.model = name, model

    def forward(self, x, mask=None):
        if self.name in tools.IMAGES:
            return self.model(pixel_values=x).logits
        extra = {"use_cache": False} if self.name in tools.DECODERS else {}
        return self.model(input_ids=x, attention_mask=mask, **extra).logits


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> bytes:
    """The plain torch.onnx export (opset 17) of the tool's weights: ``input_ids`` and
    ``attention_mask`` (or ``pixel_values``) → ``logits``."""
    feeds = _feeds(name)
    names = ["pixel_values"] if name in tools.IMAGES else ["input_ids", "attention_mask"]
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    axes = {n: {0: "batch"} if name in tools.IMAGES else {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch", 1: "sequence"} if name in tools.DECODERS else {0: "batch"}  # a sequence's logits
    with tempfile.TemporaryDirectory() as directory, _quiet(), torch.no_grad():
        path = os.path.join(directory, "plain.onnx")
        torch.onnx.export(_Logits(name, _hf_model(name, "eager")).eval(), args, path, dynamo=False, opset_version=17,
                          input_names=names, output_names=["logits"], dynamic_axes=axes)
        return Path(path).read_bytes()


@functools.lru_cache(maxsize=None)
def _reference_relevance(name: str, preset: str, batch: int):
    relevance, outputs = _explain(_reference(name), name, _feeds(name, batch), preset)
    return relevance, outputs["logits"]


def _feeds(name: str, batch: int = BATCH) -> dict:
    """Ids (encoders: the last sample's last two positions padded) with their mask, or pixels;
    the first ``batch`` samples."""
    rng = np.random.default_rng(1)
    if name in tools.IMAGES:
        return {"pixel_values": rng.standard_normal((BATCH, 3, 16, 16)).astype(np.float32)[:batch]}
    ids = rng.integers(3, tools.VOCAB, (BATCH, SEQUENCE)).astype(np.int64)
    mask = np.ones_like(ids)
    if name in tools.ENCODERS:
        mask[-1, -2:] = 0
    return {"input_ids": ids[:batch], "attention_mask": mask[:batch]}


def _inputs_of(model: onnx.ModelProto, name: str, feeds: dict, past: dict | None = None) -> dict:
    """``feeds`` completed for a file's inputs: zero token types, positions 0…S−1 after the
    past, and the past (empty unless given: ``[B, heads, 0, head size]``)."""
    out = {}
    for vi in model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name in feeds:
            out[vi.name] = feeds[vi.name]
        elif vi.name == "token_type_ids":
            out[vi.name] = np.zeros_like(feeds["input_ids"])
        elif vi.name == "position_ids":
            ids = feeds["input_ids"]
            start = feeds["attention_mask"].shape[1] - ids.shape[1]
            out[vi.name] = np.tile(np.arange(start, start + ids.shape[1]), (ids.shape[0], 1))
        elif vi.name.startswith("past_key_values"):  # [B, key/value heads, P, head size]
            empty = np.zeros((len(feeds["input_ids"]), tools.KV_HEADS.get(name, 2), 0, tools.HIDDEN // 4), np.float32)
            out[vi.name] = (past or {}).get(vi.name, empty)
        elif vi.name in {i.name for i in model.graph.initializer}:
            continue
        else:
            raise KeyError(vi.name)
    return out


def _explain(model, name: str, feeds: dict, preset: str):
    compiled = lrpc.compile(model, getattr(lrpc, preset)(epsilon=EPSILON), normalize_output_relevance=False,
                            verbose=False)
    names = [o.name for o in compiled.graph.output]
    outputs = dict(zip(names, _run(compiled, _inputs_of(compiled, name, feeds))))
    return outputs.pop("relevance"), outputs


@pytest.mark.parametrize("preset", ["AttnLRP", "CPLRP"])
@pytest.mark.parametrize("name, form", CASES)
def test_deployed_form_has_the_plain_exports_relevance(name, form, preset):
    path = _form(name, form)
    model = onnx.load(path)
    assert _expected_ops(name, form) <= {n.op_type for n in model.graph.node}
    batch = _batch(name, form)
    feeds = _feeds(name, batch)
    relevance, outputs = _explain(str(path), name, feeds, preset)
    own = dict(zip([o.name for o in model.graph.output], _run(model, _inputs_of(model, name, feeds))))
    assert outputs.keys() == own.keys()
    for key, value in own.items():  # the file's own outputs, the KV cache's present included
        assert outputs[key].shape == value.shape and _relative(outputs[key], value) < 1e-5, key
    want, plain_logits = _reference_relevance(name, preset, batch)
    assert _relative(outputs["logits"], plain_logits) < 1e-5
    assert relevance.shape == want.shape and np.abs(want).max() > 0
    assert _relative(relevance, want) < TOLERANCE


@pytest.mark.parametrize("name, form", [("gpt2", "optimum"), ("qwen2", "optimum"), ("llama", "genai")])
def test_the_analyzer_feeds_a_decoder_an_empty_past_by_default(name, form):
    """``lrpc.LRP(...).analyze(ids)`` (and so ``lrpc explain``) on a file with a KV cache:
    the past left out is empty, the mask ones; the relevance of feeding both explicitly."""
    feeds = _feeds(name)
    analyzer = lrpc.LRP(str(_form(name, form)), lrpc.AttnLRP(epsilon=EPSILON), normalize_output_relevance=False,
                        verbose=False)
    assert any(i.name.startswith("past_key_values") for i in analyzer.other_inputs)
    explanation = analyzer.analyze(feeds["input_ids"])
    relevance, outputs = _explain(str(_form(name, form)), name, feeds, "AttnLRP")
    assert explanation.val.shape == relevance.shape == (BATCH, SEQUENCE, tools.HIDDEN)
    assert _relative(explanation.val, relevance) < 1e-5
    assert np.array_equal(explanation.output_selection, outputs["logits"][:, -1].argmax(-1))


PROMPT = 4  # the past's length in the given-past case


@pytest.mark.parametrize("name", tools.GENAI)
def test_a_given_past_is_held_constant_alike_in_both_decoder_forms(name):
    """The API explains the next tokens after a given KV cache (the prompt's ``present.*``,
    fed back as ``past_key_values.*``): the cache is a constant, relevance goes to the new
    tokens only. The genai builder's GroupQueryAttention and optimum's export of the model's
    own attention, each with its own cache, give the same relevance and the files' logits."""
    feeds = {k: v[:1] for k, v in _feeds(name).items()}  # the kernel takes a chunk after a past at batch 1
    prompt = {"input_ids": feeds["input_ids"][:, :PROMPT], "attention_mask": feeds["attention_mask"][:, :PROMPT]}
    step = {"input_ids": feeds["input_ids"][:, PROMPT:], "attention_mask": feeds["attention_mask"]}
    results = {}
    for form in ("optimum", "genai"):
        model = onnx.load(_form(name, form))
        first = dict(zip([o.name for o in model.graph.output], _run(model, _inputs_of(model, name, prompt))))
        past = {f"past_key_values{k[len('present'):]}": v for k, v in first.items() if k.startswith("present")}
        compiled = lrpc.compile(model, lrpc.AttnLRP(epsilon=EPSILON), normalize_output_relevance=False,
                                verbose=False)
        outputs = dict(zip([o.name for o in compiled.graph.output],
                           _run(compiled, _inputs_of(compiled, name, step, past))))
        own = _run(model, _inputs_of(model, name, step, past))[0]
        assert _relative(outputs["logits"], own) < 1e-5
        results[form] = outputs
    relevance = results["genai"]["relevance"]
    assert relevance.shape == (1, SEQUENCE - PROMPT, tools.HIDDEN) and np.abs(relevance).max() > 0
    assert _relative(results["genai"]["logits"], results["optimum"]["logits"]) < 1e-5
    assert _relative(relevance, results["optimum"]["relevance"]) < TOLERANCE
