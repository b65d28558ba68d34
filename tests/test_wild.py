"""Models from the wild and a newcomer's first hour.

Files no one here wrote (the rapidocr wheel's PP-OCR models, the onnx wheel's
``light_squeezenet.onnx``, scikit-learn pipelines through skl2onnx), torch exports as
torch's defaults write them (dynamo, a fixed batch of 1), dense outputs (a segmentation
U-Net), 1-D and tabular inputs, and the command line's conventions and reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lrpc
from support import families, zoo
from support.export import _quiet, export_onnx
from support.graphs import small_cnn

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
LRPC = [sys.executable, "-m", "lrpc.cli"]


def wheel_model(tmp_path: Path, wheel_glob: str, member: str) -> Path:
    """A model from a wheel ``make`` downloads into .venv/wheels (read from the wheel itself)."""
    wheels = sorted((Path(sys.prefix) / "wheels").glob(wheel_glob))
    assert wheels, f"make install downloads {wheel_glob} into .venv/wheels"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        path = tmp_path / Path(member).name
        path.write_bytes(wheel.read(member))
    return path


def rapidocr_model(tmp_path: Path, name: str) -> Path:
    return wheel_model(tmp_path, "rapidocr_onnxruntime-*.whl", f"rapidocr_onnxruntime/models/{name}")


LIGHT_SQUEEZENET = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"


def session(model) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


# -- 1: output normalizations behind shape ops --------------------------------------------------------


def test_flatten_softmax_reshape_at_the_end_is_stripped():
    """PaddlePaddle's classifier head as reported: MatMul -> Add -> Flatten -> Softmax -> Reshape."""
    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["z"]),
             helper.make_node("Flatten", ["z"], ["f"], axis=1), helper.make_node("Softmax", ["f"], ["p"], axis=1),
             helper.make_node("Reshape", ["p", "shape"], ["probs"])]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(4, np.float32), "b"),
                           numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    expl = lrpc.LRP(model, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9))),
                    normalize_output_relevance=False).analyze(x, [0, 1, 2])
    z = x @ w + 1
    np.testing.assert_allclose(expl.logit, z[np.arange(3), [0, 1, 2]], rtol=1e-5)
    expected = x * w.T[[0, 1, 2]] * (z[np.arange(3), [0, 1, 2]] / z[np.arange(3), [0, 1, 2]])[:, None]
    expected = x * w[:, [0, 1, 2]].T  # LRP-ε through x·w + b: x_i w_ik (the bias keeps b_k / z_k of z_k)
    np.testing.assert_allclose(expl.val, expected, rtol=1e-4, atol=1e-6)


def test_pp_ocr_classifier_starts_at_the_logits(tmp_path):
    path = rapidocr_model(tmp_path, "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    assert [n.op_type for n in onnx.load(str(path)).graph.node][-2:] == ["Softmax", "Identity"]
    analysis = lrpc.compiler.analyze_model(str(path))
    assert analysis.report.ok and "Softmax" not in [r.op_type for r in analysis.report.rows]
    assert "before Softmax" in " ".join(analysis.program.notes)
    model = lrpc.compile(str(path), lrpc.EpsilonPlus(), normalize_output_relevance=False, labels=True)
    x = np.random.default_rng(0).random((2, 3, 48, 192), dtype=np.float32)
    probs, relevance, chosen, logit = session(model).run(None, {"x": x})
    original = session(path).run(None, {"x": x})[0]
    np.testing.assert_allclose(probs, original, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(chosen, probs.reshape(2, -1).argmax(1))
    # the explained logit is the pre-softmax score: its softmax over the two classes is the output
    assert relevance.shape == x.shape and np.isfinite(relevance).all()
    assert np.all(np.abs(logit) > 0)


def test_light_squeezenet_ends_gap_softmax_on_n_k_1_1(tmp_path):
    model = onnx.load(str(LIGHT_SQUEEZENET))
    assert [n.op_type for n in model.graph.node][-2:] == ["GlobalAveragePool", "Softmax"]
    compiled = lrpc.compile(model, lrpc.EpsilonPlusFlat(), labels=True)
    meta = {p.key: p.value for p in compiled.metadata_props}
    assert meta["lrpc.layout"] == "flat" and meta["lrpc.relevance_start"].endswith("/logits")
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    out = dict(zip([o.name for o in compiled.graph.output], session(compiled).run(None, {"data_0": x})))
    assert out["relevance"].shape == x.shape and int(out["lrp_class"][0]) == int(out["softmaxout_1"].argmax())


def test_pp_ocr_detector_strips_its_sigmoid_and_explains_a_dense_map(tmp_path):
    path = rapidocr_model(tmp_path, "ch_PP-OCRv4_det_infer.onnx")
    assert [n.op_type for n in onnx.load(str(path)).graph.node][-1] == "Sigmoid"
    analyzer = lrpc.LRP(str(path), lrpc.EpsilonPlus())
    assert analyzer.layout == "dense" and "Sigmoid" not in analyzer.metadata["lrpc.relevance_start"]
    x = np.random.default_rng(2).random((1, 3, 64, 64), dtype=np.float32)
    region = np.zeros((64, 64), np.float32)
    region[16:32, 16:48] = 1
    whole, part = analyzer.analyze(x, 0), analyzer.analyze(x, 0, region=region)
    assert whole.val.shape == x.shape and np.isfinite(whole.val).all()
    assert not np.allclose(whole.val, part.val)


def test_a_final_sigmoid_of_a_binary_classifier_is_stripped():
    model = small_cnn(0)
    graph = model.graph
    last = graph.output[0].name
    graph.node.append(helper.make_node("Sigmoid", [last], ["prob"], name="/head/Sigmoid"))
    graph.output[0].name = "prob"
    analysis = lrpc.compiler.analyze_model(model)
    assert analysis.program.start_name == last and analysis.report.ok


# -- 2, 3: dense outputs and several targets ---------------------------------------------------------


class SegUNet(families.UNet):
    """The U-Net family with a segmentation head: ``[N, 5, 32, 32]`` class maps."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(32, 5, 1)

    def forward(self, x):
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool(skip1))
        x = self.bottleneck(self.pool(skip2))
        x = self.upconv1(self.up1(x))
        x = self.dec1(torch.cat([skip2, x], 1))
        x = self.upconv2(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
        return self.head(self.dec2(torch.cat([skip1, x], 1)))


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.init_parameters(SegUNet(), 0).eval()
    path = tmp_path_factory.mktemp("unet") / "unet.onnx"
    export_onnx(model, families.example_input("unet", 2), path, dynamo=False)
    return model, path


def test_a_dense_output_is_a_channel_summed_over_a_region(unet):
    """LRP-0 on a ReLU network is Gradient × Input: the reference is x ⊙ ∂(Σ_p region_p z_{k,p})/∂x."""
    model, path = unet
    x = families.example_input("unet", 2, seed=3)
    region = np.zeros((32, 32), np.float32)
    region[4:20, 8:30] = 1.0
    analyzer = lrpc.LRP(str(path), lrpc.Composite(lrpc.GlobalMap(lrpc.ZeroRule())), normalize_output_relevance=False)
    assert analyzer.layout == "dense"
    expl = analyzer.analyze(x, [2, 4], region=region)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = model.double()(xt)
    (out[0, 2] * torch.tensor(region, dtype=torch.float64)).sum().add(
        (out[1, 4] * torch.tensor(region, dtype=torch.float64)).sum()).backward()
    expected = (xt * xt.grad).detach().numpy()
    assert np.abs(expl.val - expected).max() / np.abs(expected).max() < 1e-4
    np.testing.assert_array_equal(expl.output_selection, [2, 4])
    # default: the channel with the largest total over the region, and the whole map counts
    best = analyzer.analyze(x)
    totals = out.detach().numpy().reshape(2, 5, -1).sum(-1)
    np.testing.assert_array_equal(best.output_selection, totals.argmax(1))


def test_dense_outputs_on_the_command_line(cli, unet, tmp_path):
    _, path = unet
    np.save(tmp_path / "x.npy", families.example_input("unet", 2, seed=4))
    Image = pytest.importorskip("PIL.Image")
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "top.png")
    result = cli("explain", path, tmp_path / "x.npy", "-o", tmp_path / "out", "--target", "1,3",
                 "--region", tmp_path / "top.png")
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(e["index"], e["target"]) for e in summary] == [(0, 1), (0, 3), (1, 1), (1, 3)]
    assert [e["heatmap"] for e in summary] == ["heatmap_000_class1.png", "heatmap_000_class3.png",
                                               "heatmap_001_class1.png", "heatmap_001_class3.png"]
    expl = lrpc.LRP(str(path)).analyze(np.load(tmp_path / "x.npy"), 3, region=(mask > 0).astype(np.float32))
    npz = np.load(tmp_path / "out" / "relevance.npz")
    np.testing.assert_allclose(npz["relevance"][[1, 3]], expl.val, rtol=1e-5, atol=1e-7)
    bad = cli("explain", DIGITS / "digits_cnn.onnx", DIGITS / "samples.npy", "-o", tmp_path / "o2",
              "--region", tmp_path / "top.png")
    assert bad.code == 2 and "--region applies to dense outputs" in bad.err


def test_several_and_negative_targets(cli, tmp_path):
    result = cli("explain", DIGITS / "digits_cnn.onnx", DIGITS / "samples.npy", "-o", tmp_path / "out",
                 "--target=-1,7")
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [e["target"] for e in summary][:4] == [0, 7, 1, 7]  # -1: the prediction (the labels are 0..7)
    assert cli("explain", DIGITS / "digits_cnn.onnx", DIGITS / "samples.npy", "-o", tmp_path / "o",
               "--target", "a,b").code == 2


# -- 4, 5: scikit-learn, compiled files ------------------------------------------------------------


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


def test_a_scikit_learn_pipeline_with_zipmap_is_explained(tmp_path):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from skl2onnx import to_onnx

    x, y = _digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), max_iter=80, random_state=0))
        pipe.fit(x[:400], y[:400])
    model = to_onnx(pipe, x[:1])
    assert {n.op_type for n in model.graph.node} >= {"Scaler", "ZipMap"}
    analyzer = lrpc.LRP(model, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9))), normalize_output_relevance=False)
    expl = analyzer.analyze(x[:3])
    # the reference: the same network in numpy, LRP-ε (ε → 0) layer by layer
    scaler, mlp = pipe[0], pipe[1]
    a0 = (x[:3] - scaler.mean_) / scaler.scale_
    z1 = a0 @ mlp.coefs_[0] + mlp.intercepts_[0]
    a1 = np.maximum(z1, 0)
    z2 = a1 @ mlp.coefs_[1] + mlp.intercepts_[1]
    target = z2.argmax(1)
    r2 = np.zeros_like(z2)
    r2[np.arange(3), target] = z2[np.arange(3), target]
    r1 = a1 * ((r2 / z2) @ mlp.coefs_[1].T)
    r0 = a0 * ((r1 / z1) @ mlp.coefs_[0].T)
    shifted = x[:3] * (1 / scaler.scale_) - scaler.mean_ / scaler.scale_
    expected = x[:3] * (1 / scaler.scale_) * (r0 / np.where(shifted == 0, 1, shifted))
    np.testing.assert_array_equal(expl.output_selection, target)
    assert np.abs(expl.val - expected).max() / np.abs(expected).max() < 1e-4


@pytest.mark.parametrize("estimator", ["forest", "logistic"])
def test_non_network_models_are_refused_in_one_line(cli, tmp_path, estimator):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    x, y = _digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = (RandomForestClassifier(n_estimators=2, max_depth=2) if estimator == "forest"
               else LogisticRegression(max_iter=20)).fit(x[:200], y[:200])
    path = tmp_path / "m.onnx"
    onnx.save(to_onnx(est, x[:1]), path)
    op = "TreeEnsembleClassifier" if estimator == "forest" else "LinearClassifier"
    for command in ("compile", "check"):
        result = cli(command, path, *(["-o", tmp_path / "o.onnx"] if command == "compile" else []))
        assert result.code == 2 and "LRP explains neural networks" in result.err and op in result.err
        assert "register" not in result.err and len(result.err_lines) == 1, result.err


def test_check_and_compile_refuse_a_compiled_file(cli, tmp_path):
    out = tmp_path / "d.lrp.onnx"
    assert cli("compile", DIGITS / "digits_cnn.onnx", "-o", out).code == 0
    for command in ("check", "compile", "inspect"):
        result = cli(command, out)
        assert result.code == 2 and "already compiled by lrpc" in result.err and len(result.err_lines) == 1


# -- 6, 7: torch's defaults ------------------------------------------------------------------------


def test_a_fixed_batch_of_one_explains_a_folder(cli, tmp_path):
    model = zoo.build("lenet", 0)
    x = zoo.example_input("lenet", 1)
    path = tmp_path / "fixed.onnx"
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, torch.from_numpy(x), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"])  # no dynamic_axes: batch 1 baked in
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    batch = zoo.example_input("lenet", 5, seed=2)
    np.save(tmp_path / "five.npy", batch)
    result = cli("explain", path, tmp_path / "five.npy", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    npz = np.load(tmp_path / "out" / "relevance.npz")
    one_by_one = np.concatenate([lrpc.LRP(str(path)).analyze(batch[i:i + 1]).val for i in range(5)])
    np.testing.assert_allclose(npz["relevance"], one_by_one, rtol=1e-6, atol=1e-8)


def test_dynamo_exports_read_like_torchscript_ones(tmp_path):
    from support.export import zoo_onnx_bytes

    legacy = onnx.load_from_string(zoo_onnx_bytes("vgg"))
    dynamo = onnx.load_from_string(zoo_onnx_bytes("vgg", dynamo=True))
    assert any(n.name.startswith("node_") for n in dynamo.graph.node)
    rows = {}
    for name, model in (("legacy", legacy), ("dynamo", dynamo)):
        rows[name] = [(layer.name, layer.path_index) for layer, _ in lrpc.lrp_rules(model, lrpc.EpsilonPlus())]
    convs = [row for row in rows["dynamo"] if row[0].endswith("/Conv")]
    assert convs == [row for row in rows["legacy"] if row[0].endswith("/Conv")]  # names and hierarchical indices
    flat = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule()), lrpc.LayerMap("/conv1_*", lrpc.FlatRule()))
    assigned = [repr(rule) for _, rule in lrpc.lrp_rules(dynamo, flat)]
    assert assigned.count("FlatRule()") == len([n for n, _ in convs if n.startswith("/conv1_")]) > 0


# -- 8: stderr noise -------------------------------------------------------------------------------


def test_only_lrpc_speaks_on_stderr(tmp_path):
    """onnx-graphsurgeon's warnings about types it cannot convert (a scikit-learn ZipMap)
    stay quiet unless -v."""
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx

    x, y = _digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp = MLPClassifier(hidden_layer_sizes=(8,), max_iter=20, random_state=0).fit(x[:200], y[:200])
    path = tmp_path / "mlp.onnx"
    onnx.save(to_onnx(mlp, x[:1]), path)
    quiet = subprocess.run([*LRPC, "compile", str(path), "-o", str(tmp_path / "o.onnx")],
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "" and "[W]" not in quiet.stdout, quiet.stderr
    loud = subprocess.run([*LRPC, "-v", "compile", str(path), "-o", str(tmp_path / "o2.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "[W]" in loud.stdout + loud.stderr  # onnx-graphsurgeon prints to stdout


# -- 9, 10, 11: command-line conventions -----------------------------------------------------------


def test_output_files_and_tensor_names(cli, tmp_path):
    model = DIGITS / "digits_cnn.onnx"
    result = cli("compile", model, "--output", tmp_path / "out.onnx")
    assert result.code == 0 and (tmp_path / "out.onnx").exists(), result.err
    result = cli("compile", model, "--output-name", "probabilities", "--input-name", "input", "-o", tmp_path / "b.onnx")
    assert result.code == 0 and result.err == ""
    old = cli("compile", model, "--output", "probabilities", "--input", "input", "-o", tmp_path / "c.onnx")
    assert old.code == 0 and (tmp_path / "c.onnx").exists()
    assert "--input NAME is deprecated" in old.err and "--output probabilities for a tensor is deprecated" in old.err
    assert cli("explain", model, DIGITS / "samples.npy", "--output", tmp_path / "folder").code == 0
    assert (tmp_path / "folder" / "summary.json").exists()


def test_every_flag_has_help():
    from lrpc.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.help is not argparse_suppress():
                assert action.help, f"lrpc {name} {action.option_strings} has no help"


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def test_explain_summary_quiet_no_heatmaps_providers_threads_relevance_at(cli, tmp_path):
    model, samples = DIGITS / "digits_cnn.onnx", DIGITS / "samples.npy"
    result = cli("explain", model, samples, "-o", tmp_path / "a", "-q", "--no-heatmaps", "--providers", "cuda,cpu",
                 "--threads", 1, "--relevance-at", "/features/features.3/Conv")
    assert result.code == 0 and result.out == ""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert result.err_lines == ["lrpc: warning: CUDAExecutionProvider is not available in this onnxruntime "
                                    "(AzureExecutionProvider, CPUExecutionProvider); using the CPU"] or \
            "is not available" in result.err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["relevance.npz", "summary.json"]
    npz = np.load(tmp_path / "a" / "relevance.npz")
    key = [k for k in npz.files if k.startswith("relevance_at:")]
    assert len(key) == 1 and npz[key[0]].shape[0] == 8
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    expl = lrpc.LRP(str(model)).analyze(np.load(samples))
    np.testing.assert_allclose([e["logit"] for e in summary], expl.logit, rtol=1e-5)
    np.testing.assert_allclose([e["score"] for e in summary], expl.output.max(1), rtol=1e-5)
    assert cli("explain", model, samples, "-o", tmp_path / "b", "--providers", "quantum").code == 2


def test_register_ops_from_the_command_line(cli, tmp_path):
    from support.graphs import with_node_before_output

    path = tmp_path / "m.onnx"
    onnx.save(with_node_before_output(with_node_before_output(small_cnn(0), "Softsign"), "Identity"), path)
    assert cli("check", path).code == 2
    assert cli("check", path, "--treat-as-activation", "Softsign").code == 0
    onnx.save(with_node_before_output(small_cnn(0), "Round"), tmp_path / "r.onnx")
    assert cli("compile", tmp_path / "r.onnx", "-o", tmp_path / "r.lrp.onnx").code == 2
    assert cli("compile", tmp_path / "r.onnx", "-o", tmp_path / "r.lrp.onnx", "--pass-through", "Round").code == 0
    assert cli("check", path).code == 2  # registrations last one command


# -- 12, 13: pictures ------------------------------------------------------------------------------


def test_a_one_dimensional_signal_gets_a_signal_plot(cli, tmp_path):
    class Audio(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 4, 9, stride=4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean(-1))

    torch.manual_seed(0)
    path = tmp_path / "audio.onnx"
    x = np.sin(np.linspace(0, 60, 2000, dtype=np.float32))[None, None].repeat(2, 0)
    export_onnx(Audio().eval(), x, path, dynamo=False)
    np.save(tmp_path / "x.npy", x)
    result = cli("explain", path, tmp_path / "x.npy", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    from PIL import Image

    with Image.open(tmp_path / "out" / "heatmap_000.png") as plot:
        assert plot.size[0] >= 600 and plot.size[1] < plot.size[0]  # a plot, not a 2000×1 strip


def test_the_demo_overview(cli, tmp_path):
    result = cli("explain", DIGITS / "digits_cnn.onnx", DIGITS / "samples.npy", "-o", tmp_path / "out",
                 "--composite", "EpsilonPlus", "--overview")
    assert result.code == 0, result.err
    from PIL import Image

    with Image.open(tmp_path / "out" / "overview.png") as picture:
        assert picture.size[0] > 500
    import re

    makefile = (ROOT / "Makefile").read_text()
    assert "-o demo_out --scale 16 --overview" in makefile and re.search(r"--composite EpsilonPlus\b(?!Flat)", makefile)


# -- 14: where relevance leaks ----------------------------------------------------------------------


def _biased_mlp(bias: float):
    w1 = np.array([[1.0, 2.0], [0.5, -1.0], [1.0, 1.0]], np.float32)  # [3, 2]
    w2 = np.array([[1.0, -1.0], [2.0, 1.0]], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="/fc1/Gemm"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2"], ["logits"], name="/fc2/Gemm")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(np.full(2, bias, np.float32), "b1")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w1, w2


def test_the_conservation_report_measures_what_biases_absorb(cli, tmp_path):
    model, w1, w2 = _biased_mlp(bias=2.0)
    x = np.array([[1.0, 1.0, 1.0], [0.5, 2.0, 1.0]], np.float32)
    analyzer = lrpc.LRP(model, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9))), report=True)
    expl = analyzer.analyze(x, [0, 0])
    report = expl.report()
    # by hand: fc2 passes all on (no bias); fc1 keeps its input's share z - b of each z
    z1 = x @ w1 + 2.0
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w2
    r_a = a1 * (np.eye(2)[[0, 0]] / z2 @ w2.T)
    kept = (r_a * (z1 - 2.0) / z1).sum()
    fc1, fc2 = report.rows
    assert abs(fc2.change) < 1e-6 and abs(fc1.relevance_out - r_a.sum()) < 1e-5
    assert abs(fc1.relevance_in - kept) < 1e-5 and fc1.flagged and not fc2.flagged
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    np.save(tmp_path / "x.npy", x)
    result = cli("explain", path, tmp_path / "x.npy", "-o", tmp_path / "out", "--report", "--composite",
                 "Composite(GlobalMap(EpsilonRule(epsilon=1e-9)))", "--target", "0")
    assert result.code == 0, result.err
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [row["flagged"] for row in saved["layers"]] == [True, False] and "/fc1/Gemm" in result.out
    assert saved["layers"][0]["change"] == pytest.approx(fc1.change, rel=1e-4)


def test_merge_epsilon(cli, tmp_path):
    from support.export import zoo_onnx_bytes

    path = tmp_path / "resnet.onnx"
    path.write_bytes(zoo_onnx_bytes("resnet"))
    result = cli("inspect", path, "--merge-epsilon", "0.25")
    assert result.code == 0 and "MergeRule(epsilon=0.25)" in result.out
    rows = [line for line in result.out.splitlines() if "│ Add" in line]
    assert rows and all("MergeRule(epsilon=0.25)" in row for row in rows)
    x = zoo.example_input("resnet", 2)
    plain = lrpc.LRP(str(path), lrpc.EpsilonPlus()).analyze(x).val
    damped = lrpc.LRP(str(path), lrpc.composites.with_merge_epsilon(lrpc.EpsilonPlus(), 0.25)).analyze(x).val
    assert not np.allclose(plain, damped)
    assert cli("inspect", path, "--merge-epsilon", "-1").code == 2


# -- recurrent and audio models shipped in wheels -------------------------------------------


def _explained_alike(path: Path, feeds: dict, **options):
    """Compile, run the compiled file and the file itself: (compiled outputs, own outputs)."""
    import onnxruntime as ort

    compiled = lrpc.compile(str(path), lrpc.EpsilonPlusFlat(), verbose=False, **options)
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    own = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    return outputs, own


def test_ddddocr_crnn_explains_at_a_fixed_width(tmp_path):
    """ddddocr's OCR model, a CRNN (convolutions, a bidirectional LSTM over the image's
    width, CTC logits ``[T, 1, V]``): the width is dynamic, so the LSTM is named with that
    reason; with ``input_shape`` fixing it, the LSTM's steps are written out and the file
    explains, its outputs the file's own."""
    path = wheel_model(tmp_path, "ddddocr-*.whl", "ddddocr/common.onnx")
    with pytest.raises(lrpc.UnsupportedModelError, match="dynamic sequence length"):
        lrpc.compile(str(path))
    x = np.random.default_rng(0).random((1, 1, 64, 96)).astype(np.float32)
    outputs, own = _explained_alike(path, {"input1": x}, input_shape=[1, 1, 64, 96])
    assert np.array_equal(outputs[next(iter(outputs))], own[0])
    relevance = outputs["relevance"]
    assert relevance.shape == x.shape and np.isfinite(relevance).all() and np.abs(relevance).max() > 0


def test_silero_vad_explains_through_its_stft_front_end_and_lstm(tmp_path):
    """silero-vad's 16 kHz file (reflect-padded STFT as convolutions, the magnitude
    √(re² + im²), a convolutional encoder, an LSTM step with its state as an input, a
    sigmoid speech probability): outputs and state the file's own; the file that branches
    on its sampling-rate input names the If as control flow."""
    path = wheel_model(tmp_path, "silero_vad-*.whl", "silero_vad/data/silero_vad_openvino_16k.onnx")
    rng = np.random.default_rng(0)
    feeds = {"input": (0.1 * rng.standard_normal((1, 576))).astype(np.float32),
             "state": (0.1 * rng.standard_normal((2, 1, 128))).astype(np.float32)}
    outputs, own = _explained_alike(path, feeds)
    assert np.array_equal(outputs["output"], own[0]) and np.array_equal(outputs["stateN"], own[1])
    relevance = outputs["relevance"]
    assert relevance.shape == (1, 576) and np.isfinite(relevance).all() and np.abs(relevance).max() > 0
    branching = wheel_model(tmp_path, "silero_vad-*.whl", "silero_vad/data/silero_vad.onnx")
    with pytest.raises(lrpc.UnsupportedModelError, match="control flow"):
        lrpc.compile(str(branching))


def test_gradient_methods_take_the_region_of_a_dense_output(unet):
    """IntegratedGradients of a channel summed over a region, as Captum computes it for
    ``f(x) = Σ_p region_p z_{k,p}`` (the U-Net's nearest upsampling, concatenations, pools)."""
    from captum.attr import IntegratedGradients

    model, path = unet
    x = families.example_input("unet", 2, seed=3)
    region = np.zeros((32, 32), np.float32)
    region[4:20, 8:30] = 1.0
    expl = lrpc.IntegratedGradients(str(path), steps=8).analyze(x, [2, 4], region=region)
    mask = torch.tensor(region)

    def scores(t):
        return (model.float()(t) * mask).sum((2, 3))

    expected = IntegratedGradients(scores).attribute(torch.tensor(x), target=[2, 4], n_steps=8).numpy()
    assert np.abs(expl.val - expected).max() / np.abs(expected).max() < 1e-5
