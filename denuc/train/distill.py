"""Self-distillation with a momentum teacher (DINO, Caron et al. ICCV 2021), the pieces MUSE's losses share.

The teacher's scores are centred (a running mean of its outputs is subtracted, which keeps one prototype from
taking every input) and sharpened (a low temperature), then used as soft targets for the student's scores at a
higher temperature: cross-entropy between the two distributions. The teacher is an exponential moving average
of the student whose momentum rises from ``base`` to 1 along a cosine, and whose temperature warms up linearly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def teacher_targets(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """The teacher's scores (N, K) centred and sharpened into target distributions (N, K)."""
    return F.softmax((teacher.float() - center) / teacher_temp, dim=-1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
                      teacher_temp: float) -> torch.Tensor:
    """Mean over rows of the cross-entropy from the teacher's targets to the student's softmax."""
    targets = teacher_targets(teacher, center, teacher_temp)
    return -(targets * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1).mean()


@torch.no_grad()
def target_entropy(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Mean entropy (nats) of the teacher's centred, sharpened targets: the floor of ``distillation_loss``, so that
    the loss minus it is what the student has still to learn (their KL divergence)."""
    if len(teacher) == 0:
        return teacher.new_zeros(())
    targets = teacher_targets(teacher, center, teacher_temp)
    return -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
    """Move ``center`` (1, K) towards the mean of the teacher's rows (N, K) over every process, in place. A batch
    without rows (no nucleus matched anywhere) leaves it."""
    total = torch.cat([teacher.float().sum(0), torch.tensor([len(teacher)], dtype=torch.float32,
                                                            device=teacher.device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    if total[-1] > 0:
        center.mul_(momentum).add_(total[:-1] / total[-1], alpha=1 - momentum)


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """The teacher's momentum at ``step``: ``base`` at the start, 1 at ``total_steps``, along a cosine."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step / max(total_steps, 1), 1.0)) + 1) / 2


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """The teacher's temperature at ``step``: linear from ``start`` to ``end`` over ``warmup_steps``, then ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@torch.no_grad()
def follow(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (buffers: the teacher's
    own, e.g. batch-norm statistics of its own forward passes)."""
    for ours, theirs in zip(teacher.parameters(), student.parameters(), strict=True):
        ours.mul_(momentum).add_(theirs.detach(), alpha=1 - momentum)
