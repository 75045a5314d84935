"""The Vision Transformer (Dosovitskiy et al. 2021) and the one function that builds it from a
Config.

    logits = model(images)                                   # (B, num_classes)
    logits, attentions = model(images, return_attention=True)  # attentions: depth x (B, nh, N, N)

State-dict names match timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.N.attn.qkv`, `blocks.N.mlp.fc1`, `norm`, `fc_norm`, `head`), so the same
weights give the same logits in both.
"""

from __future__ import annotations

import torch
from torch import nn

from block import Block
from embeddings import ConvTokenizer, PatchEmbed, sincos_pos_embed


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        tokenizer: str = "patch",
        pos_embed: str = "learn",
        pool: str = "cls",
        distilled: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fused_attn: bool = True,
    ):
        super().__init__()
        if pool not in ("cls", "mean", "seq"):
            raise ValueError(f"pool must be cls, mean or seq; got {pool!r}")
        self.num_classes = num_classes
        self.pool = pool
        self.distilled = distilled
        embed_cls = {"patch": PatchEmbed, "conv": ConvTokenizer}[tokenizer]
        self.patch_embed = embed_cls(
            image_size=image_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.grid_size = self.patch_embed.grid_size
        # Sequence pooling (CCT) replaces the class token; cls and mean keep it, as timm does.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool != "seq" else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.num_prefix_tokens = int(self.cls_token is not None) + int(distilled)
        num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        else:  # fixed: a buffer, zero for the prefix tokens
            table = sincos_pos_embed(embed_dim, self.grid_size)
            table = torch.cat([torch.zeros(self.num_prefix_tokens, embed_dim), table])
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks drop more
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rate,
                fused_attn=fused_attn,
            )
            for rate in rates
        )
        # timm: the final norm before class-token pooling, after mean pooling (fc_norm).
        norm_after_pool = pool == "mean"
        self.norm = nn.Identity() if norm_after_pool else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if norm_after_pool else nn.Identity()
        self.attn_pool = nn.Linear(embed_dim, 1) if pool == "seq" else None
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.head_dist = nn.Linear(embed_dim, num_classes) if distilled else None
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT initialisation: truncated normal (std 0.02) for linear layers and
        position embeddings, tiny normal for the class token, zero biases."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def forward_features(
        self, x: torch.Tensor, return_attention: bool = False, prefix_only: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, T, D) normalised tokens and, when asked, each block's (B, nh, T, T) attention.

        prefix_only: return only the class/distillation tokens, (B, prefix, D); the last block
        then computes just those rows, which is all class-token pooling reads (three quarters
        of a block's work less; the same values).
        """
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [
            t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None
        ]
        x = torch.cat(prefix + [x], dim=1)  # (B, prefix + N, D)
        x = self.pos_drop(x + self.pos_embed)
        attentions = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            queries = self.num_prefix_tokens if prefix_only and i == last else None
            x, attn = block(x, return_attention, queries)
            if return_attention:
                attentions.append(attn)  # (B, nh, T, T)
        return self.norm(x), attentions

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens -> (B, D) image feature (the pre-logits)."""
        if self.pool == "cls":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens :]  # (B, N, D)
        if self.pool == "mean":
            return self.fc_norm(patches.mean(dim=1))
        weights = self.sequence_pool_weights(patches)  # (B, N, 1)
        return (weights * patches).sum(dim=1)

    def sequence_pool_weights(self, patches: torch.Tensor) -> torch.Tensor:
        """CCT's sequence pooling: a learned softmax weighting of the tokens (sums to 1)."""
        return self.attn_pool(patches).softmax(dim=1)  # (B, N, 1)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False, return_heads: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) tokens -> (B, num_classes) logits; pre_logits: the pooled (B, D) feature
        instead; return_heads: the (class-token, distillation-token or None) logits apart
        (DeiT training) instead of their average."""
        feature = self.pool_tokens(x)  # (B, D)
        if pre_logits:
            return feature
        logits = self.head(self.head_drop(feature))
        dist_logits = None
        if self.distilled:
            dist_logits = self.head_dist(self.head_drop(x[:, self.num_prefix_tokens - 1]))
        if return_heads:
            return logits, dist_logits
        # DeiT: at inference the two heads' predictions are averaged.
        return logits if dist_logits is None else (logits + dist_logits) / 2

    def forward(self, x: torch.Tensor, return_attention: bool = False, return_heads: bool = False):
        """Logits; with return_attention also each block's attention; with return_heads the
        (class-token, distillation-token or None) logits instead of their average (DeiT
        training), through this forward so wrappers (DDP, torch.compile) stay in the path."""
        # Attention maps keep every row, so the last block is pruned only without them.
        prefix_only = self.pool == "cls" and not return_attention
        features, attentions = self.forward_features(x, return_attention, prefix_only)
        logits = self.forward_head(features, return_heads=return_heads)
        return (logits, attentions) if return_attention else logits


def build_model(cfg, num_classes: int) -> nn.Module:
    """The only function that maps a Config to a model."""
    if cfg.arch != "vit":
        import torchvision

        if not hasattr(torchvision.models, cfg.arch):
            raise ValueError(f"arch {cfg.arch!r} is neither vit nor a torchvision model name")
        return torchvision.models.get_model(cfg.arch, weights=None, num_classes=num_classes)
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        tokenizer=cfg.tokenizer,
        pos_embed=cfg.pos_embed,
        pool=cfg.pool,
        distilled=bool(cfg.teacher),
        drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
        fused_attn=cfg.fused_attn,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
