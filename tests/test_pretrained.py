"""Pretrained weights into our VisionTransformer: timm, Hugging Face and JAX layouts give the
reference model's logits; position-embedding resizing, head re-initialisation, clear errors,
layer-wise lr decay against timm, head-only freezing. No downloads: every reference model
has random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import timm.optim
import torch
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import _load_weights

import checkpoint as ckpt_io
import pretrained_sources
from config import Config, apply_overrides, validate
from conftest import train_smoke
from finetune import freeze_all_but_head, param_groups_layer_decay, unfreeze_all
from pretrained import PretrainedError, infer_config_overrides, load_pretrained, resolve_spec
from transformer import VisionTransformer, build_model

ATOL = 1e-5  # float32 on the same operations in another order


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (biases, norms and tokens too), so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def timm_vit(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, **kw):
    torch.manual_seed(0)
    model = TimmViT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=num_classes,
        **kw,
    )
    return perturb(model)


def build(overrides: dict, num_classes: int, **extra) -> torch.nn.Module:
    """Our model from a Config with the overrides applied, as train.py builds it."""
    cfg = validate(apply_overrides(Config(), {**overrides, **extra}))
    return build_model(cfg, num_classes).eval()


def images(size: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save(state_dict: dict, path):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return str(path)


# ---- timm -> ours -------------------------------------------------------------------------

SHAPES = {
    "cls": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, global_pool="token"),
    "avg-nobias": dict(
        img_size=24,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=4,
        global_pool="avg",
        mlp_ratio=2.0,
        qkv_bias=False,
    ),
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_timm_state_dict_gives_identical_logits(tmp_path, shape, suffix):
    reference = timm_vit(**shape)
    path = save(reference.state_dict(), tmp_path / f"weights{suffix}")
    overrides = infer_config_overrides(path)
    assert overrides == {
        "embed_dim": shape["embed_dim"],
        "depth": shape["depth"],
        "mlp_ratio": shape.get("mlp_ratio", 4.0),
        "patch_size": shape["patch_size"],
        "qkv_bias": shape.get("qkv_bias", True),
        "pool": "mean" if shape["global_pool"] == "avg" else "cls",
        "image_size": shape["img_size"],
        "tokenizer": "patch",
        "pos_embed": "learn",
    }  # a bare state dict of a non-standard width does not say its head count
    model = build(overrides, num_classes=7, num_heads=shape["num_heads"])
    info = load_pretrained(model, path)
    assert info["format"] == "timm"
    assert info["loaded"] == len(reference.state_dict())
    assert info["resized"] == info["reinitialized"] == info["dropped"] == []
    x = images(shape["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=ATOL)


def test_timm_release_file_name_gives_heads_and_normalisation(tmp_path):
    """DeiT's release files are named after the timm model: its registry fills the rest."""
    torch.manual_seed(0)
    reference = perturb(timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1))
    path = save(reference.state_dict(), tmp_path / "deit_tiny_patch16_224-a1311bcf.pth")
    overrides = infer_config_overrides(path)
    assert (overrides["num_heads"], overrides["embed_dim"], overrides["depth"]) == (3, 192, 1)
    assert overrides["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert overrides["std"] == pytest.approx((0.229, 0.224, 0.225))
    model = build(overrides, num_classes=1000)
    load_pretrained(model, path)
    x = images(224, n=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=ATOL)


def test_distilled_timm_model_into_distilled_and_plain_students(tmp_path):
    torch.manual_seed(0)
    reference = perturb(
        VisionTransformerDistilled(
            img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5
        )
    )
    path = save(reference.state_dict(), tmp_path / "deit.pth")
    x = images(32)
    shape = dict(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    distilled = VisionTransformer(**shape, distilled=True).eval()
    load_pretrained(distilled, path)
    plain = VisionTransformer(**shape).eval()
    info = load_pretrained(plain, path)
    assert info["dropped"] == ["dist_token", "head_dist.weight", "head_dist.bias"]
    with torch.no_grad():
        # both heads averaged at inference, as timm's distilled model does in eval mode
        torch.testing.assert_close(distilled(x), reference(x), rtol=0, atol=ATOL)
        # the plain student keeps the class-token path, whose tokens saw no dist token
        assert plain(x).shape == (3, 5)
        torch.testing.assert_close(plain.head.weight, reference.head.weight)


def test_plain_weights_into_a_distilled_student_copy_the_class_token(tmp_path):
    reference = timm_vit()
    path = save(reference.state_dict(), tmp_path / "vit.pth")
    student = VisionTransformer(
        image_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        num_classes=7,
        distilled=True,
    ).eval()
    info = load_pretrained(student, path)
    assert info["adapted"] == ["dist_token and its position copied from the class token"]
    assert info["reinitialized"] == ["head_dist (none pretrained, 7 now)"]
    assert torch.equal(student.dist_token, reference.cls_token)
    assert torch.equal(student.pos_embed[:, 1], reference.pos_embed[:, 0])
    assert torch.equal(student.pos_embed[:, 2:], reference.pos_embed[:, 1:])
    with torch.no_grad():  # identical inputs stay identical through every block
        features, _ = student.forward_features(images(32))
        torch.testing.assert_close(features[:, 1], features[:, 0], rtol=0, atol=1e-6)


# ---- Hugging Face -> ours ------------------------------------------------------------------


def hf_folder(tmp_path, cls_name="ViTForImageClassification", eps=1e-6, processor=None):
    import transformers

    config_cls = transformers.DeiTConfig if cls_name.startswith("DeiT") else transformers.ViTConfig
    config = config_cls(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
        num_labels=5,
        layer_norm_eps=eps,
    )
    torch.manual_seed(0)
    model = perturb(getattr(transformers, cls_name)(config))
    folder = tmp_path / cls_name
    model.save_pretrained(folder)
    if processor:
        transformers.ViTImageProcessor(**processor).save_pretrained(folder)
    return model, str(folder)


HF_SHAPE = dict(embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, patch_size=8, image_size=32)


def test_hugging_face_vit_folder_gives_identical_logits(tmp_path):
    reference, folder = hf_folder(
        tmp_path, processor={"image_mean": [0.4] * 3, "image_std": [0.3] * 3}
    )
    overrides = infer_config_overrides(folder)
    assert overrides == {
        **HF_SHAPE,
        "qkv_bias": True,
        "pool": "cls",
        "tokenizer": "patch",
        "pos_embed": "learn",
        "mean": (0.4, 0.4, 0.4),
        "std": (0.3, 0.3, 0.3),
    }
    model = build(overrides, num_classes=5)
    info = load_pretrained(model, folder)
    assert info["format"] == "huggingface" and info["reinitialized"] == []
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(pixel_values=x).logits, rtol=0, atol=ATOL)
    assert resolve_spec("hf:" + folder) == ("folder", folder)


def test_hugging_face_default_eps_is_close_and_noted(tmp_path):
    """transformers' ViT normalises with eps 1e-12, ours with 1e-6: a negligible change."""
    reference, folder = hf_folder(tmp_path, eps=1e-12)
    overrides = infer_config_overrides(folder)
    assert overrides["mean"] == overrides["std"] == (0.5, 0.5, 0.5)  # ViTImageProcessor
    model = build(overrides, num_classes=5)
    info = load_pretrained(model, folder)
    assert any("eps 1e-12" in note for note in info["notes"])
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(pixel_values=x).logits, rtol=0, atol=1e-4)


def test_hugging_face_backbone_without_head_gets_a_new_head(tmp_path):
    reference, folder = hf_folder(tmp_path, cls_name="ViTModel")
    model = build(infer_config_overrides(folder), num_classes=4)
    info = load_pretrained(model, folder)
    assert info["reinitialized"] == ["head (none pretrained, 4 now)"]
    assert any("pooler" in note for note in info["notes"])
    assert torch.count_nonzero(model.head.bias) == 0
    x = images(32)
    with torch.no_grad():
        features, _ = model.forward_features(x)
        expected = reference(pixel_values=x).last_hidden_state
        torch.testing.assert_close(features, expected, rtol=0, atol=ATOL)


def test_hugging_face_in_memory_names_in_a_torch_file(tmp_path):
    """transformers 5 renames ViT weights in memory (q_proj, layers.N); a state dict saved
    from such a model loads too."""
    reference, _ = hf_folder(tmp_path)
    path = save(reference.state_dict(), tmp_path / "hf_state_dict.pth")
    model = build(HF_SHAPE, num_classes=5)
    assert load_pretrained(model, path)["format"] == "huggingface"
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(pixel_values=x).logits, rtol=0, atol=ATOL)


def test_hugging_face_deit_with_teacher_head(tmp_path):
    reference, folder = hf_folder(tmp_path, cls_name="DeiTForImageClassificationWithTeacher")
    overrides = infer_config_overrides(folder)
    assert overrides["mean"] == pytest.approx((0.485, 0.456, 0.406))  # DeiT's processor
    model = VisionTransformer(
        image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
        num_classes=5, distilled=True,
    ).eval()  # fmt: skip
    load_pretrained(model, folder)
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(pixel_values=x).logits, rtol=0, atol=ATOL)


# ---- JAX .npz -> ours ----------------------------------------------------------------------


def write_npz(model: TimmViT, path, layout: str = "vit") -> str:
    """A timm ViT's weights in the JAX layout: the inverse of timm's `_load_weights`.

    vit: google-research vision_transformer (Transformer/encoderblock_N, MHA_1, MlpBlock_3);
    big_vision: params/ prefix, position embeddings without the class token, MHA_0,
    MlpBlock_0, LayerNorm_1, and all blocks stacked in one scanned array.
    """
    big = layout == "big_vision"
    prefix = "params/" if big else ""
    n = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    D = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": n(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),  # OIHW -> HWIO
        "embedding/bias": n(model.patch_embed.proj.bias),
        "cls": n(model.cls_token),
        "Transformer/encoder_norm/scale": n(model.norm.weight),
        "Transformer/encoder_norm/bias": n(model.norm.bias),
        "head/kernel": n(model.head.weight.T),
        "head/bias": n(model.head.bias),
    }
    if big:
        out["pos_embedding"] = n(model.pos_embed[:, 1:])
    else:
        out["Transformer/posembed_input/pos_embedding"] = n(model.pos_embed)
    mha, mlp, ln2 = (0, 0, 1) if big else (1, 3, 2)
    blocks = []
    for block in model.blocks:
        b = {
            "LayerNorm_0/scale": n(block.norm1.weight),
            "LayerNorm_0/bias": n(block.norm1.bias),
            f"LayerNorm_{ln2}/scale": n(block.norm2.weight),
            f"LayerNorm_{ln2}/bias": n(block.norm2.bias),
            f"MultiHeadDotProductAttention_{mha}/out/kernel": n(
                block.attn.proj.weight.reshape(D, heads, -1).permute(1, 2, 0)
            ),
            f"MultiHeadDotProductAttention_{mha}/out/bias": n(block.attn.proj.bias),
        }
        for name, w, bias in zip(
            ("query", "key", "value"),
            block.attn.qkv.weight.chunk(3),
            block.attn.qkv.bias.chunk(3),
            strict=True,
        ):
            b[f"MultiHeadDotProductAttention_{mha}/{name}/kernel"] = n(w.T.reshape(D, heads, -1))
            b[f"MultiHeadDotProductAttention_{mha}/{name}/bias"] = n(bias.reshape(heads, -1))
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            b[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = n(fc.weight.T)
            b[f"MlpBlock_{mlp}/Dense_{r}/bias"] = n(fc.bias)
        blocks.append(b)
    if big:
        for key in blocks[0]:
            out[f"Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    np.savez(path, **{prefix + k: v for k, v in out.items()})
    return str(path)


def test_npz_writer_is_what_timm_reads(tmp_path):
    """The test's own npz writer inverts timm's reader: a fresh timm model loaded from it
    gives the reference logits, so the next tests check our reader against the real layout."""
    reference = timm_vit()
    path = write_npz(reference, tmp_path / "vit.npz")
    fresh = timm_vit()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
        _load_weights(fresh, path)
        x = images(32)
        torch.testing.assert_close(fresh(x), reference(x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", ["vit", "big_vision"])
def test_jax_npz_gives_identical_logits(tmp_path, layout):
    reference = timm_vit(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    if layout == "big_vision":  # no class-token position there: zero in the reference too
        with torch.no_grad():
            reference.pos_embed[:, 0] = 0
    path = write_npz(reference, tmp_path / f"{layout}.npz", layout)
    overrides = infer_config_overrides(path)
    assert overrides == {
        "embed_dim": 48,
        "depth": 3,
        "num_heads": 3,  # the JAX kernels are (D, heads, head_dim)
        "mlp_ratio": 4.0,
        "patch_size": 8,
        "qkv_bias": True,
        "pool": "cls",
        "image_size": 32,
        "tokenizer": "patch",
        "pos_embed": "learn",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    model = build(overrides, num_classes=7)
    info = load_pretrained(model, path)
    assert info["format"] == "jax"
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=ATOL)


def test_not_a_vit_npz_is_a_clear_error(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(PretrainedError, match="no embedding/kernel array"):
        infer_config_overrides(str(path))


# ---- position embeddings and heads -------------------------------------------------------


def test_pos_embed_resize_224_to_384_keeps_class_token(tmp_path):
    reference = timm_vit(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    path = save(reference.state_dict(), tmp_path / "vit224.pth")
    shape = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=7)
    same = VisionTransformer(image_size=224, **shape)
    assert load_pretrained(same, path)["resized"] == []
    assert torch.equal(same.pos_embed, reference.pos_embed)  # exact at the same size

    big = VisionTransformer(image_size=384, **shape)
    info = load_pretrained(big, path)
    assert info["resized"] == ["pos_embed 14x14 -> 24x24 patches, bicubic"]
    assert big.pos_embed.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(big.pos_embed[:, :1], reference.pos_embed[:, :1])
    expected = timm.layers.resample_abs_pos_embed(
        reference.pos_embed, new_size=(24, 24), num_prefix_tokens=1, antialias=False
    )
    torch.testing.assert_close(big.pos_embed, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("distilled", [False, True])
def test_small_grid_resize_matches_timm_at_the_new_size(tmp_path, distilled):
    """4x4 patches -> 6x6: our resized model gives the logits of timm's model at the new
    size with timm's own bicubic resampling."""
    cls = VisionTransformerDistilled if distilled else TimmViT
    torch.manual_seed(0)
    shape = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    reference = perturb(cls(img_size=16, **shape))
    path = save(reference.state_dict(), tmp_path / "small.pth")
    model = VisionTransformer(image_size=24, distilled=distilled, **shape).eval()
    load_pretrained(model, path)
    prefix = 2 if distilled else 1
    assert torch.equal(model.pos_embed[:, :prefix], reference.pos_embed[:, :prefix])
    resized = cls(img_size=24, **shape).eval()
    sd = reference.state_dict()
    sd["pos_embed"] = timm.layers.resample_abs_pos_embed(
        sd["pos_embed"], new_size=(6, 6), num_prefix_tokens=prefix, antialias=False
    )
    resized.load_state_dict(sd)
    x = images(24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resized(x), rtol=0, atol=ATOL)


def test_new_class_count_reinitialises_the_head_only(tmp_path):
    reference = timm_vit(num_classes=7)
    path = save(reference.state_dict(), tmp_path / "vit.pth")
    model = VisionTransformer(
        image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=4
    )
    with torch.no_grad():
        model.head.bias.fill_(1.0)  # so a forgotten re-initialisation shows
    info = load_pretrained(model, path)
    assert info["reinitialized"] == ["head (7 classes pretrained, 4 now)"]
    assert torch.count_nonzero(model.head.bias) == 0
    assert 0.01 < model.head.weight.std().item() < 0.03  # trunc normal, std 0.02
    ours, theirs = model.state_dict(), reference.state_dict()
    for name in ours:
        if not name.startswith("head."):
            assert torch.equal(ours[name], theirs[name]), name


def test_project_checkpoint_fine_tunes_on_new_classes(tmp_path):
    cfg = validate(
        apply_overrides(
            Config(),
            dict(
                image_size=16,
                patch_size=4,
                embed_dim=32,
                depth=2,
                num_heads=2,
                mean=(0.1, 0.2, 0.3),
            ),
        )
    )
    source = perturb(build_model(cfg, num_classes=10))
    path = tmp_path / "model.pth"
    ckpt_io.save_checkpoint(ckpt_io.make_checkpoint(source, cfg, [str(i) for i in range(10)]), path)
    overrides = infer_config_overrides(str(path))
    assert overrides["embed_dim"] == 32 and overrides["num_heads"] == 2
    assert overrides["image_size"] == 16 and overrides["mean"] == (0.1, 0.2, 0.3)
    model = build(overrides, num_classes=3)
    info = load_pretrained(model, str(path))
    assert info["format"] == "vit-pipeline"
    assert info["reinitialized"] == ["head (10 classes pretrained, 3 now)"]
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


# ---- errors --------------------------------------------------------------------------------


def test_mismatching_shapes_name_the_tensors(tmp_path):
    path = save(timm_vit(embed_dim=48, depth=2).state_dict(), tmp_path / "vit.pth")
    deeper = VisionTransformer(image_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    with pytest.raises(PretrainedError, match=r"set --depth 2 \(the model has 3\)"):
        load_pretrained(deeper, path)
    narrower = VisionTransformer(image_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(
        PretrainedError,
        match=r"set --embed-dim 48 \(the model has 32\), --patch-size 8 \(the model has 4\), or",
    ):
        load_pretrained(narrower, path)
    wider_mlp = VisionTransformer(
        image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0
    )
    with pytest.raises(
        PretrainedError, match=r"blocks\.0\.mlp\.fc1\.weight \(192, 48\) vs model \(96, 48\)"
    ):
        load_pretrained(wider_mlp, path)
    mean_pool = VisionTransformer(
        image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, pool="mean"
    )
    with pytest.raises(PretrainedError, match="trained with cls pooling; set --pool cls"):
        load_pretrained(mean_pool, path)
    sincos = VisionTransformer(
        image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, pos_embed="sincos"
    )
    with pytest.raises(PretrainedError, match="--pos-embed learn"):
        load_pretrained(sincos, path)
    cnn = build_model(validate(apply_overrides(Config(), {"arch": "resnet18"})), num_classes=3)
    with pytest.raises(PretrainedError, match="use --arch vit"):
        load_pretrained(cnn, path)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("timm:vit_small_patch16_224", ("timm", "vit_small_patch16_224")),
        ("vit_base_patch16_224.augreg_in21k", ("timm", "vit_base_patch16_224.augreg_in21k")),
        ("hf:google/vit-base-patch16-224", ("hub", "google/vit-base-patch16-224")),
        ("google/vit-base-patch16-224", ("hub", "google/vit-base-patch16-224")),
        (
            "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k",
            ("hub", "timm/vit_tiny_patch16_224.augreg_in21k"),
        ),
    ],
)
def test_spec_kinds(spec, expected):
    assert resolve_spec(spec) == expected


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(
        PretrainedError, match="no pretrained weights at .*missing.pth; check the path"
    ):
        resolve_spec(str(tmp_path / "missing.pth"))
    (tmp_path / "weights.txt").write_text("no")
    with pytest.raises(PretrainedError, match="unknown extension '.txt'"):
        resolve_spec(str(tmp_path / "weights.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="has no config.json"):
        infer_config_overrides(str(tmp_path / "empty"))
    with pytest.raises(PretrainedError, match="neither a file nor a timm model name"):
        infer_config_overrides("not_a_model_name")
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="broken.pth is not a readable PyTorch checkpoint"):
        infer_config_overrides(str(tmp_path / "broken.pth"))


def test_timm_registry_gives_overrides_without_download():
    assert infer_config_overrides("timm:vit_small_patch16_224") == {
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 6,
        "mlp_ratio": 4.0,
        "patch_size": 16,
        "qkv_bias": True,
        "pool": "cls",
        "image_size": 224,
        "tokenizer": "patch",
        "pos_embed": "learn",
        "mean": (0.5, 0.5, 0.5),  # augreg weights, timm's default tag
        "std": (0.5, 0.5, 0.5),
    }
    assert infer_config_overrides("vit_base_patch16_384")["image_size"] == 384
    with pytest.raises(PretrainedError, match="norm before the blocks"):
        infer_config_overrides("timm:vit_base_patch16_clip_224")
    with pytest.raises(PretrainedError, match="a ResNet architecture"):
        infer_config_overrides("timm:resnet50")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub and an empty download cache, whatever the machine has."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(pretrained_sources, "hub_reachable", lambda timeout=3.0: False)


def test_offline_timm_name_fails_clearly(offline):
    import huggingface_hub.constants

    model = VisionTransformer(image_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3)
    with pytest.raises(PretrainedError, match="timm model 'vit_tiny_patch16_224'.*internet access"):
        load_pretrained(model, "timm:vit_tiny_patch16_224")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored


def test_offline_hub_id_fails_clearly(offline):
    with pytest.raises(PretrainedError, match="could not download 'google/vit-base-patch16-224'"):
        infer_config_overrides("google/vit-base-patch16-224")


# ---- layer-wise lr decay and freezing -------------------------------------------------------


POOLS = {
    "cls": (dict(global_pool="token"), dict(pool="cls")),
    "mean": (dict(global_pool="avg"), dict(pool="mean")),
    "distilled": (dict(), dict(distilled=True)),
}


@pytest.mark.parametrize("timm_kw, our_kw", POOLS.values(), ids=POOLS.keys())
def test_layer_decay_scales_follow_the_formula_and_timm(timm_kw, our_kw):
    depth, decay = 3, 0.75
    shape = dict(patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=5)
    model = VisionTransformer(image_size=32, **shape, **our_kw)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert sorted(got) == sorted(names.values())
    for name, param in model.named_parameters():
        if name.startswith("blocks."):
            scale = decay ** (depth - int(name.split(".")[1]))
        elif name.split(".")[0] in ("patch_embed", "cls_token", "dist_token", "pos_embed"):
            scale = decay ** (depth + 1)
        elif name.startswith("norm."):  # with the last block, as timm groups it
            scale = decay
        else:  # fc_norm, head, head_dist
            scale = 1.0
        wd = 0.05 if param.ndim >= 2 and name not in model.no_weight_decay() else 0.0
        assert got[name] == (pytest.approx(scale), wd), name

    timm_cls = VisionTransformerDistilled if our_kw.get("distilled") else TimmViT
    reference = timm_cls(img_size=32, **shape, **timm_kw)
    timm_groups = timm.optim.param_groups_layer_decay(
        reference,
        weight_decay=0.05,
        no_weight_decay_list=reference.no_weight_decay(),
        layer_decay=decay,
    )
    timm_names = {id(p): n for n, p in reference.named_parameters()}
    expected = {
        timm_names[id(p)]: (pytest.approx(g["lr_scale"]), g["weight_decay"])
        for g in timm_groups
        for p in g["params"]
    }
    assert got == expected


def test_layer_decay_skips_frozen_parameters():
    model = VisionTransformer(
        image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3
    )
    freeze_all_but_head(model)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    assert [(len(g["params"]), g["lr_scale"], g["weight_decay"]) for g in groups] == [
        (1, 1.0, 0.0),  # head.bias
        (1, 1.0, 0.05),  # head.weight
    ]


def test_freeze_all_but_head_steps_only_the_heads():
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=3,
        distilled=True,
    )
    # built before freezing, as train.py does, so unfreezing later needs no new optimizer
    optimizer = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, 0.75), lr=1e-2)
    trainable = freeze_all_but_head(model)
    assert trainable == ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]
    x, y = images(16, n=4), torch.tensor([0, 1, 2, 0])

    def step() -> set[str]:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}

    assert step() == set(trainable)
    unfreeze_all(model)
    assert all(p.requires_grad for p in model.parameters())
    assert step() == {n for n, _ in model.named_parameters()}


# ---- train.py end to end ----------------------------------------------------------------------


def logged_lrs(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}


def test_train_fine_tunes_a_checkpoint_head_first_then_all_at_a_lower_lr(tmp_path):
    """--pretrained + --freeze-epochs: during the frozen epoch only the head moves; then
    everything trains at --unfreeze-lr-scale times the scheduled lr; the checkpoint records
    which weights were used."""
    patch = ("--tokenizer", "patch", "--ema-decay", "0", "--log-every", "1")
    source = train_smoke(tmp_path / "src", *patch, "--epochs", "1")
    src = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]

    frozen = train_smoke(
        tmp_path / "frozen", *patch, "--pretrained", str(source), "--freeze-epochs", "1",
        "--epochs", "1",
    )  # fmt: skip
    ckpt = torch.load(frozen, map_location="cpu", weights_only=True)
    changed = {k for k, v in ckpt["state_dict"].items() if not torch.equal(v, src[k])}
    assert changed == {"head.weight", "head.bias"}
    assert ckpt["pretrained"]["source"] == str(source)
    assert ckpt["pretrained"]["format"] == "vit-pipeline"

    lrs = {}
    for scale in ("1", "0.1"):
        out = tmp_path / f"scale-{scale}"
        model = train_smoke(
            out, *patch, "--pretrained", str(source), "--freeze-epochs", "1", "--epochs", "2",
            "--unfreeze-lr-scale", scale,
        )  # fmt: skip
        lrs[scale] = logged_lrs(out / "runs" / "smoke")
        weights = torch.load(model, map_location="cpu", weights_only=True)["state_dict"]
        assert not torch.equal(weights["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])
    steps_per_epoch = 4  # the smoke preset's limit_train_batches
    assert sorted(lrs["1"]) == sorted(lrs["0.1"]) == list(range(1, 2 * steps_per_epoch + 1))
    for step, lr in lrs["1"].items():
        factor = 1.0 if step <= steps_per_epoch else 0.1
        assert lrs["0.1"][step] == pytest.approx(factor * lr, rel=1e-9)
