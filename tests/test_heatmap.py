"""Vision and text heatmaps: VisionHeatmaps' conventions, checked against hand-computed colours.

matplotlib's ``bwr`` is a 256-entry table from blue (0, 0, 1) through white to red (1, 0, 0);
a value v in [0, 1] picks entry ``min(int(v * 256), 255)``, whose colour is the ramp at
``entry / 255``. So 0 -> (0, 0, 255), 0.25 -> (128, 128, 255), 1/3 -> (170, 170, 255),
0.5 -> (255, 254, 254) (entry 128 is just past white), 2/3 -> (255, 170, 170),
0.75 -> (255, 126, 126), 1 -> (255, 0, 0).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import lrpc
from lrpc.errors import LrpcError
from lrpc.heatmap import (
    TextHeatmap,
    encode_png,
    heatmap,
    overlay_image,
    range_scale,
    reduce_channels,
    save_png,
    text_heatmap,
)

BLUE, RED = (0, 0, 255), (255, 0, 0)
BWR = {0.0: BLUE, 0.25: (128, 128, 255), 1 / 3: (170, 170, 255), 0.5: (255, 254, 254),
       2 / 3: (255, 170, 170), 0.75: (255, 126, 126), 1.0: RED}
MID = BWR[0.5]


def colours(image: np.ndarray) -> list[list[tuple[int, ...]]]:
    return [[tuple(int(c) for c in px) for px in row] for row in image]


# -- vision: range scaling and colours ---------------------------------------------------------------


def test_centered_puts_zero_at_the_middle_and_the_largest_magnitude_at_an_end():
    # peak |value| is 6: v -> 0.5 + v / 12
    [image] = heatmap(np.array([[[-2.0, 0.0], [6.0, 2.0]]]))
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    assert colours(image) == [[BWR[1 / 3], MID], [RED, BWR[2 / 3]]]


def test_extrema_spans_min_to_max():
    # min -2, max 6: v -> (v + 2) / 8
    [image] = heatmap(np.array([[[-2.0, 0.0], [6.0, 2.0]]]), rangescale="extrema")
    assert colours(image) == [[BLUE, BWR[0.25]], [RED, MID]]


def test_each_sample_is_scaled_on_its_own():
    maps = np.array([[[-4.0, 0.0], [2.0, 4.0]], [[0.0, 0.0], [0.0, 100.0]]])
    first, second = heatmap(maps)
    assert colours(first) == [[BLUE, MID], [BWR[0.75], RED]]
    assert colours(second) == [[MID, MID], [MID, RED]]


def test_constant_maps():
    # all zero: the middle colour either way; a positive constant is all red when centered
    # (it is positive relevance) and the middle colour for extrema (no range to span)
    for mode, value, colour in [("centered", 0.0, MID), ("extrema", 0.0, MID), ("centered", 3.0, RED),
                                ("extrema", 3.0, MID)]:
        [image] = heatmap(np.full((1, 3, 2), value), rangescale=mode)
        assert {tuple(px) for px in image.reshape(-1, 3)} == {colour}, (mode, value)


def test_range_scale_values():
    maps = np.array([[[-2.0, 0.0], [6.0, 2.0]]])
    np.testing.assert_allclose(range_scale(maps, "centered"), [[[1 / 3, 0.5], [1.0, 2 / 3]]])
    np.testing.assert_allclose(range_scale(maps, "extrema"), [[[0.0, 0.25], [1.0, 0.5]]])


# -- vision: channel reductions and layouts ----------------------------------------------------------

# one sample, two channels, 2x2
CHANNELS = np.array([[[[1.0, -3.0], [0.0, 2.0]], [[-1.0, 4.0], [0.0, -2.0]]]])
REDUCED = {
    "sum": [[0.0, 1.0], [0.0, 0.0]],
    "norm": [[np.sqrt(2), 5.0], [0.0, np.sqrt(8)]],
    "maxabs": [[1.0, 4.0], [0.0, 2.0]],
}


@pytest.mark.parametrize("reduce", list(REDUCED))
def test_reductions_over_channels(reduce):
    np.testing.assert_allclose(reduce_channels(CHANNELS, reduce)[0], REDUCED[reduce])


@pytest.mark.parametrize("reduce", list(REDUCED))
def test_channels_last_gives_the_same_maps(reduce):
    nhwc = CHANNELS.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(reduce_channels(nhwc, reduce, channels_last=True)[0], REDUCED[reduce])
    assert colours(heatmap(nhwc, reduce=reduce, channels_last=True)[0]) == colours(heatmap(CHANNELS, reduce=reduce)[0])


def test_maxabs_heatmap_colours():
    # maxabs [[1, 4], [0, 2]] is >= 0: centered maps it to 0.625, 1, 0.5, 0.75;
    # 0.625 picks entry 160 -> green and blue 1 - 2 * (160/255 - 0.5) = 190/255
    [image] = heatmap(CHANNELS, reduce="maxabs")
    assert colours(image) == [[(255, 190, 190), RED], [MID, BWR[0.75]]]


def test_three_dimensional_relevance_is_one_channel():
    maps = np.array([[[-1.0, 2.0]]])
    np.testing.assert_allclose(reduce_channels(maps, "sum"), maps)
    np.testing.assert_allclose(reduce_channels(maps, "norm"), np.abs(maps))
    np.testing.assert_allclose(reduce_channels(maps, "maxabs"), np.abs(maps))


def test_an_explanation_is_accepted_and_sizes_match_the_relevance():
    val = np.random.default_rng(0).standard_normal((3, 3, 5, 7)).astype(np.float32)
    expl = lrpc.Explanation(val, np.zeros((3, 10)), np.zeros(3, np.int64))
    images = heatmap(expl)
    assert len(images) == 3 and all(img.shape == (5, 7, 3) and img.dtype == np.uint8 for img in images)
    assert all(len({tuple(px) for px in img.reshape(-1, 3)}) > 1 for img in images)


# -- vision: colormaps --------------------------------------------------------------------------------


def test_any_matplotlib_colormap_by_name_or_object():
    from matplotlib import colormaps

    maps = np.array([[[-1.0, 0.0, 1.0]]])
    [image] = heatmap(maps, colormap="viridis")
    # viridis runs from dark purple (68, 1, 84) to yellow (253, 231, 37)
    assert tuple(image[0, 0]) == (68, 1, 84) and tuple(image[0, 2]) == (253, 231, 37)
    [same] = heatmap(maps, colormap=colormaps["viridis"])
    np.testing.assert_array_equal(image, same)
    [seismic] = heatmap(maps, colormap="seismic")
    assert not np.array_equal(seismic, heatmap(maps)[0])


def test_unknown_colormap_suggests_close_names():
    with pytest.raises(LrpcError, match=r"unknown colormap 'bwrr' \(did you mean .*bwr"):
        heatmap(np.zeros((1, 2, 2)), colormap="bwrr")
    with pytest.raises(LrpcError, match="unknown colormap 'zzzzzz'"):
        heatmap(np.zeros((1, 2, 2)), colormap="zzzzzz")


@pytest.mark.parametrize(
    ("kwargs", "relevance", "message"),
    [
        ({"reduce": "mean"}, np.zeros((1, 2, 2, 2)), "unknown channel reduction 'mean'"),
        ({"rangescale": "minmax"}, np.zeros((1, 2, 2)), "unknown rangescale 'minmax'"),
        ({}, np.zeros((4, 10)), r"\(4, 10\)"),
        ({}, np.zeros((1, 1, 2, 2, 2)), r"\(1, 1, 2, 2, 2\)"),
        ({}, np.array([[[np.nan, 1.0]]]), "NaN"),
        ({}, np.array([[["a", "b"]]], dtype=object), "numeric"),
    ],
    ids=["reduce", "rangescale", "2-d", "5-d", "nan", "not-numeric"],
)
def test_bad_arguments_are_one_clear_error(kwargs, relevance, message):
    with pytest.raises(LrpcError, match=message):
        heatmap(relevance, **kwargs)


# -- vision: overlays --------------------------------------------------------------------------------


def test_overlay_alpha_one_is_the_heatmap_and_zero_the_image():
    relevance = np.array([[[[-4.0, 0.0], [2.0, 4.0]]]])  # [1, 1, 2, 2]
    pixels = np.array([[[[0, 51], [204, 255]]]], dtype=np.uint8)
    plain = heatmap(relevance)[0]
    np.testing.assert_array_equal(heatmap(relevance, overlay=pixels, alpha=1.0)[0], plain)
    under = heatmap(relevance, overlay=pixels, alpha=0.0)[0]
    np.testing.assert_array_equal(under, np.repeat(pixels[0, 0][..., None], 3, axis=-1))


def test_overlay_blends_by_alpha():
    relevance = np.array([[[[-4.0, 0.0], [2.0, 4.0]]]])
    black = np.zeros((1, 1, 2, 2), dtype=np.uint8)
    half = heatmap(relevance, overlay=black, alpha=0.5)[0]
    # Pillow blends in integers and truncates: within one level of the rounded value
    np.testing.assert_allclose(half, (heatmap(relevance)[0] / 2).round(), atol=1)


def test_overlay_in_channels_last_layout_rgb():
    relevance = np.zeros((1, 2, 2, 3))
    rgb = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    rgb[0, 0, 0] = (255, 0, 0)
    [image] = heatmap(relevance, overlay=rgb, alpha=0.0, channels_last=True)
    assert tuple(image[0, 0]) == (255, 0, 0) and tuple(image[1, 1]) == (0, 0, 0)


def test_overlay_of_normalized_floats_is_stretched_to_its_range():
    relevance = np.zeros((1, 1, 1, 3))
    standardized = np.array([[[[-1.5, 0.0, 1.5]]]])  # outside [0, 1]: min..max -> black..white
    [image] = heatmap(relevance, overlay=standardized, alpha=0.0)
    assert [tuple(px) for px in image[0]] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    in_range = np.array([[[[0.2, 0.2, 0.2]]]])  # already in [0, 1]: kept as is
    assert tuple(heatmap(relevance, overlay=in_range, alpha=0.0)[0][0, 0]) == (51, 51, 51)


def test_one_overlay_without_batch_axis():
    [image] = heatmap(np.zeros((1, 2, 2)), overlay=np.full((2, 2), 255, np.uint8), alpha=0.0)
    assert (image == 255).all()


def test_overlay_shape_errors():
    with pytest.raises(LrpcError, match="overlay"):
        heatmap(np.zeros((2, 1, 4, 4)), overlay=np.zeros((3, 1, 4, 4)))
    with pytest.raises(LrpcError, match="4x4"):
        heatmap(np.zeros((1, 1, 4, 4)), overlay=np.zeros((1, 1, 5, 5)))
    with pytest.raises(LrpcError, match="alpha"):
        overlay_image(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(LrpcError, match=r"\[H, W\]"):
        overlay_image(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 5)))


# -- PNG files ----------------------------------------------------------------------------------------------


def test_save_png_scales_by_nearest_neighbour_and_leaves_no_temp_file(tmp_path):
    [image] = heatmap(np.array([[[-1.0, 1.0]]]))
    path = save_png(image, tmp_path / "h.png", scale=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png"]
    with Image.open(path) as png:
        assert png.size == (6, 3)
        pixels = np.asarray(png.convert("RGB"))
    assert {tuple(px) for px in pixels[:, :3].reshape(-1, 3)} == {BLUE}
    assert {tuple(px) for px in pixels[:, 3:].reshape(-1, 3)} == {RED}
    with pytest.raises(LrpcError, match="scale"):
        encode_png(image, 0)


# -- text ------------------------------------------------------------------------------------------------------

TOKENS = ["good", "<b>&", "bad"]


def test_text_heatmap_colours_follow_the_relevance():
    text = text_heatmap(TOKENS, [2.0, 0.0, -1.0])  # centered: 1, 0.5, 0.25
    assert isinstance(text, TextHeatmap)
    assert text.colors == (RED, MID, BWR[0.25])
    extrema = text_heatmap(TOKENS, [2.0, 0.0, -2.0], rangescale="extrema")
    assert extrema.colors == (RED, MID, BLUE)


def test_text_heatmap_html_is_one_escaped_span_per_token():
    page = text_heatmap(TOKENS, [2.0, 0.0, -1.0]).to_html()
    assert page.startswith("<div") and page.endswith("</div>")
    assert page.count("<span ") == 3 and page.count("</span>") == 3
    assert "&lt;b&gt;&amp;" in page and "<b>" not in page
    assert '<span style="background-color:#ff0000;color:#ffffff" title="2">good</span>' in page
    assert '<span style="background-color:#fffefe;color:#000000" title="0">&lt;b&gt;&amp;</span>' in page
    assert 'style="background-color:#8080ff;' in page
    assert text_heatmap(TOKENS, [1.0, 0.0, -1.0])._repr_html_().count("<span ") == 3


def test_text_heatmap_escapes_quotes_in_tokens():
    page = text_heatmap(['say "hi"', "it's"], [1.0, -1.0]).to_html()
    assert "&quot;hi&quot;" in page and "it&#x27;s" in page


def test_text_heatmap_in_the_terminal():
    from rich.console import Console
    from rich.text import Text

    heat = text_heatmap(TOKENS, [2.0, 0.0, -1.0])
    text = heat.to_terminal()
    assert isinstance(text, Text) and isinstance(heat.__rich__(), Text)
    assert text.plain == "good <b>& bad" == str(heat)
    console = Console(force_terminal=True, color_system="truecolor", width=80, record=True)
    console.print(text_heatmap(["[red]x", "y"], [1.0, -1.0]))
    assert console.export_text(clear=False) == "[red]x y\n"  # markup in tokens is printed, not interpreted
    console.print(heat)
    ansi = console.export_text(styles=True)
    assert "48;2;255;0;0mgood" in ansi and "48;2;128;128;255mbad" in ansi  # red and light-blue backgrounds


def test_text_heatmap_takes_an_explanation_of_one_sequence():
    embeddings = np.array([[[1.0, 1.0], [0.0, 0.0], [-1.0, 0.0]]])  # [1, T, D]: summed over D
    expl = lrpc.Explanation(embeddings, np.zeros((1, 2)), np.zeros(1, np.int64))
    assert text_heatmap(TOKENS, expl).colors == (RED, MID, BWR[0.25])
    np.testing.assert_allclose(text_heatmap(TOKENS, [[2.0, 0.0, -1.0]]).relevance, [2.0, 0.0, -1.0])
    assert text_heatmap([], []).to_html() == '<div class="lrpc-text-heatmap" style="line-height:1.8"></div>'


@pytest.mark.parametrize(
    ("tokens", "relevance", "message"),
    [
        (TOKENS, [1.0, 2.0], "3 token"),
        ("one string", [1.0], "split it"),
        (TOKENS, np.zeros((2, 3, 4)), "one relevance value per token"),
    ],
    ids=["count", "string", "shape"],
)
def test_text_heatmap_errors(tokens, relevance, message):
    with pytest.raises(LrpcError, match=message):
        text_heatmap(tokens, relevance)
    with pytest.raises(LrpcError, match="unknown colormap"):
        text_heatmap(TOKENS, [1.0, 2.0, 3.0], colormap="nope")
