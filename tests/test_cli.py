"""The command line: ``lrpc compile | check | inspect | explain``.

Mostly in-process through ``lrpc.cli.main(argv)``; a few runs of the installed ``lrpc``
console script prove that bad input reaches the user as one line, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lrpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from support.cli import Result
from support.graphs import small_cnn, with_node_before_output

LRPC_SCRIPT = Path(sys.executable).parent / "lrpc"
USAGE_ERROR = 2
ERROR_PREFIX = "lrpc: error:"
CONSERVING = "Composite(GlobalMap(EpsilonRule(epsilon=1e-9)))"

# small_cnn's layers (flat index, node name); see tests/support/graphs.py
LAYERS = [
    (0, "/features/features.0/Conv"),
    (1, "/features/features.2/MaxPool"),
    (2, "/features/features.3/Conv"),
    (3, "/avgpool/GlobalAveragePool"),
    (4, "/Flatten"),
    (5, "/classifier/classifier.0/Gemm"),
    (6, "/classifier/classifier.2/Gemm"),
]
# unsupported ops put between the last Relu and the last Gemm, with the reason each gets
ACTIVATION = "unsupported or unknown activation function"
UNKNOWN_LAYER = "unknown layer type"
OFFENDERS = {"Erf": ACTIVATION, "ThresholdedRelu": ACTIVATION, "Hardmax": UNKNOWN_LAYER, "Softsign": ACTIVATION}


# -- helpers -----------------------------------------------------------------------------------


def with_chain(model: onnx.ModelProto, ops) -> onnx.ModelProto:
    """``model`` (small_cnn) with the unary ``ops`` chained between the last Relu and the last Gemm."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    last = next(i for i, n in enumerate(nodes) if n.name.endswith("classifier.2/Gemm"))
    extra, source = [], nodes[last].input[0]
    for k, op in enumerate(ops):
        extra.append(helper.make_node(op, [source], [f"custom_{k}"], name=f"/classifier/custom/{op}"))
        source = f"custom_{k}"
    nodes[last].input[0] = source
    del m.graph.node[:]
    m.graph.node.extend(nodes[:last] + extra + nodes[last:])
    return m


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def rules_of(path) -> dict[int, str]:
    """``lrpc.rules`` metadata as {layer index: rule repr}."""
    entries = (item.split(":", 1) for item in metadata(path)["lrpc.rules"].split("; "))
    return {int(index): rest.split("=", 1)[1] for index, rest in entries}


def run_onnx(path, x: np.ndarray, target=None) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feeds = {"input": x} if target is None else {"input": x, "lrp_target": np.asarray(target, np.int64)}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its content (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def assert_one_error_line(result: Result, *fragments: str) -> None:
    assert result.code == USAGE_ERROR, f"exit {result.code}; stderr: {result.err}"
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1, f"expected one line on stderr, got:\n{result.err}"
    assert result.err_lines[0].startswith(ERROR_PREFIX), result.err
    for fragment in fragments:
        assert fragment in result.err_lines[0], f"{fragment!r} not in {result.err_lines[0]!r}"


def assert_table_then_error_line(result: Result, offenders=OFFENDERS) -> None:
    """The unsupported-op case: the check table (naming every offender), then the one error line."""
    assert result.code == USAGE_ERROR, f"exit {result.code}; stderr: {result.err}"
    assert "Traceback" not in result.err
    text = result.out + result.err
    error_lines = [line for line in result.err_lines if ERROR_PREFIX in line]
    assert len(error_lines) == 1, f"expected one '{ERROR_PREFIX}' line, got:\n{result.err}"
    assert result.err_lines[-1] == error_lines[0], f"the error line must come last:\n{result.err}"
    assert error_lines[0].startswith(ERROR_PREFIX)
    for op in offenders:
        assert f"/classifier/custom/{op}" in text, f"the table does not name the {op} node:\n{text}"


@pytest.fixture
def ws(tmp_path):
    """A workspace: models, data and an ``out/`` folder that commands write into."""

    class Workspace:
        root = tmp_path
        out = tmp_path / "out"
        model = tmp_path / "model.onnx"
        unsupported = tmp_path / "unsupported.onnx"
        batch = tmp_path / "batch.npy"

    Workspace.out.mkdir()
    onnx.save(small_cnn(0), Workspace.model)
    onnx.save(with_chain(small_cnn(0), OFFENDERS), Workspace.unsupported)
    np.save(Workspace.batch, np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32))
    return Workspace


# -- compile -------------------------------------------------------------------------------------


def test_compile_writes_model_lrp_onnx_beside_the_model(cli, ws):
    result = cli("compile", ws.model)
    written = ws.root / "model.lrp.onnx"
    assert result.code == 0, result.err
    assert written.is_file() and str(written) in result.out
    x = np.load(ws.batch)
    outputs = run_onnx(written, x)
    assert list(outputs) == ["logits", "relevance"] and outputs["relevance"].shape == x.shape


def test_compile_o_names_the_file_and_q_keeps_quiet(cli, ws):
    target = ws.out / "sub" / "explained.onnx"
    result = cli("compile", ws.model, "-o", target, "-q")
    assert (result.code, result.out, result.err) == (0, "", "")
    assert run_onnx(target, np.load(ws.batch))["relevance"].shape == (3, 3, 8, 8)
    assert sorted(p.name for p in target.parent.iterdir()) == ["explained.onnx"], "a temp file was left behind"


@pytest.mark.parametrize(
    "expression, expected_rules",
    [
        (CONSERVING, {i: "EpsilonRule(epsilon=1e-09)" for i, _ in LAYERS}),
        ("EpsilonPlusFlat", {0: "FlatRule()", 2: "ZPlusRule()", 5: "EpsilonRule(epsilon=1e-06)"}),
        ("EpsilonGammaBox(low=-3.0, high=3.0)", {0: "ZBoxRule(low=-3.0, high=3.0)", 6: "EpsilonRule(epsilon=1e-06)"}),
    ],
    ids=["expression", "preset", "preset-call"],
)
def test_compile_composite_expression(cli, ws, expression, expected_rules):
    out = ws.out / "c.onnx"
    assert cli("compile", ws.model, "--composite", expression, "-o", out).code == 0
    assert metadata(out)["lrpc.composite"] == repr(lrpc.parse_composite(expression))
    rules = rules_of(out)
    assert {i: rules[i] for i in expected_rules} == expected_rules


def test_compile_rules_file(cli, ws):
    rules_file = ws.root / "rules.toml"
    rules_file.write_text(
        'composite = "EpsilonPlus"\n'
        "[[rule]]\nlayers = 0\nrule = \"FlatRule()\"\n"
        '[[rule]]\nlayers = "/classifier/*"\nrule = "EpsilonRule(epsilon=1e-9)"\n'
    )
    out = ws.out / "r.onnx"
    assert cli("compile", ws.model, "--rules", rules_file, "-o", out).code == 0
    rules = rules_of(out)
    assert rules[0] == "FlatRule()"
    assert rules[2] == "ZPlusRule()"  # from the EpsilonPlus base
    assert rules[5] == rules[6] == "EpsilonRule(epsilon=1e-09)"


def test_no_normalize_output_relevance_is_recorded_and_scales_by_the_logit(cli, ws):
    normalized, unnormalized = ws.out / "n.onnx", ws.out / "u.onnx"
    assert cli("compile", ws.model, "-o", normalized).code == 0
    assert cli("compile", ws.model, "--no-normalize-output-relevance", "-o", unnormalized).code == 0
    assert metadata(normalized)["lrpc.normalize_output_relevance"] == "true"
    assert metadata(unnormalized)["lrpc.normalize_output_relevance"] == "false"
    x = np.load(ws.batch)
    a, b = run_onnx(normalized, x), run_onnx(unnormalized, x)
    logit = a["logits"].max(axis=1)
    sums_a, sums_b = a["relevance"].sum(axis=(1, 2, 3)), b["relevance"].sum(axis=(1, 2, 3))
    assert not np.allclose(sums_a, sums_b)
    # every rule is linear in the relevance it receives: starting from the logit scales by it
    np.testing.assert_allclose(b["relevance"], a["relevance"] * logit[:, None, None, None], rtol=1e-4, atol=1e-6)


def test_skip_checks_compiles_a_model_with_an_unsupported_activation(cli, ws):
    path = ws.root / "softsign.onnx"
    onnx.save(with_node_before_output(small_cnn(0), "Softsign"), path)
    out = ws.out / "softsign.lrp.onnx"
    assert cli("compile", path, "-o", out).code == USAGE_ERROR
    assert not out.exists()
    result = cli("compile", path, "-o", out, "--skip-checks")
    assert result.code == 0, result.err
    assert np.isfinite(run_onnx(out, np.load(ws.batch))["relevance"]).all()


# -- check ---------------------------------------------------------------------------------------


def test_check_passes_a_supported_model(cli, ws):
    result = cli("check", ws.model)
    assert result.code == 0 and result.err == ""
    for _, name in LAYERS:
        assert name in result.out
    assert "model check passed: 7 layers" in result.out


def test_check_names_every_offending_node_with_its_reason(cli, ws):
    result = cli("check", ws.unsupported)
    assert_table_then_error_line(result)
    rows = {op: line for line in result.out.splitlines() for op in OFFENDERS if f"/classifier/custom/{op} " in line}
    assert set(rows) == set(OFFENDERS)
    for op, reason in OFFENDERS.items():
        assert reason in rows[op], f"{op}: expected {reason!r} in {rows[op]!r}"
    assert ACTIVATION not in rows["Hardmax"]
    assert f"{len(OFFENDERS)} unsupported" in result.err_lines[-1]


@pytest.mark.parametrize("op, reason", [("Hardmax", UNKNOWN_LAYER), ("Erf", ACTIVATION), ("Softsign", ACTIVATION)])
def test_check_one_unsupported_node(cli, ws, op, reason):
    path = ws.root / f"{op}.onnx"
    onnx.save(with_node_before_output(small_cnn(0), op), path)
    result = cli("check", path)
    assert_table_then_error_line(result, offenders=[op])
    if reason:
        assert reason in result.out


@pytest.mark.parametrize("command", ["check", "inspect"])
def test_tables_show_full_node_names_in_an_80_column_terminal(cli, ws, monkeypatch, command):
    """Piped output (a file, CI log) gets rich's default of 80 columns: names must not be cut."""
    monkeypatch.setenv("COLUMNS", "80")
    result = cli(command, ws.unsupported if command == "check" else ws.model)
    names = [f"/classifier/custom/{op}" for op in OFFENDERS] if command == "check" else [n for _, n in LAYERS]
    missing = [name for name in names if name not in result.out]
    assert not missing, f"cut off in the table: {missing}\n{result.out}"


# -- inspect ---------------------------------------------------------------------------------------


def test_inspect_lists_indices_names_and_rules(cli, ws):
    result = cli("inspect", ws.model, "-c", "EpsilonPlusFlat")
    assert result.code == 0 and result.err == ""
    expected = {0: "FlatRule()", 1: "ZeroRule()", 2: "ZPlusRule()", 5: "EpsilonRule(epsilon=1e-06)"}
    lines = result.out.splitlines()
    for index, name in LAYERS:
        row = next((line for line in lines if f" {name} " in line), None)
        assert row is not None, f"{name} not listed:\n{result.out}"
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[0] == str(index)
        if index in expected:
            assert cells[-1] == expected[index]


def test_inspect_follows_the_composite(cli, ws):
    result = cli("inspect", ws.model, "--composite", CONSERVING)
    assert result.code == 0
    assert result.out.count("EpsilonRule(epsilon=1e-09)") >= len(LAYERS)


# -- explain ---------------------------------------------------------------------------------------


def explain_outputs(folder: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    summary = json.loads((folder / "summary.json").read_text())
    with np.load(folder / "relevance.npz") as npz:
        return summary, {k: npz[k] for k in npz.files}


def test_explain_writes_heatmaps_relevance_and_summary(cli, ws):
    from PIL import Image

    folder = ws.out / "explained"
    result = cli("explain", ws.model, ws.batch, "-o", folder, "--scale", 3)
    assert result.code == 0, result.err
    names = ["heatmap_000.png", "heatmap_001.png", "heatmap_002.png", "relevance.npz", "summary.json"]
    assert sorted(p.name for p in folder.iterdir()) == names, "missing files or temp files left behind"

    summary, npz = explain_outputs(folder)
    x = np.load(ws.batch)
    assert npz["relevance"].shape == x.shape
    np.testing.assert_allclose(npz["output"], run_onnx(ws.model, x)["logits"], rtol=1e-5, atol=1e-6)
    assert [e["index"] for e in summary] == [0, 1, 2]
    for entry, relevance, output, target in zip(summary, npz["relevance"], npz["output"], npz["target"]):
        assert entry["prediction"] == int(output.argmax())
        assert entry["target"] == entry["prediction"] == int(target)
        assert entry["relevance_sum"] == pytest.approx(float(relevance.sum()), rel=1e-5, abs=1e-6)
        with Image.open(folder / entry["heatmap"]) as image:
            assert image.format == "PNG" and image.size == (8 * 3, 8 * 3)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is not None and len(colours) > 1, f"{entry['heatmap']} is a single colour"


def test_explain_target_and_normalization(cli, ws):
    folder = ws.out / "t"
    assert cli("explain", ws.model, ws.batch, "-o", folder, "--target", 4, "--composite", CONSERVING).code == 0
    summary, npz = explain_outputs(folder)
    assert [e["target"] for e in summary] == [4, 4, 4] and npz["target"].tolist() == [4, 4, 4]

    raw = ws.out / "raw"
    assert cli("explain", ws.model, ws.batch, "-o", raw, "--target", 4, "--no-normalize-output-relevance").code == 0
    summary_raw, npz_raw = explain_outputs(raw)
    scaled = npz_raw["relevance"].sum(axis=(1, 2, 3)) / npz_raw["output"][:, 4]
    normal = cli("explain", ws.model, ws.batch, "-o", ws.out / "n", "--target", 4)
    assert normal.code == 0
    summary_normal, _ = explain_outputs(ws.out / "n")
    np.testing.assert_allclose(scaled, [e["relevance_sum"] for e in summary_normal], rtol=1e-4, atol=1e-6)


# -- bad input ---------------------------------------------------------------------------------------


def _write(path: Path, data) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _truncated(ws) -> Path:
    data = ws.model.read_bytes()
    return _write(ws.root / "truncated.onnx", data[: len(data) // 2])


def _rules(ws, text: str) -> Path:
    return _write(ws.root / "rules.toml", text)


def _npy(ws, shape) -> Path:
    path = ws.root / "data.npy"
    np.save(path, np.zeros(shape, dtype=np.float32))
    return path


def _existing_file(ws) -> Path:
    return _write(ws.out / "taken", "not a folder")


# name -> (argv given the workspace, fragments the error line must contain)
BAD_INPUT = {
    "missing-model": (lambda ws: ["compile", ws.root / "missing.onnx", "-o", ws.out / "m.onnx"], ["missing.onnx"]),
    "model-is-a-directory": (lambda ws: ["compile", ws.root, "-o", ws.out / "m.onnx"], ["directory"]),
    "random-bytes": (lambda ws: ["compile", _write(ws.root / "r.onnx", np.random.default_rng(0).bytes(4096)),
                                 "-o", ws.out / "m.onnx"], ["r.onnx"]),
    "text-file": (lambda ws: ["compile", _write(ws.root / "t.onnx", "ir_version: 8\nhello\n"),
                              "-o", ws.out / "m.onnx"], ["t.onnx"]),
    "truncated-model": (lambda ws: ["compile", _truncated(ws), "-o", ws.out / "m.onnx"], ["truncated.onnx"]),
    "malformed-composite": (lambda ws: ["compile", ws.model, "-c", "Composite(GlobalMap(EpsilonRule(1e-9))",
                                        "-o", ws.out / "m.onnx"], ["malformed"]),
    "unknown-name-in-composite": (lambda ws: ["compile", ws.model, "-c", "Composite(GlobalMap(FooRule()))",
                                              "-o", ws.out / "m.onnx"], ["FooRule"]),
    "incompatible-rule": (lambda ws: ["compile", ws.model, "-c",
                                      "Composite(LayerMap(1, ZBoxRule(low=0.0, high=1.0)))",
                                      "-o", ws.out / "m.onnx"], ["ZBoxRule", "MaxPool"]),
    "rules-not-toml": (lambda ws: ["compile", ws.model, "--rules", _rules(ws, 'composite = "EpsilonPlus\n[[rule]\n'),
                                   "-o", ws.out / "m.onnx"], ["rules.toml"]),
    "rules-without-rule-key": (lambda ws: ["compile", ws.model, "--rules", _rules(ws, "[[rule]]\nlayers = 0\n"),
                                           "-o", ws.out / "m.onnx"], ["rule"]),
    "rules-unknown-rule": (lambda ws: ["compile", ws.model, "--rules",
                                       _rules(ws, '[[rule]]\nlayers = 0\nrule = "Nope()"\n'),
                                       "-o", ws.out / "m.onnx"], ["Nope"]),
    "rules-rule-not-a-string": (lambda ws: ["compile", ws.model, "--rules",
                                            _rules(ws, "[[rule]]\nlayers = 0\nrule = 5\n"),
                                            "-o", ws.out / "m.onnx"], ["rule"]),
    "rules-composite-not-a-string": (lambda ws: ["compile", ws.model, "--rules", _rules(ws, "composite = 5\n"),
                                                 "-o", ws.out / "m.onnx"], ["composite"]),
    "rules-file-missing": (lambda ws: ["compile", ws.model, "--rules", ws.root / "none.toml",
                                       "-o", ws.out / "m.onnx"], ["none.toml"]),
    "rules-file-is-a-directory": (lambda ws: ["compile", ws.model, "--rules", ws.root, "-o", ws.out / "m.onnx"], []),
    "compile-onto-a-directory": (lambda ws: ["compile", ws.model, "-o", ws.out], []),
    "target-out-of-range": (lambda ws: ["explain", ws.model, ws.batch, "-o", ws.out / "e", "--target", 99], ["99"]),
    "npy-of-the-wrong-shape": (lambda ws: ["explain", ws.model, _npy(ws, (2, 3, 9, 8)), "-o", ws.out / "e"],
                               ["(2, 3, 9, 8)"]),
    # one sample without its batch axis is fine ([3, 8, 8]); a rank that fits neither is not
    "npy-of-the-wrong-rank": (lambda ws: ["explain", ws.model, _npy(ws, (8, 8)), "-o", ws.out / "e"],
                              ["(8, 8)"]),
    "empty-batch": (lambda ws: ["explain", ws.model, _npy(ws, (0, 3, 8, 8)), "-o", ws.out / "e"], []),
    "input-not-npy": (lambda ws: ["explain", ws.model, ws.model, "-o", ws.out / "e"], [".npy"]),
    "input-npy-garbage": (lambda ws: ["explain", ws.model, _write(ws.root / "g.npy", "garbage"),
                                      "-o", ws.out / "e"], ["g.npy"]),
    "explain-into-a-file": (lambda ws: ["explain", ws.model, ws.batch, "-o", _existing_file(ws)], []),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_and_leaves_nothing_behind(cli, ws, case):
    make_argv, fragments = BAD_INPUT[case]
    argv = make_argv(ws)
    before = snapshot(ws.root)  # temp files go beside the output: watch the whole workspace
    result = cli(*argv)
    assert_one_error_line(result, *fragments)
    assert snapshot(ws.root) == before, "output files or temp files were left behind"


@pytest.mark.parametrize("command", ["compile", "check", "inspect"])
def test_unsupported_model_prints_the_table_then_one_error_line(cli, ws, command):
    argv = [command, ws.unsupported] + (["-o", ws.out / "m.onnx"] if command == "compile" else [])
    result = cli(*argv)
    assert_table_then_error_line(result)
    assert snapshot(ws.out) == {}


@pytest.mark.parametrize("command", ["compile", "check", "inspect", "explain"])
def test_every_command_reports_a_missing_model_the_same_way(cli, ws, command):
    extra = {"explain": [ws.batch, "-o", ws.out / "e"]}.get(command, [])
    result = cli(command, ws.root / "missing.onnx", *extra)
    assert_one_error_line(result, "missing.onnx", "no such file")


def test_failed_compile_leaves_the_existing_output_intact(cli, ws):
    target = ws.out / "model.lrp.onnx"
    target.write_bytes(b"the previous compiled model")
    for argv in (
        ["compile", ws.unsupported, "-o", target],
        ["compile", ws.model, "-c", "Composite(GlobalMap(FooRule()))", "-o", target],
        ["compile", ws.root / "missing.onnx", "-o", target],
    ):
        assert cli(*argv).code == USAGE_ERROR
        assert snapshot(ws.out) == {"model.lrp.onnx": b"the previous compiled model"}


def test_write_that_fails_halfway_leaves_the_existing_output_intact(cli, ws, monkeypatch):
    target = ws.out / "model.lrp.onnx"
    target.write_bytes(b"the previous compiled model")

    def save_half_then_fail(model, path, *args, **kwargs):
        data = model.SerializeToString()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", save_half_then_fail)
    result = cli("compile", ws.model, "-o", target)
    assert result.code != 0
    assert "Traceback" not in result.err and len(result.err_lines) == 1
    assert result.err_lines[0].startswith("lrpc:")
    assert snapshot(ws.out) == {"model.lrp.onnx": b"the previous compiled model"}


# -- the console script -------------------------------------------------------------------------------


def run_script(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LRPC_DEBUG"}
    env["COLUMNS"] = "200"
    return subprocess.run([str(LRPC_SCRIPT), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_console_script_compiles(ws):
    done = run_script("compile", "model.onnx", "-o", "out/model.lrp.onnx", cwd=ws.root)
    assert done.returncode == 0, done.stderr
    assert "relevance" in done.stdout
    assert run_onnx(ws.out / "model.lrp.onnx", np.load(ws.batch))["relevance"].shape == (3, 3, 8, 8)


@pytest.mark.parametrize(
    "argv",
    [
        ["compile", "missing.onnx"],
        ["compile", "model.onnx", "-c", "Composite(GlobalMap(EpsilonRule(1e-9))"],
        ["explain", "model.onnx", "batch.npy", "-o", "out/e", "--target", "99"],
    ],
    ids=["missing-model", "malformed-composite", "target-out-of-range"],
)
def test_console_script_prints_one_line_and_no_traceback(ws, argv):
    done = run_script(*argv, cwd=ws.root)
    result = Result(done.returncode, done.stdout, done.stderr)
    assert_one_error_line(result)
    assert snapshot(ws.out) == {}


def test_console_script_unsupported_model_prints_the_table_and_no_traceback(ws):
    done = run_script("compile", "unsupported.onnx", cwd=ws.root)
    assert_table_then_error_line(Result(done.returncode, done.stdout, done.stderr))
    assert not (ws.root / "unsupported.lrp.onnx").exists()
