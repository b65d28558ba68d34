"""``lrpc explain`` on the bundled digits model: .npy batches, PNG images, folders, resizing,
batching, plain and compiled models; bad inputs give one error line and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import lrpc
import lrpc.cli
import lrpc.explain
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper
from PIL import Image

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
MODEL = DIGITS / "digits_cnn.onnx"
SAMPLES = DIGITS / "samples.npy"
LABELS = json.loads((DIGITS / "samples_labels.json").read_text())
N = len(LABELS)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "digits.lrp.onnx"
    lrpc.compile_file(MODEL, path, lrpc.EpsilonPlusFlat())
    return path


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return np.load(SAMPLES)


def to_pixels(sample: np.ndarray) -> np.ndarray:
    """A [1, 8, 8] sample in [0, 1] as 8-bit grayscale pixels."""
    return (sample[0] * 255).round().astype(np.uint8)


def write_pngs(folder: Path, samples: np.ndarray, *, upscale: tuple[int, int] = (1, 1), rgb: bool = False) -> list[Path]:
    """digit<i>.png per sample; ``upscale`` (fy, fx) makes larger images by pixel repetition."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(samples):
        pixels = np.kron(to_pixels(sample), np.ones(upscale, dtype=np.uint8))
        image = Image.fromarray(pixels).convert("RGB" if rgb else "L")
        paths.append(folder / f"digit{i}.png")
        image.save(paths[-1])
    return paths


def outputs(folder: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    summary = json.loads((folder / "summary.json").read_text())
    with np.load(folder / "relevance.npz") as npz:
        return summary, {k: npz[k] for k in npz.files}


def png_size_and_colours(path: Path) -> tuple[tuple[int, int], int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size, len(image.convert("RGB").getcolors(maxcolors=1 << 20))


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def assert_consistent(folder: Path, n: int, image_size: tuple[int, int]) -> tuple[list[dict], dict]:
    """Every sample has a non-blank heatmap of ``image_size`` (W, H), and summary.json agrees with the npz."""
    summary, npz = outputs(folder)
    assert len(summary) == n and npz["relevance"].shape[0] == n
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("heatmap_")) == ["relevance.npz",
                                                                                              "summary.json"]
    assert len(list(folder.glob("heatmap_*.png"))) == n and not list(folder.glob(".*")), "stray or temp files"
    assert npz["inputs"].tolist() == [entry["input"] for entry in summary]
    for i, entry in enumerate(summary):
        assert entry["index"] == i
        assert entry["prediction"] == int(npz["output"][i].argmax())
        assert entry["target"] == int(npz["target"][i])
        assert entry["relevance_sum"] == pytest.approx(float(npz["relevance"][i].sum()), rel=1e-5, abs=1e-6)
        size, n_colours = png_size_and_colours(folder / entry["heatmap"])
        assert size == image_size, entry["heatmap"]
        assert n_colours > 1, f"{entry['heatmap']} is blank"
    return summary, npz


# -- .npy inputs ------------------------------------------------------------------------------------------


def test_npy_batch_heatmaps_match_the_input_size(cli, tmp_path, samples):
    out = tmp_path / "out"
    result = cli("explain", MODEL, SAMPLES, "-o", out)
    assert result.code == 0, result.err
    summary, npz = assert_consistent(out, N, (8, 8))
    assert [e["heatmap"] for e in summary] == [f"heatmap_{i:03d}.png" for i in range(N)]
    assert [e["input"] for e in summary] == [f"{SAMPLES}[{i}]" for i in range(N)]
    assert npz["relevance"].shape == samples.shape
    assert [e["prediction"] for e in summary] == [e["target"] for e in summary] == LABELS
    expl = lrpc.LRP(MODEL).analyze(samples)
    np.testing.assert_allclose(npz["relevance"], expl.val, rtol=1e-5, atol=1e-7)
    # one line for the run; a line per sample with -v
    assert result.out.splitlines() == [f"explained {N} sample(s): wrote {N} heatmap(s), relevance.npz, summary.json "
                                       f"to {out}"] and result.err == ""
    verbose = cli("explain", MODEL, SAMPLES, "-o", out, "-v")
    assert "heatmap_007.png" in verbose.out and len(verbose.out.splitlines()) == N + 1


@pytest.mark.parametrize("flag", ["--heatmap-scale", "--scale"])
def test_heatmap_scale_multiplies_the_size(cli, tmp_path, compiled, flag):
    assert cli("explain", compiled, SAMPLES, "-o", tmp_path, flag, 3).code == 0
    assert_consistent(tmp_path, N, (24, 24))


def test_one_sample_npy_without_batch_axis(cli, tmp_path, compiled, samples):
    np.save(tmp_path / "three.npy", samples[3])
    out = tmp_path / "out"
    assert cli("explain", compiled, tmp_path / "three.npy", "-o", out).code == 0
    summary, _ = assert_consistent(out, 1, (8, 8))
    assert summary[0]["heatmap"] == "heatmap_three.png" and summary[0]["prediction"] == 3


def test_target_is_explained_for_every_sample(cli, tmp_path, compiled):
    assert cli("explain", compiled, SAMPLES, "-o", tmp_path, "--target", 5).code == 0
    summary, npz = assert_consistent(tmp_path, N, (8, 8))
    assert [e["target"] for e in summary] == [5] * N and npz["target"].tolist() == [5] * N
    assert [e["prediction"] for e in summary] == LABELS


def test_batches_smaller_than_the_run_give_the_same_result(cli, tmp_path, compiled, monkeypatch):
    bars = []
    original = lrpc.explain._progress_bar
    monkeypatch.setattr(lrpc.explain, "_progress_bar", lambda total: bars.append(total) or original(total))
    assert cli("explain", compiled, SAMPLES, "-o", tmp_path / "one").code == 0
    assert bars == [], "one batch needs no progress bar"
    result = cli("explain", compiled, SAMPLES, "-o", tmp_path / "three", "--batch-size", 3)
    assert result.code == 0 and result.err == ""  # the bar is transient and only drawn on a terminal
    assert bars == [N]
    _, whole = assert_consistent(tmp_path / "one", N, (8, 8))
    _, batched = assert_consistent(tmp_path / "three", N, (8, 8))
    np.testing.assert_allclose(batched["relevance"], whole["relevance"], rtol=1e-5, atol=1e-7)
    assert batched["target"].tolist() == whole["target"].tolist()


def test_plain_model_with_composite_matches_the_compiled_one(cli, tmp_path, compiled):
    assert cli("explain", MODEL, SAMPLES, "-o", tmp_path / "plain", "--composite", "EpsilonPlusFlat").code == 0
    assert cli("explain", compiled, SAMPLES, "-o", tmp_path / "compiled").code == 0
    assert cli("explain", MODEL, SAMPLES, "-o", tmp_path / "other", "--composite", "EpsilonAlpha2Beta1").code == 0
    _, plain = outputs(tmp_path / "plain")
    _, done = outputs(tmp_path / "compiled")
    _, other = outputs(tmp_path / "other")
    np.testing.assert_allclose(plain["relevance"], done["relevance"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(other["relevance"], done["relevance"], rtol=1e-3, atol=1e-5)


# -- images ---------------------------------------------------------------------------------------------


def test_png_images_are_read_like_the_samples(cli, tmp_path, compiled, samples):
    pngs = write_pngs(tmp_path / "digits", samples)
    out = tmp_path / "out"
    assert cli("explain", compiled, *pngs[:3], "-o", out, "--heatmap-scale", 2).code == 0
    summary, npz = assert_consistent(out, 3, (16, 16))
    assert [e["heatmap"] for e in summary] == ["heatmap_digit0.png", "heatmap_digit1.png", "heatmap_digit2.png"]
    assert [e["input"] for e in summary] == [str(p) for p in pngs[:3]]
    assert [e["prediction"] for e in summary] == LABELS[:3]
    # 8-bit pixels divided by 255: the relevance of exactly those values
    quantized = np.stack([to_pixels(s)[None] / 255.0 for s in samples[:3]]).astype(np.float32)
    np.testing.assert_allclose(npz["relevance"], lrpc.LRP(compiled).analyze(quantized).val, rtol=1e-5, atol=1e-7)


def test_a_folder_is_its_images_in_sorted_order(cli, tmp_path, compiled, samples):
    folder = tmp_path / "digits"
    write_pngs(folder, samples)
    (folder / "notes.txt").write_text("not an input")  # other files in a folder are skipped
    out = tmp_path / "out"
    assert cli("explain", compiled, folder, "-o", out, "--batch-size", 3).code == 0
    summary, _ = assert_consistent(out, N, (8, 8))
    assert [e["input"] for e in summary] == [str(folder / f"digit{i}.png") for i in range(N)]
    assert [e["prediction"] for e in summary] == LABELS


def test_size_resizes_larger_rgb_images_and_heatmaps_keep_the_file_size(cli, tmp_path, compiled, samples):
    # 24 high x 32 wide RGB images for a one-channel 8x8 model: gray, resized to 8x8
    pngs = write_pngs(tmp_path / "big", samples[:4], upscale=(3, 4), rgb=True)
    out = tmp_path / "out"
    result = cli("explain", compiled, *pngs, "-o", out, "--size", 8, 8, "--heatmap-scale", 2)
    assert result.code == 0, result.err
    summary, npz = assert_consistent(out, 4, (64, 48))
    assert npz["relevance"].shape == (4, 1, 8, 8)
    assert [e["prediction"] for e in summary] == LABELS[:4]


def test_overlay_and_heatmap_options(cli, tmp_path, compiled, samples):
    pngs = write_pngs(tmp_path / "digits", samples[:2])
    assert cli("explain", compiled, *pngs, "-o", tmp_path / "plain").code == 0
    assert cli("explain", compiled, *pngs, "-o", tmp_path / "over", "--overlay", "--alpha", 0.6).code == 0
    assert cli("explain", compiled, *pngs, "-o", tmp_path / "viridis", "--colormap", "viridis",
               "--reduce", "maxabs", "--rangescale", "extrema").code == 0
    for name in ("over", "viridis"):
        assert_consistent(tmp_path / name, 2, (8, 8))
        for i in range(2):
            heat = tmp_path / name / f"heatmap_digit{i}.png"
            assert heat.read_bytes() != (tmp_path / "plain" / f"heatmap_digit{i}.png").read_bytes()
    with Image.open(tmp_path / "viridis" / "heatmap_digit0.png") as image:
        assert (68, 1, 84) in {c for _, c in image.convert("RGB").getcolors()}  # viridis' lowest colour


def test_same_stems_get_distinct_heatmap_names(cli, tmp_path, compiled, samples):
    a = write_pngs(tmp_path / "a", samples[:1])[0]
    b = write_pngs(tmp_path / "b", samples[1:2])[0]
    assert cli("explain", compiled, a, b, "-o", tmp_path / "out").code == 0
    summary, _ = assert_consistent(tmp_path / "out", 2, (8, 8))
    assert [e["heatmap"] for e in summary] == ["heatmap_digit0.png", "heatmap_digit0_2.png"]


def nhwc_model(path: Path) -> Path:
    """The digits model behind a Transpose: its input is [batch, 8, 8, 1]."""
    model = onnx.load(str(MODEL))
    graph = model.graph
    old = graph.input[0]
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 8, 8, 1]))
    graph.node.insert(0, helper.make_node("Transpose", ["pixels"], [old.name], perm=[0, 3, 1, 2], name="/to_nchw"))
    onnx.save(model, str(path))
    return path


def test_channels_last_model_layout_is_inferred(cli, tmp_path, samples):
    model = nhwc_model(tmp_path / "nhwc.onnx")
    pngs = write_pngs(tmp_path / "digits", samples[:3])
    assert cli("explain", model, *pngs, "-o", tmp_path / "out").code == 0
    summary, npz = assert_consistent(tmp_path / "out", 3, (8, 8))
    assert npz["relevance"].shape == (3, 8, 8, 1)
    assert [e["prediction"] for e in summary] == LABELS[:3]
    assert cli("explain", MODEL, *pngs, "-o", tmp_path / "nchw").code == 0
    for i in range(3):  # the same heatmaps as the NCHW model's
        assert (tmp_path / "out" / f"heatmap_digit{i}.png").read_bytes() == \
            (tmp_path / "nchw" / f"heatmap_digit{i}.png").read_bytes()


def test_exif_rotation_is_applied_before_resizing(cli, tmp_path, compiled):
    # stored 16 wide x 8 high, EXIF orientation 6 (rotate 90 degrees): shown 8 wide x 16 high
    pixels = np.zeros((8, 16), np.uint8)
    pixels[:, :4] = 255
    image = Image.fromarray(pixels).convert("RGB")
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert cli("explain", compiled, tmp_path / "rotated.jpg", "-o", tmp_path / "out", "--size", 8, 8).code == 0
    assert_consistent(tmp_path / "out", 1, (8, 16))


def test_a_tabular_model_gets_feature_bar_charts(cli, tmp_path):
    weight = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) - 5, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/dense/MatMul")], "tabular",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "tabular.onnx")
    np.save(tmp_path / "rows.npy", np.random.default_rng(0).random((5, 4), dtype=np.float32))
    result = cli("explain", tmp_path / "tabular.onnx", tmp_path / "rows.npy", "-o", tmp_path / "out",
                 "--feature-names", "age,height,weight,income")
    assert result.code == 0, result.err
    summary, npz = outputs(tmp_path / "out")
    assert npz["relevance"].shape == (5, 4) and [e["heatmap"] for e in summary] == [f"heatmap_{i:03d}.png"
                                                                                   for i in range(5)]
    with Image.open(tmp_path / "out" / "heatmap_000.png") as chart:
        assert chart.size[0] > 300  # a bar chart, not a 4×1 pixel strip
    bad = cli("explain", tmp_path / "tabular.onnx", tmp_path / "rows.npy", "-o", tmp_path / "o2",
              "--feature-names", "a,b")
    assert bad.code == 2 and "2 name(s) for 4 features" in bad.err
    none = cli("explain", tmp_path / "tabular.onnx", tmp_path / "rows.npy", "-o", tmp_path / "o3", "--no-heatmaps")
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["relevance.npz", "summary.json"]
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    result = cli("explain", tmp_path / "tabular.onnx", tmp_path / "x.png", "-o", tmp_path / "img")
    assert result.code == 2 and "[n, 4]" in result.err and not (tmp_path / "img").exists()


def test_normalization_options_reach_the_model(cli, tmp_path, compiled, samples):
    pngs = write_pngs(tmp_path / "digits", samples[:2])
    assert cli("explain", compiled, *pngs, "-o", tmp_path / "out", "--mean", 0.5, "--std", 0.25).code == 0
    _, npz = outputs(tmp_path / "out")
    x = (np.stack([to_pixels(s)[None] / 255.0 for s in samples[:2]]) - 0.5) / 0.25
    np.testing.assert_allclose(npz["relevance"], lrpc.LRP(compiled).analyze(x.astype(np.float32)).val,
                               rtol=1e-5, atol=1e-7)


# -- bad input: one line, exit 2, nothing written -----------------------------------------------------------


def _corrupt_png(root: Path) -> Path:
    path = root / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    return path


def _truncated_png(root: Path) -> Path:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    image.save(root / "whole.png")
    data = (root / "whole.png").read_bytes()
    (root / "whole.png").unlink()
    path = root / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def _npy(root: Path, shape) -> Path:
    path = root / "wrong.npy"
    np.save(path, np.zeros(shape, np.float32))
    return path


def _text(root: Path) -> Path:
    path = root / "notes.txt"
    path.write_text("hello")
    return path


def _folder(root: Path, *files: str) -> Path:
    folder = root / "inputs"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("x")
    return folder


def _png(root: Path, size: tuple[int, int]) -> Path:
    path = root / "big.png"
    Image.new("L", size).save(path)
    return path


# name -> (extra argv given the workspace root, the model: "plain" | "compiled" | "dynamic" (H and W not fixed),
#          fragments of the error line)
BAD = {
    "corrupt-png": (lambda r: [_corrupt_png(r)], "plain", ["corrupt.png", "not a readable image"]),
    "truncated-png": (lambda r: [_truncated_png(r)], "plain", ["truncated.png", "not a readable image"]),
    "text-file": (lambda r: [_text(r)], "plain", ["notes.txt", "unknown input type '.txt'", ".npy"]),
    "npy-wrong-shape": (lambda r: [_npy(r, (2, 1, 9, 8))], "plain", ["wrong.npy", "(2, 1, 9, 8)", "[batch, 1, 8, 8]"]),
    "npy-wrong-rank": (lambda r: [_npy(r, (8, 8))], "plain", ["(8, 8)"]),
    "npy-empty-batch": (lambda r: [_npy(r, (0, 1, 8, 8))], "plain", ["empty batch"]),
    "image-wrong-size": (lambda r: [_png(r, (16, 12))], "plain", ["big.png", "12x16", "--size 8 8"]),
    "resized-to-the-wrong-size": (lambda r: [_png(r, (16, 12)), "--size", "9", "9"], "plain", ["9x9"]),
    "empty-folder": (lambda r: [_folder(r)], "plain", ["inputs", "no .npy, .png, .jpg or .jpeg files"]),
    "folder-without-inputs": (lambda r: [_folder(r, "a.txt", ".hidden.png")], "plain", ["no .npy"]),
    "missing-input": (lambda r: [r / "nowhere.png"], "plain", ["nowhere.png", "no such file"]),
    "mixed-sizes": (lambda r: [_png(r, (16, 16)), SAMPLES], "dynamic", ["big.png", "(1, 16, 16)", "--size"]),
    "composite-with-compiled-model": (lambda r: [SAMPLES, "--composite", "EpsilonPlus"], "compiled", ["already compiled"]),
    "mean-per-channel-count": (lambda r: [SAMPLES, _png(r, (8, 8)), "--mean", "0.1", "0.2"], "plain", ["--mean", "1 value"]),
    "zero-std": (lambda r: [_png(r, (8, 8)), "--std", "0"], "plain", ["--std"]),
    "unknown-colormap": (lambda r: [SAMPLES, "--colormap", "bwrr"], "plain", ["bwrr"]),
    "alpha-out-of-range": (lambda r: [SAMPLES, "--overlay", "--alpha", "2"], "plain", ["--alpha"]),
    "target-out-of-range": (lambda r: [SAMPLES, "--target", "10"], "plain", ["10"]),
}


def dynamic_model(path: Path) -> Path:
    """The digits model with named H and W axes: images of any size pass its input check."""
    model = onnx.load(str(MODEL))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis, name in ((2, "h"), (3, "w")):
        dims[axis].dim_param = name
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_writes_nothing(cli, tmp_path, compiled, case):
    make_args, model, fragments = BAD[case]
    root = tmp_path / "ws"
    root.mkdir()
    args = make_args(root)
    model = {"plain": MODEL, "compiled": compiled, "dynamic": lambda: dynamic_model(root / "dynamic.onnx")}[model]
    model = model() if callable(model) else model
    before = snapshot(tmp_path)
    result = cli("explain", model, *args, "-o", root / "out")
    assert result.code == 2, f"exit {result.code}: {result.err}"
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1 and result.err_lines[0].startswith("lrpc: error: "), result.err
    for fragment in fragments:
        assert fragment in result.err_lines[0], f"{fragment!r} not in {result.err_lines[0]!r}"
    assert snapshot(tmp_path) == before, "output or temp files were left behind"
