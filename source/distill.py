"""DeiT distillation (Touvron et al. 2021): a frozen teacher's predictions train the
student's distillation head.

    teacher = load_teacher("runs/resnet18/model.pth", device, classes=classes,
                           preprocessing={"image_size": 224, "mean": cfg.mean, "std": cfg.std})
    criterion = DistillationLoss(base, teacher, mode="hard", alpha=0.5, tau=3.0)
    outputs = student_outputs(model, x)          # (cls_logits, dist_logits or None)
    loss = criterion(x, outputs, y)

The losses follow DeiT's losses.py:
    hard  CE(dist_logits, argmax teacher)
    soft  KL(softmax(teacher / tau) || softmax(dist / tau)) * tau^2, summed and divided by
          the number of logits (batch x classes), as DeiT does
    total (1 - alpha) * base(cls_logits, y) + alpha * distillation
A student without a distillation token uses its class logits for both terms.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import load_model


class TeacherError(RuntimeError):
    """A teacher that cannot teach this student; the message says why and what to do."""


def _wrappers(model: nn.Module) -> list[nn.Module]:
    """[model, ..., the bare model]: through torch.compile (_orig_mod) and
    DistributedDataParallel (module)."""
    chain = [model]
    while True:
        inner = getattr(chain[-1], "_orig_mod", None)
        if inner is None:
            inner = getattr(chain[-1], "module", None)
        if not isinstance(inner, nn.Module):
            return chain
        chain.append(inner)


def student_outputs(model: nn.Module, x: torch.Tensor):
    """(cls_logits, dist_logits) of a ViT, dist_logits None without a distillation token;
    (logits, None) for any other model.

    Through `model(x, return_heads=True)` where the ViT's forward takes it, so wrappers
    (DistributedDataParallel's gradient sync, torch.compile's graph) stay in the path;
    otherwise through forward_features and forward_head(return_heads=True) of the bare model.
    """
    chain = _wrappers(model)
    core = chain[-1]
    if not hasattr(core, "forward_head"):
        return model(x), None
    if "return_heads" in inspect.signature(core.forward).parameters:
        return model(x, return_heads=True)
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in chain):
        raise RuntimeError(
            "distillation under torchrun needs VisionTransformer.forward(return_heads=True), "
            "so that the student's forward runs through DistributedDataParallel"
        )
    return core.forward_head(core.forward_features(x)[0], return_heads=True)


class DistillationLoss(nn.Module):
    """criterion(inputs, (cls_logits, dist_logits), labels) -> the DeiT loss; the teacher
    sees the same (possibly MixUp/CutMix-mixed) inputs as the student, without gradients."""

    def __init__(
        self,
        base_criterion,
        teacher: nn.Module,
        mode: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
    ):
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"distillation mode must be hard or soft; got {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1]; got {alpha}")
        if tau <= 0:
            raise ValueError(f"distillation tau must be positive; got {tau}")
        self.base_criterion = base_criterion
        self.teacher = teacher.eval().requires_grad_(False)
        self.mode, self.alpha, self.tau = mode, alpha, tau
        self.last: dict[str, float] = {}  # the two terms of the last call, for logging

    def train(self, mode: bool = True):
        """The teacher stays in eval mode (no dropout, frozen batch-norm statistics) even
        when the loss module is switched to training."""
        super().train(mode)
        self.teacher.eval()
        return self

    def distillation(self, dist_logits: torch.Tensor, teacher_logits: torch.Tensor):
        if self.mode == "hard":
            return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        tau = self.tau
        return (
            F.kl_div(
                F.log_softmax(dist_logits / tau, dim=1),
                F.log_softmax(teacher_logits / tau, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (tau * tau)
            / dist_logits.numel()
        )

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
        if dist_logits is None:
            dist_logits = cls_logits
        base = self.base_criterion(cls_logits, labels)
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits = self.teacher(inputs).float()
        distill = self.distillation(dist_logits.float(), teacher_logits)
        self.last = {"base": base.item(), "distill": distill.item()}
        return (1.0 - self.alpha) * base + self.alpha * distill


class TeacherInput(nn.Module):
    """Student inputs -> teacher inputs when their preprocessing differs: re-normalised
    (exact) and resized (bilinear, antialiased: close to, not identical to, resizing the
    original image)."""

    def __init__(self, student: dict, teacher: dict):
        super().__init__()
        s_mean, s_std = torch.tensor(student["mean"]), torch.tensor(student["std"])
        t_mean, t_std = torch.tensor(teacher["mean"]), torch.tensor(teacher["std"])
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std, per channel
        self.register_buffer("scale", (s_std / t_std).reshape(1, -1, 1, 1), persistent=False)
        shift = ((s_mean - t_mean) / t_std).reshape(1, -1, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.size = int(teacher["image_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return x


def _differs(a: dict, b: dict) -> bool:
    same_size = int(a["image_size"]) == int(b["image_size"])
    return not same_size or any(
        [float(v) for v in a[k]] != [float(v) for v in b[k]] for k in ("mean", "std")
    )


def load_teacher(
    path,
    device="cpu",
    *,
    classes=None,
    preprocessing: dict | None = None,
) -> nn.Module:
    """A frozen, eval-mode teacher from any checkpoint of this project (a ViT, or a
    torchvision CNN trained with --arch resnet18, ...).

    classes: the student's class names; a different count or order is a TeacherError.
    preprocessing: the student's {"image_size", "mean", "std"}; when the teacher was trained
    with others, its inputs are converted (TeacherInput) before it sees them.
    """
    model, ckpt = load_model(path, device)
    teacher_classes = list(ckpt["classes"])
    if classes is not None:
        classes = list(classes)
        if len(teacher_classes) != len(classes):
            raise TeacherError(
                f"teacher {path} predicts {len(teacher_classes)} classes but the student has "
                f"{len(classes)}; train the teacher on the same data as the student"
            )
        if teacher_classes != classes:
            raise TeacherError(
                f"teacher {path} has the same number of classes as the student but other "
                "names or another order; train the teacher on the same data as the student"
            )
    model.requires_grad_(False)
    teacher_prep = ckpt["preprocessing"]
    if preprocessing is not None and _differs(preprocessing, teacher_prep):
        model = nn.Sequential(TeacherInput(preprocessing, teacher_prep), model).to(device)
    return model.eval()
