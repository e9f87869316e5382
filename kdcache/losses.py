"""Temperature and the distillation loss, in exactly one place."""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError

ENSEMBLE_REDUCTIONS = ("mean-prob", "mean-logit")


@functools.lru_cache(maxsize=256)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small tensor of per-student settings, made once per device: building it every step would
    copy from the host each time, which on a GPU waits for the queued kernels."""
    return torch.tensor(values, dtype=dtype, device=device)


def teacher_log_probs(teacher_logits: torch.Tensor, temperature: float | Sequence[float], ensemble: str = "mean-prob",
                      members: Sequence[int] | None = None) -> torch.Tensor:
    """Log soft targets ``log p_T`` from raw stored logits.

    Args:
        teacher_logits: ``[batch, members, classes]`` raw logits at T=1 (any float dtype).
        temperature: T > 0; the logits are divided by it before the softmax. A list of U
            temperatures gives ``[U, batch, classes]``, all in one pass (a stacked sweep).
        ensemble: ``mean-prob`` (the paper's: the mean of the members' ``softmax(z/T)``) or
            ``mean-logit`` (softmax of the members' mean logit over T: a geometric mean).
        members: indices of the members to use; all when None.

    Returns:
        ``[batch, classes]`` float32 log-probabilities.
    """
    many = not isinstance(temperature, (int, float))
    temps = [float(t) for t in temperature] if many else [float(temperature)]
    if min(temps) <= 0:
        raise KdcacheError(f"temperature must be positive, got {temperature}")
    if teacher_logits.ndim != 3:
        raise KdcacheError(f"teacher_logits must be [batch, members, classes], got shape {tuple(teacher_logits.shape)}")
    z = teacher_logits.float()
    if members is not None:
        bad = [m for m in members if not 0 <= m < z.shape[1]]
        if bad or not members:
            raise KdcacheError(f"members {list(members)} asked for, the store has members 0..{z.shape[1] - 1}")
        z = z[:, list(members)]
    t = _constant(tuple(temps), z.device).view(-1, 1, 1, 1) if many else temperature
    if ensemble == "mean-prob":
        if z.shape[1] == 1:  # one member: the mean is the member itself (the same values, two ops fewer)
            return F.log_softmax(z[:, 0] / (t[..., 0] if many else t), dim=-1)
        logp = F.log_softmax(z / t, dim=-1)
        return torch.logsumexp(logp, dim=-2) - math.log(z.shape[1])
    if ensemble == "mean-logit":
        return F.log_softmax(z.mean(dim=1) / (t[..., 0] if many else t), dim=-1)
    raise KdcacheError(f"ensemble reduction {ensemble!r} is unknown; use one of {', '.join(ENSEMBLE_REDUCTIONS)}")


def soft_targets(teacher_logits: torch.Tensor, temperature: float, ensemble: str = "mean-prob",
                 members: Sequence[int] | None = None) -> torch.Tensor:
    """``p_T`` ``[batch, classes]``: the probabilities of :func:`teacher_log_probs`."""
    return teacher_log_probs(teacher_logits, temperature, ensemble, members).exp()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: Any, labels: torch.Tensor,
                      temperature: float = 1.0, alpha: float = 0.0, ensemble: str = "mean-prob",
                      members: Sequence[int] | None = None) -> torch.Tensor:
    """``alpha * T^2 * KL(p_T(teacher) || p_T(student)) + (1 - alpha) * CE(student, label)``.

    The ``T^2`` keeps the soft term's gradient the same size as T changes (Hinton et al. 2015, sec. 2).
    The KL is averaged over the batch (``batchmean``); the cross-entropy over the rows that have a
    label (label -1 rows contribute only the soft term).

    Args:
        student_logits: ``[batch, classes]``.
        teacher_logits: ``[batch, members, classes]`` raw stored logits, a batch of sparse targets
            (:class:`kdcache.sparse.SparseTargets`, from a top-k or sampled store), or None when ``alpha`` is 0.
        labels: ``[batch]`` int64, -1 where there is no label.
    """
    if not 0.0 <= alpha <= 1.0:
        raise KdcacheError(f"alpha must be in [0, 1], got {alpha}")
    loss = student_logits.new_zeros(())
    if alpha > 0:
        if teacher_logits is None:
            raise KdcacheError("alpha > 0 needs teacher logits: pass a store")
        if isinstance(teacher_logits, torch.Tensor):
            target = teacher_log_probs(teacher_logits, temperature, ensemble, members)
            student = F.log_softmax(student_logits.float() / temperature, dim=-1)
            kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
        else:
            from kdcache.sparse import sparse_kl
            kl = sparse_kl(student_logits, teacher_logits.member(members), temperature)
        loss = loss + alpha * temperature ** 2 * kl
    if alpha < 1:
        labelled = labels >= 0
        n = labelled.sum().clamp(min=1)  # a tensor, not a Python int: no device sync per step
        ce = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none")
        loss = loss + (1 - alpha) * (ce * labelled).sum() / n
    return loss


def distillation_losses(student_logits: torch.Tensor, teacher_logits: Any, labels: torch.Tensor,
                        temperatures: Sequence[float], alphas: Sequence[float], ensemble: str = "mean-prob",
                        members: Sequence[int] | None = None) -> torch.Tensor:
    """:func:`distillation_loss` for S students at once (a stacked sweep): one loss per student.

    Args:
        student_logits: ``[students, batch, classes]``.
        teacher_logits: as for :func:`distillation_loss`, shared by every student.
        labels: ``[batch]``.
        temperatures, alphas: one per student.

    Returns:
        ``[students]`` float32; entry i equals ``distillation_loss(student_logits[i], ..., temperatures[i],
        alphas[i])`` (a test pins it), so summing them gives each student its own gradient.
    """
    s_count, batch = student_logits.shape[:2]
    if len(temperatures) != s_count or len(alphas) != s_count:
        raise KdcacheError(f"{s_count} students need {s_count} temperatures and alphas, got "
                           f"{len(temperatures)} and {len(alphas)}")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise KdcacheError(f"alpha must be in [0, 1], got {a}")
    s = student_logits.float()
    dev = s.device
    loss = s.new_zeros(s_count)
    alpha = _constant(tuple(float(a) for a in alphas), dev)
    temps = _constant(tuple(float(t) for t in temperatures), dev)
    if any(a > 0 for a in alphas):
        if teacher_logits is None:
            raise KdcacheError("alpha > 0 needs teacher logits: pass a store")
        if isinstance(teacher_logits, torch.Tensor):
            # the teacher's soft targets once per distinct temperature, shared by the students at that T
            distinct = sorted(set(float(t) for t in temperatures))
            target = teacher_log_probs(teacher_logits, distinct, ensemble, members)  # [distinct T, batch, classes]
            pick = _constant(tuple(distinct.index(float(t)) for t in temperatures), dev, torch.long)
            target = target[pick]                                               # [S, batch, classes]
            log_q = F.log_softmax(s / temps[:, None, None], dim=-1)
            kl = (target.exp() * (target - log_q)).sum(dim=(1, 2)) / batch  # kl_div(..., reduction="batchmean")
        else:
            from kdcache.sparse import sparse_kl
            one = teacher_logits.member(members)
            kl = torch.stack([sparse_kl(s[i], one, float(t)) if a > 0 else s.new_zeros(())
                              for i, (t, a) in enumerate(zip(temperatures, alphas))])
        loss = loss + alpha * temps ** 2 * kl
    if any(a < 1 for a in alphas):
        labelled = labels >= 0
        n = labelled.sum().clamp(min=1)
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.clamp(min=0).repeat(s_count), reduction="none")
        loss = loss + (1 - alpha) * (ce.view(s_count, batch) * labelled).sum(dim=1) / n
    return loss
