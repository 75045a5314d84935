"""The ViT against timm's reference implementation, its two attention paths, its variants
(conv tokenizer, sequence pooling, sin-cos positions, distillation token) and its presets."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from attention import Attention
from config import PRESETS, Config
from embeddings import ConvTokenizer, resize_pos_embed, sincos_pos_embed
from transformer import VisionTransformer, build_model, count_parameters

SHAPE_KEYS = (
    "image_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
)
SHAPES = [
    dict(zip(SHAPE_KEYS, values, strict=True))
    for values in [
        (32, 8, 48, 2, 3, 4.0, True),
        (24, 4, 32, 3, 4, 2.0, False),
        (16, 16, 64, 1, 8, 1.5, True),  # a single patch
        (28, 7, 36, 2, 6, 3.0, False),
    ]
]
POOLS = [("cls", "token"), ("mean", "avg")]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (biases, norms, tokens), so a swapped or ignored tensor
    shows up in the logits; the default init leaves biases at 0 and norms at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return model


def timm_kwargs(shape: dict) -> dict:
    return dict(
        img_size=shape["image_size"],
        patch_size=shape["patch_size"],
        embed_dim=shape["embed_dim"],
        depth=shape["depth"],
        num_heads=shape["num_heads"],
        mlp_ratio=shape["mlp_ratio"],
        qkv_bias=shape["qkv_bias"],
    )


def tiny(**kw) -> VisionTransformer:
    args = dict(image_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    return VisionTransformer(**{**args, **kw})


def images(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- equivalence with timm ------------------------------------------------------------------


@pytest.mark.parametrize("pool,global_pool", POOLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['image_size']}p{s['patch_size']}")
def test_same_logits_as_timm(shape, pool, global_pool):
    torch.manual_seed(0)
    ours = randomize(VisionTransformer(num_classes=7, pool=pool, **shape)).eval()
    ref = TimmViT(num_classes=7, global_pool=global_pool, **timm_kwargs(shape)).eval()
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    ref.load_state_dict(ours_sd, strict=True)
    x = images(4, shape["image_size"])
    with torch.no_grad():
        ours_logits, ref_logits = ours(x), ref(x)
    assert ours_logits.shape == (4, 7)
    assert ours_logits.abs().max() > 1e-3  # not trivially equal
    assert torch.allclose(ours_logits, ref_logits, atol=1e-5), (
        (ours_logits - ref_logits).abs().max()
    )


def test_distilled_matches_timm_deit():
    ours = randomize(tiny(distilled=True)).eval()
    ref = VisionTransformerDistilled(
        img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=2
    ).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_distilled_forward_is_mean_of_both_heads():
    model = randomize(tiny(distilled=True), seed=3).eval()
    assert model.num_prefix_tokens == 2
    x = images()
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        cls_logits = model.head(tokens[:, 0])
        dist_logits = model.head_dist(tokens[:, 1])
        out = model(x)
    assert not torch.allclose(cls_logits, dist_logits)
    assert torch.allclose(out, (cls_logits + dist_logits) / 2, atol=1e-6)


# ---- attention paths ------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["cls", "mean", "seq"])
def test_fused_and_explicit_attention_give_same_logits(pool):
    fused = randomize(tiny(pool=pool, fused_attn=True)).eval()
    explicit = tiny(pool=pool, fused_attn=False).eval()
    explicit.load_state_dict(fused.state_dict())
    x = images()
    with torch.no_grad():
        a = fused(x)
        b = explicit(x)
        for module in fused.modules():  # the switch on a live model, timm-style
            if isinstance(module, Attention):
                module.fused_attn = False
        c = fused(x)
    assert all(not m.fused_attn for m in explicit.modules() if isinstance(m, Attention))
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, c, atol=1e-5)


@pytest.mark.parametrize("distilled", [False, True])
def test_return_attention_shapes_rows_and_logits(distilled):
    model = randomize(tiny(depth=3, num_heads=4, distilled=distilled)).eval()
    x = images(2)
    with torch.no_grad():
        plain = model(x)
        logits, attentions = model(x, return_attention=True)
    tokens = 16 + 1 + int(distilled)
    assert isinstance(attentions, list) and len(attentions) == 3
    for attn in attentions:
        assert attn.shape == (2, 4, tokens, tokens)
        assert (attn >= 0).all()
        assert torch.allclose(attn.sum(-1), torch.ones(2, 4, tokens), atol=1e-5)
    assert torch.allclose(logits, plain, atol=1e-5)
    # The weights differ between blocks: each block reports its own attention.
    assert not torch.allclose(attentions[0], attentions[1])


def test_explicit_attention_matches_manual_softmax():
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, fused_attn=False).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        out, weights = attn(x, return_attention=True)
        q, k, v = attn.qkv(x).reshape(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        expected_w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
        expected = attn.proj((expected_w @ v).transpose(1, 2).reshape(1, 5, 8))
    assert torch.allclose(weights, expected_w, atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-6)


# ---- learning -------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny(image_size=8, patch_size=4, num_classes=4, drop_path_rate=0.0)
    x = images(8, 8, seed=1)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert (logits.argmax(1) == y).all()
    assert nn.functional.cross_entropy(logits, y).item() < 0.05


@pytest.mark.parametrize(
    "kw",
    [
        dict(pool="cls"),
        dict(pool="mean"),
        dict(pool="seq"),
        dict(pool="cls", distilled=True),
        dict(tokenizer="conv", pool="seq"),
        dict(pos_embed="sincos"),
        dict(qkv_bias=False),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_every_parameter_gets_a_gradient(kw):
    torch.manual_seed(0)
    model = tiny(**kw).train()
    loss = nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # Sequence pooling's score bias shifts every token's score alike and softmax ignores a
    # shift, so its gradient is zero up to rounding (exactly zero on some CPUs).
    if "attn_pool.bias" in grads:
        assert grads.pop("attn_pool.bias").abs().max() < 1e-6
    dead = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert dead == []


# ---- variants -------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size,patch_size", [(32, 4), (16, 8), (16, 2), (8, 1)])
def test_conv_tokenizer_token_count(image_size, patch_size):
    tok = ConvTokenizer(image_size=image_size, patch_size=patch_size, embed_dim=16)
    grid = image_size // patch_size
    assert tok.grid_size == (grid, grid)
    out = tok(images(2, image_size))
    assert out.shape == (2, grid * grid, 16)
    model = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_classes=3,
        embed_dim=16,
        depth=1,
        num_heads=2,
        tokenizer="conv",
    ).eval()
    assert model.pos_embed.shape == (1, 1 + grid * grid, 16)
    with torch.no_grad():
        logits, attentions = model(images(2, image_size), return_attention=True)
    assert logits.shape == (2, 3)
    assert attentions[0].shape[-1] == 1 + grid * grid


@pytest.mark.parametrize("patch_size", [1, 4])
def test_conv_tokenizer_pooling_before_relu_is_ccts_order_exactly(patch_size):
    """The forward pass pools before each ReLU (a quarter of the elements); proj, CCT's
    conv-ReLU-pool order (the one ONNX export keeps), gives the same tokens and the same
    weight gradients, bit for bit."""
    torch.manual_seed(0)
    tok = ConvTokenizer(image_size=32, patch_size=patch_size, embed_dim=16)
    expected = ["Conv2d", "ReLU", "MaxPool2d"] * 2 if patch_size == 4 else ["Conv2d", "ReLU"]
    assert [type(m).__name__ for m in tok.proj] == expected
    x = images(4, 32)
    outs, grads = [], []

    def ccts_order(x):  # what ONNX export runs
        x = tok.proj(x.contiguous(memory_format=torch.channels_last))
        return x.permute(0, 2, 3, 1).flatten(1, 2)

    for forward in (tok, ccts_order):
        tok.zero_grad()
        out = forward(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in tok.parameters()])
    assert outs[0].shape == (4, (32 // patch_size) ** 2, 16)
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_conv_tokenizer_refuses_non_power_of_two_patch():
    with pytest.raises(ValueError, match="power-of-two"):
        ConvTokenizer(image_size=24, patch_size=3, embed_dim=16)


def test_seq_pool_has_no_class_token_and_weights_sum_to_one():
    model = randomize(tiny(pool="seq")).eval()
    assert model.cls_token is None
    assert "cls_token" not in model.state_dict()
    assert model.num_prefix_tokens == 0
    assert model.pos_embed.shape == (1, 16, 32)
    x = images(3)
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        assert tokens.shape == (3, 16, 32)
        weights = model.sequence_pool_weights(tokens)
        assert weights.shape == (3, 16, 1)
        assert torch.allclose(weights.sum(dim=1), torch.ones(3, 1), atol=1e-6)
        assert not torch.allclose(weights, torch.full_like(weights, 1 / 16))  # learned, not mean
        pooled = (weights * tokens).sum(dim=1)
        assert torch.allclose(model(x), model.head(pooled), atol=1e-6)


def test_mean_pool_uses_patch_tokens_only():
    model = randomize(tiny(pool="mean")).eval()
    x = images(2)
    with torch.no_grad():
        tokens, _ = model.forward_features(x)
        expected = model.head(model.fc_norm(tokens[:, 1:].mean(dim=1)))
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_sincos_matches_hand_computed_values():
    # embed_dim 8: omega = 1 / 10000 ** (k / 2) for k = 0, 1 -> (1, 1/100); the first half
    # encodes the row (sin, sin, cos, cos), the second half the column; tokens in row-major
    # order as the patch conv flattens them.
    table = sincos_pos_embed(8, (2, 3))
    assert table.shape == (6, 8)
    for token in range(6):
        row, col = divmod(token, 3)
        expected = []
        for pos in (row, col):
            expected += [math.sin(pos), math.sin(pos / 100), math.cos(pos), math.cos(pos / 100)]
        assert torch.allclose(table[token], torch.tensor(expected), atol=1e-6), token


def test_sincos_model_uses_fixed_table_with_zero_prefix():
    model = tiny(pos_embed="sincos")
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()  # fixed: rebuilt, never stored
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))
    assert torch.equal(model.pos_embed[0, 1:], sincos_pos_embed(32, (4, 4)))


def test_resize_pos_embed_same_size_is_exact():
    pos = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resize_pos_embed(pos, (4, 4), num_prefix_tokens=1), pos)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("new_grid", [(6, 6), (3, 3), (4, 6)])
def test_resize_pos_embed_keeps_prefix_and_matches_timm(prefix, new_grid):
    pos = torch.randn(1, prefix + 16, 8, generator=torch.Generator().manual_seed(1))
    out = resize_pos_embed(pos, new_grid, num_prefix_tokens=prefix)
    assert out.shape == (1, prefix + new_grid[0] * new_grid[1], 8)
    assert torch.equal(out[:, :prefix], pos[:, :prefix])
    ref = resample_abs_pos_embed(
        pos, list(new_grid), num_prefix_tokens=prefix, interpolation="bicubic", antialias=False
    )
    assert torch.allclose(out, ref, atol=1e-6)


def test_resize_pos_embed_keeps_constant_grid_constant():
    pos = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 9, 4), 0.25)], dim=1)
    out = resize_pos_embed(pos, (5, 5))
    assert torch.equal(out[:, :1], pos[:, :1])
    assert torch.allclose(out[:, 1:], torch.full((1, 25, 4), 0.25), atol=1e-6)


# ---- presets --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["digits", "smoke", "cifar10", "cifar10-gpu"])
def test_build_model_from_preset_has_preset_shapes(preset):
    cfg = Config.from_dict(PRESETS[preset]())
    model = build_model(cfg, num_classes=10)
    sd = model.state_dict()
    d, p, s = cfg.embed_dim, cfg.patch_size, cfg.image_size
    if cfg.tokenizer == "patch":
        assert sd["patch_embed.proj.weight"].shape == (d, 3, p, p)
    else:  # the conv stem: 3 input channels in its first conv, d out of its last
        convs = [k for k in sd if k.startswith("patch_embed.proj.") and k.endswith("weight")]
        assert sd[convs[0]].shape[1] == 3 and sd[convs[-1]].shape[0] == d
    prefix = 0 if cfg.pool == "seq" else 1  # sequence pooling replaces the class token
    assert model.num_prefix_tokens == prefix
    assert sd["pos_embed"].shape == (1, prefix + (s // p) ** 2, d)
    assert ("cls_token" in sd) == (prefix == 1)
    assert len(model.blocks) == cfg.depth
    assert f"blocks.{cfg.depth - 1}.attn.qkv.weight" in sd
    assert f"blocks.{cfg.depth}.attn.qkv.weight" not in sd
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (int(d * cfg.mlp_ratio), d)
    assert sd["head.weight"].shape == (10, d)
    assert all(b.attn.num_heads == cfg.num_heads for b in model.blocks)


@pytest.mark.slow
def test_birds_preset_is_vit_base_16():
    cfg = Config.from_dict(PRESETS["birds"]())
    ours = build_model(cfg, num_classes=1000)
    with torch.device("meta"):  # shapes only: no 86M-parameter initialisation
        ref = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert count_parameters(ours) == count_parameters(ref) == 86_567_656
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_build_model_teacher_gives_distilled_model():
    cfg = Config.from_dict(dict(PRESETS["smoke"](), teacher="teacher.pth"))
    model = build_model(cfg, num_classes=4)
    assert model.distilled and model.head_dist.out_features == 4


def test_build_model_unknown_arch_is_refused():
    cfg = Config.from_dict(dict(PRESETS["smoke"](), arch="no_such_net"))
    with pytest.raises(ValueError, match="no_such_net"):
        build_model(cfg, num_classes=4)
