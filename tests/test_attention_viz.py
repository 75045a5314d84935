"""attention_viz.py: rollout against a step-by-step numpy computation, peaked attention,
heatmaps for every pooling and grid, overlays, the figure and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import attention_viz as AV
from conftest import make_image
from transformer import VisionTransformer


def random_attention(layers=2, heads=2, tokens=5, seed=0) -> list[np.ndarray]:
    """Row-stochastic (1, heads, T, T) matrices with distinct entries."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        a = rng.random((1, heads, tokens, tokens)) + 0.05
        out.append(a / a.sum(axis=-1, keepdims=True))
    return out


def numpy_rollout(layers, fusion="mean", discard=0.0, prefix=1, pool="cls") -> np.ndarray:
    """Abnar & Zuidema's rollout written out with loops, for one sample."""
    T = layers[0].shape[-1]
    result = np.eye(T)
    for a in layers:
        heads = a[0]
        fused = np.zeros((T, T))
        for i in range(T):
            for j in range(T):
                values = [heads[h, i, j] for h in range(heads.shape[0])]
                fused[i, j] = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](values)
        if discard:
            k = int(np.floor(discard * T * T))
            order = [idx for idx in np.argsort(fused.ravel(), kind="stable") if idx != 0][:k]
            for idx in order:
                fused[idx // T, idx % T] = 0.0
        fused = fused + np.eye(T)
        for i in range(T):
            fused[i] = fused[i] / fused[i].sum()
        new = np.zeros((T, T))
        for i in range(T):
            for j in range(T):
                new[i, j] = sum(fused[i, m] * result[m, j] for m in range(T))
        result = new
    if pool == "cls" and prefix:
        row = result[0, prefix:]
    else:
        row = result[prefix:, prefix:].mean(axis=0)
    return row / row.max()


def test_rollout_hand_computed_two_layers_two_heads_five_tokens():
    # Layer 1: both heads uniform (0.2 everywhere), so head fusion gives 0.2 everywhere;
    # + I, row sums 2 -> A1 = 0.1 off the diagonal, 0.6 on it.
    # Layer 2: head 1 sends every token to patch 1 (token 1), head 2 to patch 4 (token 4);
    # mean 0.5 on tokens 1 and 4; + I, row sums 2 -> A2 row 0 = [0.5, 0.25, 0, 0, 0.25].
    # Rollout row 0 = A2[0] @ A1 = 0.5*[.6,.1,.1,.1,.1] + 0.25*[.1,.6,.1,.1,.1]
    #                              + 0.25*[.1,.1,.1,.1,.6] = [.35, .225, .1, .1, .225]
    # Patches [.225, .1, .1, .225] / .225 = [1, 4/9, 4/9, 1].
    uniform = torch.full((1, 2, 5, 5), 0.2)
    focused = torch.zeros(1, 2, 5, 5)
    focused[0, 0, :, 1] = 1.0
    focused[0, 1, :, 4] = 1.0
    got = AV.rollout([uniform, focused])
    torch.testing.assert_close(got, torch.tensor([[1.0, 4 / 9, 4 / 9, 1.0]]))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.3])
def test_rollout_matches_numpy_loops(fusion, discard):
    layers = random_attention()
    got = AV.rollout([torch.tensor(a) for a in layers], fusion, discard)
    expected = numpy_rollout(layers, fusion, discard)
    assert got.shape == (1, 4)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-5)
    assert got.max() == pytest.approx(1.0)


@pytest.mark.parametrize("prefix,pool", [(1, "mean"), (0, "seq"), (2, "cls")])
def test_rollout_pooling_and_prefix_tokens(prefix, pool):
    layers = random_attention(layers=3, heads=2, tokens=4 + prefix, seed=prefix)
    got = AV.rollout([torch.tensor(a) for a in layers], num_prefix_tokens=prefix, pool=pool)
    np.testing.assert_allclose(
        got[0].numpy(), numpy_rollout(layers, prefix=prefix, pool=pool), rtol=1e-5
    )


def test_rollout_is_batched_and_rejects_bad_options():
    a = [torch.tensor(x) for x in random_attention(seed=1)]
    b = [torch.tensor(x) for x in random_attention(seed=2)]
    both = AV.rollout([torch.cat([x, y]) for x, y in zip(a, b, strict=True)])
    torch.testing.assert_close(both, torch.cat([AV.rollout(a), AV.rollout(b)]))
    with pytest.raises(ValueError, match="head_fusion"):
        AV.rollout(a, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        AV.rollout(a, discard_ratio=1.0)
    with pytest.raises(ValueError, match="at least one layer"):
        AV.rollout([])


class LooksAtOnePatch(nn.Module):
    """A stand-in ViT whose every token attends only to patch `target`."""

    def __init__(self, grid=(4, 4), target=6, depth=3, heads=2, num_classes=3):
        super().__init__()
        self.grid_size, self.num_prefix_tokens, self.pool = grid, 1, "cls"
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(depth))
        self.head = nn.Linear(3, num_classes)
        self.target, self.heads = target, heads

    def forward(self, x, return_attention=False):
        B = x.shape[0]
        T = 1 + self.grid_size[0] * self.grid_size[1]
        attn = torch.zeros(B, self.heads, T, T)
        attn[..., 1 + self.target] = 1.0
        logits = self.head(x.mean(dim=(2, 3)))
        return (logits, [attn] * len(self.blocks)) if return_attention else logits


def test_attention_on_one_patch_peaks_there():
    model = LooksAtOnePatch(target=6)  # row 1, column 2 of the 4x4 grid
    logits, heatmaps = AV.attention_map(model, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    assert heatmaps.shape == (2, 32, 32)
    for heat in heatmaps:
        cell = heat.reshape(4, 8, 4, 8).mean(axis=(1, 3))  # mean per 8x8 patch
        assert np.unravel_index(cell.argmax(), cell.shape) == (1, 2)
        assert heat[12, 20] == pytest.approx(1.0)  # the patch's centre
        assert heat[8:16, 16:24].mean() > 3 * np.delete(cell.ravel(), 6).max()
        assert heat[24:, :8].max() == 0.0  # far from the patch: nothing
    mask = AV.rollout(model(torch.zeros(1, 3, 32, 32), return_attention=True)[1])
    expected = torch.zeros(1, 16)
    expected[0, 6] = 1.0
    torch.testing.assert_close(mask, expected)


@pytest.mark.parametrize(
    "image_size,patch_size,pool,distilled",
    [(16, 4, "cls", False), (24, 8, "mean", False), (32, 8, "seq", False), (20, 4, "cls", True)],
)
def test_attention_map_on_real_vits(image_size, patch_size, pool, distilled):
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=image_size, patch_size=patch_size, num_classes=5, embed_dim=16, depth=2,
        num_heads=2, pool=pool, distilled=distilled,
    )  # fmt: skip
    model.train()  # attention_map must evaluate in eval mode and give the mode back
    x = torch.randn(3, 3, image_size, image_size)
    logits, heatmaps = AV.attention_map(model, x, head_fusion="max", discard_ratio=0.5)
    assert model.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    assert heatmaps.shape == (3, image_size, image_size)
    assert heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() == pytest.approx(1.0)


def test_attention_map_refuses_a_cnn():
    import torchvision

    with pytest.raises(NotImplementedError, match="Vision Transformer"):
        AV.attention_map(torchvision.models.resnet18(num_classes=2), torch.zeros(1, 3, 32, 32))


def test_overlay_blends_and_keeps_the_image_size():
    image = Image.new("RGB", (40, 30), (0, 255, 0))
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[:2, :2] = 1.0
    out = AV.overlay(image, heat, alpha=0.5)
    assert out.size == (40, 30) and out.mode == "RGB"
    assert AV.overlay(image, heat, alpha=0.0).tobytes() == image.tobytes()
    full = np.asarray(AV.overlay(image, heat, alpha=1.0, cmap="gray", center_crop=False))
    assert full[0, 0].tolist() == [255, 255, 255] and full[-1, -1].tolist() == [0, 0, 0]
    # center_crop: the heatmap covers the central 30x30 square; the 5-pixel side bands,
    # unseen by the model, get the colormap's zero.
    cropped = np.asarray(AV.overlay(image, heat, alpha=1.0, cmap="gray"))
    assert cropped[:, :5].max() == 0 and cropped[0, 5].tolist() == [255, 255, 255]


def test_overlay_blend_equals_the_hand_computation():
    """alpha x colour + (1 - alpha) x image, rounded; gray colours are the heat level."""
    pixels = np.array([[[12, 40, 200], [201, 101, 52]], [[0, 0, 0], [255, 255, 255]]], np.uint8)
    heat = np.array([[0.0, 1.0], [0.4, 0.2]], dtype=np.float32)  # levels 0, 255, 102, 51
    out = np.asarray(AV.overlay(Image.fromarray(pixels), heat, alpha=0.3, cmap="gray"))
    # (0, 1): 0.3 * 255 + 0.7 * (201, 101, 52) = (217.2, 147.2, 112.9)
    # (1, 0): 0.3 * 102 + 0 = 30.6; (1, 1): 0.3 * 51 + 0.7 * 255 = 193.8
    expected = [[[8, 28, 140], [217, 147, 113]], [[31, 31, 31], [194, 194, 194]]]
    assert out.tolist() == expected
    # OpenCV's jet: level 0 is dark blue (0, 0, 128), level 255 dark red (128, 0, 0).
    grey = Image.new("RGB", (2, 1), (100, 100, 100))
    jet = np.asarray(AV.overlay(grey, np.array([[0.0, 1.0]]), alpha=0.5, center_crop=False))
    assert jet.tolist() == [[[50, 50, 114], [114, 50, 50]]]
    # cv2.resize, bilinear: a 2-pixel ramp to 4 pixels is 0, 1/4, 3/4, 1 (levels 64, 191).
    black = Image.new("RGB", (4, 1))
    ramp = AV.overlay(black, np.array([[0.0, 1.0]]), alpha=1.0, cmap="gray", center_crop=False)
    ramp = np.asarray(ramp)
    assert ramp[0, :, 0].tolist() == [0, 64, 191, 255]


def test_overlay_options_are_checked():
    image = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="opacity"):
        AV.overlay(image, np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(ValueError, match="not one of gray, jet"):
        AV.overlay(image, np.zeros((2, 2)), cmap="rainbow-ish")
    table = AV.colormap_table("jet")
    assert table.shape == (256, 3) and table[0].tolist() == [0, 0, 128]


def test_explain_and_figure_on_the_smoke_model(smoke_model, tmp_path):
    from checkpoint import load_model

    model, ckpt = load_model(smoke_model)
    image = Image.open(make_image(tmp_path / "x.png", 1, size=24))
    explanation = AV.explain(model, image, ckpt["preprocessing"], ckpt["classes"])
    size = ckpt["preprocessing"]["image_size"]
    assert explanation.heatmap.shape == (size, size)
    assert explanation.image.size == (24, 24)
    assert explanation.overlay.size == (24, 24)
    depth = ckpt["config"]["depth"]
    grid = size // ckpt["config"]["patch_size"]
    assert explanation.layer_maps.shape == (depth, grid, grid)
    probs = [p for _, p in explanation.top]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    photo = Image.new("RGB", (2000, 1200), (200, 30, 30))  # landscape: its central square
    big = AV.explain(model, photo, ckpt["preprocessing"], ckpt["classes"])
    assert big.image.size == (AV.DISPLAY_MAX, AV.DISPLAY_MAX) == big.overlay.size
    path = AV.save_figure(explanation, tmp_path / "fig.png", title="x.png")
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    assert pixels.var() > 0
    # The colour bar: the overlay's own colours, from 0 to 1.
    fig = AV.figure(explanation)
    (bar,) = [ax for ax in fig.axes if ax.get_ylabel() == AV.COLORBAR_LABEL]
    (mappable,) = [c for c in bar.collections if c.get_array() is not None]  # the colour strip
    np.testing.assert_allclose(
        mappable.cmap(np.linspace(0, 1, 256))[:, :3], AV.colormap_table("jet") / 255.0
    )
    assert (mappable.norm.vmin, mappable.norm.vmax) == (0.0, 1.0)


def test_cli_writes_the_figure_and_explains_errors(smoke_model, tmp_path, capsys):
    image = make_image(tmp_path / "digit.png", 2, size=16)
    out = tmp_path / "attn.png"
    argv = ["--image", str(image), "--out", str(out), "--model-path", str(smoke_model)]
    assert AV.main(argv) == 0
    assert Image.open(out).size[0] > 200
    assert "attention figure in" in capsys.readouterr().out
    assert (
        AV.main(["--image", str(tmp_path / "missing.png"), "--model-path", str(smoke_model)]) == 2
    )
    assert "missing.png: no such file" in capsys.readouterr().err
    (tmp_path / "junk.png").write_text("not an image")
    assert AV.main(["--image", str(tmp_path / "junk.png"), "--model-path", str(smoke_model)]) == 2
    assert "not an image file" in capsys.readouterr().err
    assert AV.main(["--image", str(image), "--alpha", "2"]) == 2
    assert "--alpha must be in [0, 1]; got 2.0" in capsys.readouterr().err
