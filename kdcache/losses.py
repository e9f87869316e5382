"""Temperature and the distillation loss, in exactly one place."""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError

ENSEMBLE_REDUCTIONS = ("mean-prob", "mean-logit")
LOSSES = ("kd", "logit-mse")  # the soft term: tempered KL (Hinton et al.), or logit matching (Ba & Caruana)


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise KdcacheError(f"loss {name!r} is unknown; use one of {', '.join(LOSSES)}")
    return name


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
        ``[batch, classes]`` float32 log-probabilities (float64 for float64 logits). The one place stored
        logits are tempered: numpy callers convert with ``torch.from_numpy``.
    """
    many = not isinstance(temperature, (int, float))
    temps = [float(t) for t in temperature] if many else [float(temperature)]
    if min(temps) <= 0:
        raise KdcacheError(f"temperature must be positive, got {temperature}")
    if teacher_logits.ndim != 3:
        raise KdcacheError(f"teacher_logits must be [batch, members, classes], got shape {tuple(teacher_logits.shape)}")
    z = teacher_logits if teacher_logits.dtype == torch.float64 else teacher_logits.float()
    if members is not None:
        bad = [m for m in members if not 0 <= m < z.shape[1]]
        if bad or not members:
            raise KdcacheError(f"members {list(members)} asked for, the store has members 0..{z.shape[1] - 1}")
        z = z[:, list(members)]
    t = _constant(tuple(temps), z.device, z.dtype).view(-1, 1, 1, 1) if many else temperature
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


def logit_matching(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   members: Sequence[int] | None = None) -> torch.Tensor:
    """Ba & Caruana's logit regression, per row: ``sum_i (v_i - z_i)^2 / (2 C)`` with the student's
    logits ``v`` and the teacher's ``z`` (the members' mean logit) each centred over the C classes,
    averaged over the batch. Its gradient, ``(v_i - z_i) / C`` for centred logits, is the limit of the
    gradient of the ``T^2``-scaled KD term as T grows (Hinton et al. 2015, sec. 2.1; a test pins it).

    ``student_logits`` ``[..., batch, classes]``; ``teacher_logits`` ``[batch, members, classes]``.
    Returns ``[...]`` (a scalar for one student)."""
    if not isinstance(teacher_logits, torch.Tensor):
        raise KdcacheError("logit matching needs every logit: a top-k or sampled store does not keep the logits "
                           "outside its k (or draws); use a dense store, or the kd loss")
    z = teacher_logits.float()
    if members is not None:
        z = z[:, list(members)]
    z = z.mean(dim=1)
    v = student_logits.float()
    d = (v - v.mean(dim=-1, keepdim=True)) - (z - z.mean(dim=-1, keepdim=True))
    return d.pow(2).sum(dim=-1).mean(dim=-1) / (2 * d.shape[-1])


def distillation_loss(student_logits: torch.Tensor, teacher_logits: Any, labels: torch.Tensor,
                      temperature: float = 1.0, alpha: float = 0.0, ensemble: str = "mean-prob",
                      members: Sequence[int] | None = None, loss: str = "kd") -> torch.Tensor:
    """``alpha * T^2 * KL(p_T(teacher) || p_T(student)) + (1 - alpha) * CE(student, label)``.

    The ``T^2`` keeps the soft term's gradient the same size as T changes (Hinton et al. 2015, sec. 2).
    The KL is averaged over the batch (``batchmean``); the cross-entropy over the rows that have a
    label (label -1 rows contribute only the soft term). With ``loss="logit-mse"`` the soft term is
    :func:`logit_matching` instead (the temperature and ``ensemble`` play no part). It is
    :func:`distillation_losses` for one student: the same arithmetic, so a student trained alone and
    the same student in a stack see the same loss.

    Args:
        student_logits: ``[batch, classes]``.
        teacher_logits: ``[batch, members, classes]`` raw stored logits, a batch of sparse targets
            (:class:`kdcache.layouts.sparse.SparseTargets`, from a top-k or sampled store), or None when
            ``alpha`` is 0.
        labels: ``[batch]`` int64, -1 where there is no label.
    """
    return distillation_losses(student_logits[None], teacher_logits, labels, [temperature], [alpha], ensemble,
                               members, [loss])[0]


def distillation_losses(student_logits: torch.Tensor, teacher_logits: Any, labels: torch.Tensor,
                        temperatures: Sequence[float], alphas: Sequence[float], ensemble: str = "mean-prob",
                        members: Sequence[int] | None = None, losses: Sequence[str] | None = None) -> torch.Tensor:
    """:func:`distillation_loss` for S students at once (a stacked sweep): one loss per student.

    Args:
        student_logits: ``[students, batch, classes]``.
        teacher_logits: as for :func:`distillation_loss`, shared by every student.
        labels: ``[batch]``.
        temperatures, alphas: one per student.
        losses: one per student (``kd`` or ``logit-mse``; all ``kd`` when None). A logit-mse student's
            temperature is not used.

    Returns:
        ``[students]`` float32; summing them gives each student its own gradient. The teacher's soft
        targets are made once per distinct temperature; each student's weights ``alpha * T^2`` and
        ``1 - alpha`` are rounded once, from double precision, as Python arithmetic would.
    """
    s_count, batch = student_logits.shape[:2]
    if len(temperatures) != s_count or len(alphas) != s_count:
        raise KdcacheError(f"{s_count} students need {s_count} temperatures and alphas, got "
                           f"{len(temperatures)} and {len(alphas)}")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise KdcacheError(f"alpha must be in [0, 1], got {a}")
    losses = [check_loss(x) for x in losses] if losses is not None else ["kd"] * s_count
    if len(losses) != s_count:
        raise KdcacheError(f"{s_count} students need {s_count} losses, got {len(losses)}")
    matching = [x == "logit-mse" for x in losses]
    temperatures = [1.0 if m else float(t) for t, m in zip(temperatures, matching)]  # not used by logit matching
    s = student_logits.float()
    dev = s.device
    loss = s.new_zeros(s_count)
    if any(a > 0 for a in alphas):
        if teacher_logits is None:
            raise KdcacheError("alpha > 0 needs teacher logits: pass a store")
        soft = _soft_terms(s, teacher_logits, temperatures, alphas, matching, ensemble, members)
        weight = tuple(float(a) if m else float(a) * t ** 2 for a, t, m in zip(alphas, temperatures, matching))
        loss = loss + _constant(weight, dev) * soft
    if any(a < 1 for a in alphas):
        labelled = labels >= 0
        n = labelled.sum().clamp(min=1)  # a tensor, not a Python int: no device sync per step
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.clamp(min=0).repeat(s_count), reduction="none")
        hard = _constant(tuple(1.0 - float(a) for a in alphas), dev)
        loss = loss + hard * (ce.view(s_count, batch) * labelled).sum(dim=1) / n
    return loss


def _soft_terms(s: torch.Tensor, teacher_logits: Any, temperatures: list[float], alphas: Sequence[float],
                matching: list[bool], ensemble: str, members: Sequence[int] | None) -> torch.Tensor:
    """Each student's soft term ``[S]``, unweighted: the KL at its T, or its logit-matching loss."""
    s_count, batch = s.shape[:2]
    dev = s.device
    if not isinstance(teacher_logits, torch.Tensor):
        if any(matching):
            logit_matching(s, teacher_logits, members)  # refused, in its words
        one = teacher_logits.member(members)
        return torch.stack([one.layout.kl(s[i], one, t) if a > 0 else s.new_zeros(())
                            for i, (t, a) in enumerate(zip(temperatures, alphas))])
    # the teacher's soft targets once per distinct temperature, shared by the students at that T
    distinct = sorted(set(temperatures))
    target = teacher_log_probs(teacher_logits, distinct, ensemble, members)  # [distinct T, batch, classes]
    target = target[_constant(tuple(distinct.index(t) for t in temperatures), dev, torch.long)]  # [S, batch, C]
    log_q = F.log_softmax(s / _constant(tuple(temperatures), dev)[:, None, None], dim=-1)
    kl = (target.exp() * (target - log_q)).sum(dim=(1, 2)) / batch  # kl_div(..., reduction="batchmean")
    if not any(matching):
        return kl
    return torch.where(_constant(tuple(matching), dev, torch.bool), logit_matching(s, teacher_logits, members), kl)
