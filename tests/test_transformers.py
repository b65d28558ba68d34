"""Transformers: AttnLRP and CP-LRP on ONNX exports of BERT, ViT, GPT-2 and a LLaMA-style LM.

Every model × exporter (legacy at opset 17, dynamo at 18) × attention implementation
(eager, sdpa) × preset compiles; the compiled file's outputs equal the original's and its
relevance equals an independent torch reference (``support.attnlrp_ref``: Gradient ×
Input with AttnLRP's / CP-LRP's modified backward passes, float64) at ε = 1e-9 without
output normalization. Token models are explained at their embedding output.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lrpc
from support import attnlrp_ref, transformer_zoo as tz
from support.runtimes import relative_error as _relative

EPSILON = 1e-9
TOLERANCE = 1e-4  # max|ΔR| / max|R|
PRESETS = {"AttnLRP": False, "CPLRP": True}  # preset -> holds gates constant (CP-LRP)


def _session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _explained_tensor(name: str, ex: tz.Example, model: torch.nn.Module) -> np.ndarray:
    return ex.pixels if ex.pixels is not None else tz.embed(model, ex.ids)


def _check_against_reference(name, attn, exporter, preset, opset=None, embeds=False, position=None, target=None):
    data = tz.export_bytes(name, attn, exporter, opset=opset, embeds=embeds)
    composite = getattr(lrpc, preset)(epsilon=EPSILON)
    compiled = lrpc.compile(onnx.load_from_string(data), composite, normalize_output_relevance=False,
                            verbose=False, position=position)
    assert all(n.domain in ("", "ai.onnx") for n in compiled.graph.node)
    torch_model = tz.build(name, attn)
    ex = tz.example(name, 3)
    x = _explained_tensor(name, ex, torch_model)
    feeds = ex.feeds(x if embeds else None)
    if target is not None:
        feeds["lrp_target"] = np.asarray(target, dtype=np.int64)
    logits, relevance = _session(compiled.SerializeToString()).run(["logits", "relevance"], feeds)
    original = _session(data).run(["logits"], {k: v for k, v in feeds.items() if k != "lrp_target"})[0]
    assert _relative(logits, original) < 1e-5
    assert relevance.shape == x.shape
    if tz.is_causal_lm(name):
        position = -1 if position is None else position
    expected = attnlrp_ref.relevance(torch_model, tz.logits_fn(name, ex.mask), x, target=target, position=position,
                                     cp=PRESETS[preset])
    error = _relative(relevance, expected)
    assert error < TOLERANCE, f"max|ΔR|/max|R| = {error:.2e}"
    return relevance, expected


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("attn", tz.ATTENTIONS)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", tz.NAMES)
def test_relevance_equals_the_reference(name, exporter, attn, preset):
    _check_against_reference(name, attn, exporter, preset)


@pytest.mark.parametrize("name, exporter, opset", [
    ("bert", "legacy", 14),   # LayerNorm written out as ReduceMean/Sub/Pow/.../Div
    ("vit", "dynamo", 20),    # GELU as one Gelu op
    ("llama", "dynamo", 20),
])
def test_other_opsets(name, exporter, opset):
    model = onnx.load_from_string(tz.export_bytes(name, "eager", exporter, opset=opset))
    ops = {n.op_type for n in model.graph.node}
    if opset == 14:
        assert "LayerNormalization" not in ops and "ReduceMean" in ops
    if name == "vit" and opset == 20:
        assert "Gelu" in ops
    for preset in PRESETS:
        _check_against_reference(name, "eager", exporter, preset, opset=opset)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bert_explained_from_inputs_embeds(exporter):
    """A float ``inputs_embeds`` input: relevance has the input's shape."""
    relevance, _ = _check_against_reference("bert", "eager", exporter, "AttnLRP", embeds=True)
    assert relevance.shape == (3, tz.SEQUENCE, tz.HIDDEN)


def test_token_relevance_is_reported_at_the_embedding():
    data = tz.export_bytes("bert", "sdpa", "dynamo")
    analyzer = lrpc.LRP(onnx.load_from_string(data), lrpc.AttnLRP(), verbose=False)
    meta = {p.key: p.value for p in analyzer.model.metadata_props}
    assert meta["lrpc.input"] == "input" and meta["lrpc.explained"] != "input"
    ex = tz.example("bert", 3)
    expl = analyzer.analyze(ex.ids, extra_inputs={"mask": ex.mask})
    assert expl.val.shape == (3, tz.SEQUENCE, tz.HIDDEN) and analyzer.explains_tokens
    # the padded positions of the last sample attend nowhere, yet nothing is NaN
    assert np.isfinite(expl.val).all()
    # a mask left out is taken as all ones, like the model's own default
    ones = analyzer.analyze(ex.ids[:2])
    np.testing.assert_allclose(ones.val, expl.val[:2], rtol=1e-5, atol=1e-7)


def test_language_model_position_and_target():
    """GPT-2 explained at position 3 for a chosen vocabulary entry, both compile-time and
    run-time choices against the reference."""
    _check_against_reference("gpt2", "eager", "legacy", "AttnLRP", position=3, target=[5, 7, 11])
    _check_against_reference("llama", "sdpa", "dynamo", "CPLRP", position=-2, target=[1, 2, 3])
    with pytest.raises(lrpc.LrpcError, match="position 9 is out of range|sequence outputs"):
        lrpc.compile(onnx.load_from_string(tz.export_bytes("bert", "eager", "legacy")), lrpc.AttnLRP(), position=9)


def test_a_language_models_head_is_explained_at_its_position_only():
    """Relevance at a sequence output is zero away from the explained position, so the head's
    rule runs on the gathered row ([N, H] by [H, V]) instead of on [N, T, V] relevance: no
    relevance node that reads the head's weight sees the logits or the head's input except
    through the Gather of the position (the values are the reference's, in the tests above)."""
    import networkx as nx

    model = lrpc.compile(onnx.load_from_string(tz.export_bytes("gpt2", "eager", "legacy")), lrpc.AttnLRP(),
                         position=3)
    nodes = list(model.graph.node)
    head = next(n for n in nodes if "logits" in n.output and not n.name.startswith("lrp/"))
    assert head.op_type == "MatMul"
    x, weight = head.input
    gathers = [n for n in nodes if n.op_type == "Gather" and n.input[0] in (x, "logits")
               and any(a.name == "axis" and a.i == 1 for a in n.attribute)]
    assert {n.input[0] for n in gathers} == {x, "logits"}
    g = nx.DiGraph()
    for n in nodes:
        if n in gathers or n.op_type == "Shape":
            continue  # the only way from the sequence to the head's relevance (Shape: sizes only)
        for t in n.input:
            g.add_edge(("t", t), ("n", n.name))
        for t in n.output:
            g.add_edge(("n", n.name), ("t", t))
    readers = [n for n in nodes if n.name.startswith("lrp/") and weight in n.input]
    assert readers, "the relevance pass reads the head's weight"
    for n in readers:
        for t in n.input:
            if t != weight:
                seen = nx.ancestors(g, ("t", t)) | {("t", t)}
                assert ("t", "logits") not in seen and ("t", x) not in seen, (n.name, t)


def test_a_language_models_conservation_report():
    """``report=True`` on GPT-2, whose legacy export runs its Conv1D layers on [N·T, H]: the
    per-layer sums are per sample all the same; the head (ε-rule, no bias) passes on the
    relevance it gets (one per sample, normalized), and so does every layer of the file up to
    its ε and biases: the input's relevance is what the first layer passes on."""
    analyzer = lrpc.LRP(onnx.load_from_string(tz.export_bytes("gpt2", "eager", "legacy")), lrpc.AttnLRP(),
                        report=True)
    ex = tz.example("gpt2", 3)
    explanation = analyzer.analyze(ex.ids, extra_inputs={"mask": ex.mask})
    report = explanation.report()
    head = report.rows[-1]
    assert head.op_type == "MatMul" and "lm_head" in head.name
    assert head.relevance_out == pytest.approx(3.0, rel=1e-6)  # three samples, one each
    assert head.relevance_in == pytest.approx(head.relevance_out, rel=1e-5)
    first = min(report.rows, key=lambda row: row.index)
    assert float(explanation.val.sum()) == pytest.approx(first.relevance_in, rel=1e-4, abs=1e-6)


def test_cp_lrp_sends_nothing_through_queries_and_keys():
    """Under CP-LRP the softmax branch gets no relevance: the Q·Kᵀ MatMul and the softmax
    are layers with rules, but the compiled file propagates nothing through them."""
    model = onnx.load_from_string(tz.export_bytes("bert", "eager", "legacy"))
    rules = {layer.name: rule for layer, rule in lrpc.lrp_rules(model, lrpc.CPLRP())}
    assert repr(rules["/model/bert/encoder/layer.0/attention/self/MatMul"]) == "ConstantGateRule(epsilon=1e-06)"
    assert repr(rules["/model/bert/encoder/layer.0/attention/self/Softmax"]) == "TaylorRule()"
    compiled = lrpc.compile(model, lrpc.CPLRP())
    backward = [n for n in compiled.graph.node if n.name.startswith("lrp/")]
    cp_softmax_terms = [n for n in backward if any("Softmax" in i for i in n.input)]
    attn = lrpc.compile(model, lrpc.AttnLRP())
    attn_softmax_terms = [n for n in attn.graph.node if n.name.startswith("lrp/") and any("Softmax" in i for i in n.input)]
    assert not [n for n in cp_softmax_terms if n.op_type == "Equal"]  # TaylorRule's mask: never emitted
    assert [n for n in attn_softmax_terms if n.op_type == "Equal"]


def test_inspect_shows_the_transformer_rules(cli, tmp_path):
    path = tmp_path / "llama.onnx"
    path.write_bytes(tz.export_bytes("llama", "eager", "legacy"))
    result = cli("inspect", path, "--composite", "AttnLRP(epsilon=1e-9)")
    assert result.code == 0, result.err
    for text in ("RMSNormalization", "LayerNormRule(epsilon=1e-09)", "TaylorRule()", "Softmax",
                 "EpsilonRule(epsilon=1e-09)"):
        assert text in result.out
    result = cli("inspect", path, "--composite", "CPLRP")
    assert "ConstantGateRule(epsilon=1e-06)" in result.out


def test_explain_writes_text_heatmaps_for_token_models(cli, tmp_path):
    model = tmp_path / "bert.onnx"
    model.write_bytes(tz.export_bytes("bert", "eager", "legacy"))
    ex = tz.example("bert", 3)
    np.save(tmp_path / "ids.npy", ex.ids)
    np.save(tmp_path / "mask.npy", ex.mask)
    tokens = [[f"tok{i}" for i in row] for row in ex.ids]
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    out = tmp_path / "out"
    result = cli("explain", model, tmp_path / "ids.npy", "-o", out, "--composite", "AttnLRP",
                 "--feed", f"mask={tmp_path / 'mask.npy'}", "--tokens", tmp_path / "tokens.json", "-v")
    assert result.code == 0, result.err
    pages = sorted(p.name for p in out.glob("text_*.html"))
    assert pages == ["text_000.html", "text_001.html", "text_002.html"]
    page = (out / "text_002.html").read_text()
    assert all(f">{token}</span>" in page for token in tokens[2])
    saved = np.load(out / "relevance.npz")
    assert saved["relevance"].shape == (3, tz.SEQUENCE, tz.HIDDEN)
    np.testing.assert_allclose(saved["token_relevance"], saved["relevance"].sum(-1), rtol=1e-6)
    # the same relevance as the Python API with the same mask
    expl = lrpc.LRP(str(model), lrpc.AttnLRP(), verbose=False).analyze(ex.ids, extra_inputs={"mask": ex.mask})
    np.testing.assert_allclose(saved["relevance"], expl.val, rtol=1e-5, atol=1e-7)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["heatmap"] for s in summary] == pages
    assert "tok" in result.out  # with -v the terminal shows the tokens


def test_explain_token_errors_are_one_line(cli, tmp_path):
    model = tmp_path / "bert.onnx"
    model.write_bytes(tz.export_bytes("bert", "eager", "legacy"))
    np.save(tmp_path / "ids.npy", tz.example("bert", 2).ids)
    (tmp_path / "short.json").write_text(json.dumps(["a", "b"]))
    for extra, message in ((["--tokens", tmp_path / "short.json"], "--tokens"),
                           (["--feed", "nope=x.npy"], "--feed nope"),
                           (["--feed", "mask"], "NAME=FILE.npy"),
                           (["--tokenizer", tmp_path / "missing.json"], "--tokenizer")):
        result = cli("explain", model, tmp_path / "ids.npy", "-o", tmp_path / "out", *extra)
        assert result.code == 2 and message in result.err and len(result.err_lines) == 1, result.err


def test_explain_with_a_tokenizer_file(cli, tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(tz.VOCAB)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    model = tmp_path / "gpt2.onnx"
    model.write_bytes(tz.export_bytes("gpt2", "eager", "legacy"))
    ids = tz.example("gpt2", 2).ids
    np.save(tmp_path / "ids.npy", ids)
    result = cli("explain", model, tmp_path / "ids.npy", "-o", tmp_path / "out", "--composite", "AttnLRP",
                 "--tokenizer", tmp_path)
    assert result.code == 0, result.err
    page = (tmp_path / "out" / "text_001.html").read_text()
    assert all(f">w{i}</span>" in page for i in ids[1])


def test_vit_gets_an_image_heatmap(cli, tmp_path):
    model = tmp_path / "vit.onnx"
    model.write_bytes(tz.export_bytes("vit", "sdpa", "dynamo"))
    np.save(tmp_path / "pixels.npy", tz.example("vit", 2).pixels)
    result = cli("explain", model, tmp_path / "pixels.npy", "-o", tmp_path / "out", "--composite", "AttnLRP")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["heatmap_000.png", "heatmap_001.png"]


def test_a_recurrent_layer_with_a_dynamic_length_is_named_in_the_check_table(cli, tmp_path):
    """An LSTM over a dynamic sequence length (its steps are written out at compile time)
    and another unsupported op are refused in one table naming each, with the reason."""

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 8, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            h, _ = self.lstm(x)
            return self.head(h[:, -1].cumsum(-1))

    from support.export import _quiet

    path = tmp_path / "lstm.onnx"
    with _quiet(), torch.no_grad():
        torch.onnx.export(Recurrent().eval(), (torch.randn(2, 5, 4),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N", 1: "T"}})
    result = cli("check", path)
    assert result.code == 2
    rows = [line for line in result.out.splitlines() if "│" in line and ("LSTM" in line or "CumSum" in line)]
    assert any("LSTM" in r and "dynamic sequence length" in r for r in rows), result.out
    assert any("CumSum" in r and "unknown layer type" in r for r in rows), result.out
    assert len(result.err_lines) == 1 and "2 unsupported" in result.err


def test_albert_tanh_gelu_after_a_bias_add():
    """ALBERT (optimum's exports of it were refused: `Pow` unknown): its tanh GELU reads the
    bias ``Add`` of the layer before it, its layers are shared and its embedding factorized."""
    _check_against_reference("albert", "eager", "legacy", "AttnLRP")



def test_a_transformers_file_is_run_without_packed_weight_copies():
    """The relevance pass multiplies by the same weights as the forward: onnxruntime's packed
    copy of each right factor would double a transformer's weights, so lrpc's sessions of such
    a file do not pack (a CNN's, mostly convolutions, do)."""
    from lrpc.runtime.session import make_session, reads_product_weights_twice
    from support.graphs import small_cnn

    bert = lrpc.compile(onnx.load_from_string(tz.export_bytes("bert")), "AttnLRP()")
    assert reads_product_weights_twice(bert)
    assert not reads_product_weights_twice(onnx.load_from_string(tz.export_bytes("bert")))  # the plain export
    assert not reads_product_weights_twice(lrpc.compile(small_cnn(seed=0)))
    options = make_session(bert).get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
