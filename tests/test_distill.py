"""DeiT distillation: the loss against a hand computation, a teacher that never changes and
stays in eval mode, both modes training, and loading teachers (a torchvision CNN) with their
class and preprocessing checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import checkpoint as ckpt_io
from config import Config, apply_overrides, validate
from distill import DistillationLoss, TeacherError, load_teacher, student_outputs
from transformer import VisionTransformer, build_model

X = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1, 2])


def vit(seed: int, distilled: bool = False, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    shape = dict(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    return VisionTransformer(**{**shape, **kw}, distilled=distilled)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.exp().sum(dim=1, keepdim=True).log()


@pytest.mark.parametrize("distilled", [True, False], ids=["dist-token", "no-dist-token"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_loss_matches_a_hand_computation(mode, distilled):
    student, teacher = vit(0, distilled=distilled), vit(1, depth=1)
    alpha, tau = 0.3, 2.0
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, mode=mode, alpha=alpha, tau=tau)
    outputs = student_outputs(student, X)
    loss = criterion(X, outputs, Y)

    cls_logits, dist_logits = outputs
    if not distilled:
        assert dist_logits is None
        dist_logits = cls_logits  # a student without a distillation token
    with torch.no_grad():
        teacher_logits = teacher(X)
    rows = torch.arange(len(Y))
    base = -log_probs(cls_logits)[rows, Y].mean()
    if mode == "hard":
        distill = -log_probs(dist_logits)[rows, teacher_logits.argmax(1)].mean()
    else:  # DeiT: KL summed over everything, times tau^2, over batch x classes
        p_teacher = log_probs(teacher_logits / tau).exp()
        kl = p_teacher * (log_probs(teacher_logits / tau) - log_probs(dist_logits / tau))
        distill = kl.sum() * tau**2 / dist_logits.numel()
    torch.testing.assert_close(loss, (1 - alpha) * base + alpha * distill)
    expected = {"base": base.item(), "distill": distill.item()}
    assert criterion.last == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_teacher_never_changes_and_stays_in_eval_mode():
    student = vit(0, distilled=True)
    teacher = vit(1, drop_rate=0.5)  # dropout: train mode would make its outputs random
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, mode="soft", alpha=0.5, tau=3.0)
    criterion.train()
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(3):
        loss = criterion(X, student_outputs(student, X), Y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    teacher.train()  # even if someone switches it back, the loss runs it in eval mode
    student.eval()
    with torch.no_grad():
        first = criterion(X, student_outputs(student, X), Y)
        second = criterion(X, student_outputs(student, X), Y)
    assert torch.equal(first, second)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_both_modes_train(mode):
    student, teacher = vit(0, distilled=True, drop_path_rate=0.0), vit(1, depth=1)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, mode=mode, alpha=0.5, tau=2.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses, distill = [], []
    for _ in range(8):
        loss = criterion(X, student_outputs(student, X), Y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        distill.append(criterion.last["distill"])
    assert losses[-1] < 0.7 * losses[0]
    assert distill[-1] < distill[0]  # the distillation head learns the teacher, too


class HeadsViT(VisionTransformer):
    """The forward a ViT can offer so that wrappers stay in the path: return_heads=True."""

    def forward(self, x, return_attention=False, return_heads=False):
        self.calls = getattr(self, "calls", 0) + 1
        if return_heads:
            return self.forward_head(self.forward_features(x)[0], return_heads=True)
        return super().forward(x, return_attention)


class Wrapper(nn.Module):  # stands in for DistributedDataParallel / torch.compile
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_student_outputs_go_through_wrappers():
    torch.manual_seed(0)
    shape = dict(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    model = HeadsViT(**shape, distilled=True).eval()
    cls_logits, dist_logits = student_outputs(Wrapper(model), X)
    assert model.calls == 1  # through the wrapper's forward, not around it
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(X)[0], return_heads=True)
    torch.testing.assert_close((cls_logits, dist_logits), expected)
    plain = vit(0, distilled=True).eval()  # no return_heads: the unwrapped model's heads
    torch.testing.assert_close(
        student_outputs(Wrapper(plain), X),
        plain.forward_head(plain.forward_features(X)[0], return_heads=True),
    )
    cnn = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    logits, none = student_outputs(cnn, X)
    assert none is None and logits.shape == (6, 3)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="hard or soft"):
        DistillationLoss(nn.CrossEntropyLoss(), vit(1), mode="medium")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DistillationLoss(nn.CrossEntropyLoss(), vit(1), alpha=1.5)


# ---- teachers from checkpoints ------------------------------------------------------------


@pytest.fixture
def cnn_teacher(tmp_path):
    """A resnet18 checkpoint as `train.py --arch resnet18` writes it (random weights)."""
    values = dict(arch="resnet18", image_size=16, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    cfg = validate(apply_overrides(Config(), values))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3)
    path = tmp_path / "teacher.pth"
    ckpt_io.save_checkpoint(ckpt_io.make_checkpoint(model, cfg, ["a", "b", "c"]), path)
    return path


def test_cnn_teacher_is_frozen_and_teaches_a_vit(cnn_teacher):
    teacher = load_teacher(cnn_teacher, "cpu", classes=["a", "b", "c"])
    assert all(not m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    running_mean = teacher.bn1.running_mean.clone()
    student = vit(0, distilled=True)
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, mode="hard", alpha=0.5)
    criterion(X, student_outputs(student, X), Y).backward()
    assert torch.equal(teacher.bn1.running_mean, running_mean)  # batch norm frozen too
    assert student.head_dist.weight.grad is not None


def test_teacher_with_other_classes_is_a_clear_error(cnn_teacher):
    with pytest.raises(TeacherError, match="predicts 3 classes but the student has 4"):
        load_teacher(cnn_teacher, classes=["a", "b", "c", "d"])
    with pytest.raises(TeacherError, match="other names or another order"):
        load_teacher(cnn_teacher, classes=["c", "b", "a"])
    with pytest.raises(ckpt_io.CheckpointError, match="no model file"):
        load_teacher(cnn_teacher.parent / "missing.pth")


def test_teacher_inputs_follow_the_teachers_preprocessing(cnn_teacher):
    """The student normalises with 0.5/0.5 at 32 px, the teacher was trained with 0.4/0.2 at
    16 px: the teacher sees its own normalisation (exactly) at its own size."""
    student_prep = {"image_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    teacher = load_teacher(cnn_teacher, preprocessing=student_prep)
    adapter, cnn = teacher[0], teacher[1]
    raw = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(adapter((raw - 0.5) / 0.5), (raw - 0.4) / 0.2)
    with torch.no_grad():
        torch.testing.assert_close(teacher((raw - 0.5) / 0.5), cnn((raw - 0.4) / 0.2))
    bigger = load_teacher(cnn_teacher, preprocessing={**student_prep, "image_size": 32})
    assert bigger[0](torch.zeros(2, 3, 32, 32)).shape == (2, 3, 16, 16)
    same = {"image_size": 16, "mean": (0.4,) * 3, "std": (0.2,) * 3}
    assert not isinstance(load_teacher(cnn_teacher, preprocessing=same), nn.Sequential)
