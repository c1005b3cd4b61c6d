"""The Distiller: teacher + student + weighted objectives + optimizer + schedule, for one batch or a whole run.

Inside your own loop::

    d = Distiller(teacher, student, [HiddenMSE(...), RelationKL(...)], lr=1e-4, max_steps=1000)
    for batch in batches:                 # Batch (packed) or a dict with input_ids / attention_mask / labels
        out = d(batch)                    # {"loss": weighted total (with graph), "<objective>": each, detached}
        out["loss"].backward(); ...       # your optimizer, or:
    d.step(batch)                         # forward + backward + clip + optimizer + scheduler, returns floats

or as a complete loop: ``d.fit(batches, max_steps=1000)``.

Per step: the teacher runs under torch.inference_mode on the packed batch, recording only the hidden states and
q, k, v the active objectives read (never attention probabilities); targets that only depend on the example
(logits of a classifier, pooled and [CLS] vectors) come from the TeacherCache when it has them, and then the
teacher does not run. A `plan` (recipes.py) may change the active objectives, their weights and the frozen
parameters with the step (XtremeDistil's stages and gradual unfreezing).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..heads import FastStudentForSequenceClassification
from ..padding import Packing
from .data import Batch
from .models import FastStudentForMaskedLM, Needs, Side, body, check_pair, forward_side, freeze_teacher, side_to

log = logging.getLogger("fastdistil")


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is NaN or inf; raised before the optimizer touches the weights.
    `values`: the step's losses, lr and grad_norm as floats."""

    def __init__(self, step: int, values: dict):
        self.step, self.values = step, values
        super().__init__(f"step {step}: the loss is {values.get('loss')} and the gradient norm "
                         f"{values.get('grad_norm')}: training diverged (a learning rate too high, or bad data); "
                         "the weights were not updated")


@dataclass
class Phase:
    """What a step trains: active objectives with their weights, and which parameters are frozen.

    weights: {objective name: weight}; objectives not listed are off. frozen: parameter-name prefixes (names as
    in `Distiller.core.named_parameters()`, e.g. "student.bert.encoder.layer.0.") that get no gradient.
    """
    name: str
    weights: dict
    frozen: tuple = ()


class ConstantPlan:
    """Every step trains every objective with its own weight; nothing is frozen."""

    def __init__(self, objectives):
        self._phase = Phase("distill", {o.name: o.weight for o in objectives})

    def phase(self, step: int) -> Phase:
        return self._phase


class _Core(nn.Module):
    """The trainable part (student + objectives' projections); what DDP wraps and checkpoints hold."""

    def __init__(self, student, objectives):
        super().__init__()
        self.student = student
        self.objectives = nn.ModuleDict({o.name: o for o in objectives})

    def forward(self, batch: Batch, teacher: Side, needs: Needs, weights: dict):
        s = forward_side(self.student, batch, needs)
        out, total = {}, None
        for name, w in weights.items():
            loss = self.objectives[name](s, teacher, batch)
            out[name] = loss
            total = loss * w if total is None else total + loss * w
        out["loss"] = total
        return out


def _adamw(params, lr: float, weight_decay: float):
    """AdamW, fused (one kernel over all parameters: several times faster on CPU) where this torch has it."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _linear_schedule(warmup: int, total: int | None):
    def f(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        if total is None:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


class Distiller:
    """Distil `teacher` into `student` with weighted objectives.

    Args:
        teacher: FastStudent (or a head model on it); frozen here (eval, no grad), runs under inference_mode. It
            may hold another dtype than the student (a bfloat16 teacher runs about 2x faster on CPUs with
            AVX512-BF16 and on GPUs); its targets are cast to the student's dtype.
        student: FastStudent or head model, trained.
        objectives: Objective modules with distinct names (see objectives.py); their weights are used unless a
            plan says otherwise.
        lr, weight_decay, warmup_steps, max_steps: AdamW and a linear warmup / linear decay schedule (constant after
            warmup when max_steps is None). Pass `optimizer` / `scheduler` to use your own (built on
            `distiller.parameters()`).
        plan: per-step Phase source (ConstantPlan by default; recipes.XtremeDistilPlan for staged training).
        cache: optional TeacherCache serving per-example teacher targets.
        grad_clip: max global gradient norm (None: no clipping).
        seed: seeds the per-step RNG (dropout, MLM masking) as a pure function of (seed, step, rank), so a resumed
            run draws the same random numbers as an uninterrupted one.
        mask_token_id, mlm_probability: MLM masking for objectives on MLM logits (teacher with an MLM head).
        ddp: wrap the trainable part in DistributedDataParallel when torch.distributed is initialised.
    """

    def __init__(self, teacher, student, objectives, *, lr: float = 1e-4, weight_decay: float = 0.01,
                 warmup_steps: int = 0, max_steps: int | None = None, optimizer=None, scheduler=None, plan=None,
                 cache=None, grad_clip: float | None = 1.0, seed: int = 0, mask_token_id: int = 103,
                 mlm_probability: float = 0.15, ddp: bool = True):
        check_pair(teacher, student)
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be distinct, got {names}")
        if not objectives:
            raise ValueError("give at least one objective")
        self.teacher = freeze_teacher(teacher)
        self.n_student = body(student).config.num_hidden_layers
        self.n_teacher = body(teacher).config.num_hidden_layers
        for o in objectives:
            o.bind(self.n_student, self.n_teacher)
        dev = next(student.parameters()).device
        self.student_dtype = next(student.parameters()).dtype
        self.teacher_dtype = next(teacher.parameters()).dtype
        self.core = _Core(student, objectives).to(dev)
        self.plan = plan or ConstantPlan(objectives)
        self.cache = cache
        self.grad_clip = grad_clip
        self.seed = int(seed)
        self.mask_token_id, self.mlm_probability = int(mask_token_id), float(mlm_probability)
        self.global_step = 0
        self.max_steps = max_steps
        # parameters the caller froze before handing the student over stay frozen in every phase
        self._user_frozen = tuple(n for n, p in self.core.named_parameters() if not p.requires_grad)
        self.optimizer = optimizer or _adamw(self.parameters(), lr, weight_decay)
        self.scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _linear_schedule(warmup_steps, max_steps))
        self._use_ddp = ddp and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self._use_ddp else 0
        self._ddp = None
        self._frozen = None
        self._cacheable = {"mean", "cls"} | ({"logits"} if isinstance(teacher, FastStudentForSequenceClassification)
                                            else set())
        self._apply_phase(self.plan.phase(0))

    # ---- parameters and phases -------------------------------------------------------------------------------
    @property
    def student(self):
        return self.core.student

    @property
    def objectives(self):
        return self.core.objectives

    def parameters(self):
        """The trainable parameters (student and projections): all but those frozen before construction; the
        ones a phase freezes are included (they get no gradient then, and AdamW skips them)."""
        return [p for n, p in self.core.named_parameters() if n not in self._user_frozen]

    def frozen_parameters(self) -> list[str]:
        """Names (as in core.named_parameters()) of the parameters frozen in the current phase."""
        return [n for n, p in self.core.named_parameters() if not p.requires_grad]

    def _apply_phase(self, phase: Phase) -> Phase:
        for n in phase.weights:
            if n not in self.core.objectives:
                raise ValueError(f"the plan names objective {n!r}, which the distiller does not have")
        frozen = tuple(phase.frozen) + self._user_frozen
        if frozen != self._frozen:
            for n, p in self.core.named_parameters():
                p.requires_grad_(not n.startswith(frozen) if frozen else True)
            self._frozen = frozen
            if self._use_ddp:  # DDP registers hooks on the parameters that require grad: re-wrap
                from torch.nn.parallel import DistributedDataParallel as DDP
                self._ddp = DDP(self.core, find_unused_parameters=True)
        self.phase = phase
        return phase

    # ---- one batch ------------------------------------------------------------------------------------------
    def _as_batch(self, batch) -> Batch:
        if isinstance(batch, Batch):
            return batch.to(next(self.core.parameters()).device)
        if isinstance(batch, dict) and "input_ids" in batch:
            enc = body(self.student)
            ids, tt, pos, p = enc.prepare(batch["input_ids"], batch.get("attention_mask"),
                                          batch.get("token_type_ids"))
            index = batch.get("index")
            if index is None:
                index = torch.full((p.batch,), -1, dtype=torch.int64)
            labels = batch.get("labels")
            if p.indices is None:
                p = Packing(torch.arange(p.batch * p.seqlen, device=ids.device), p.cu_seqlens, p.max_seqlen,
                            p.batch, p.seqlen)
            return Batch(ids, tt, pos, p, torch.as_tensor(index).cpu(),
                         None if labels is None else labels.to(ids.device))
        raise TypeError(f"a batch is a fastdistil.distill.Batch or a dict with input_ids, got {type(batch).__name__}")

    def _needs(self, weights):
        ns, nt = Needs(), Needs()
        for name in weights:
            a, b = self.core.objectives[name].needs(self.n_student, self.n_teacher)
            ns, nt = ns | a, nt | b
        return ns, nt

    def _mask_mlm(self, batch: Batch, step: int) -> None:
        """DistilBERT-style masking in place: 15% of tokens (never a sequence's first or last) -> 80% [MASK],
        10% random, 10% kept; positions and original ids go to batch.extra."""
        g = torch.Generator().manual_seed(self._step_seed(step) + 7)
        T = batch.num_tokens
        cu = batch.packing.cu_seqlens.cpu().to(torch.int64)
        special = torch.zeros(T, dtype=torch.bool)
        special[cu[:-1].clamp(max=max(T - 1, 0))] = True
        special[(cu[1:] - 1).clamp(min=0)] = True
        pick = (torch.rand(T, generator=g) < self.mlm_probability) & ~special
        if not pick.any() and (~special).any():
            pick[torch.nonzero(~special)[0]] = True
        pos = torch.nonzero(pick).flatten()
        ids = batch.ids.cpu().clone()
        labels = ids[pos].clone()
        r = torch.rand(pos.shape[0], generator=g)
        ids[pos[r < 0.8]] = self.mask_token_id
        rnd = pos[(r >= 0.8) & (r < 0.9)]
        ids[rnd] = torch.randint(body(self.student).config.vocab_size, (rnd.shape[0],), generator=g)
        dev = batch.ids.device
        batch.ids = ids.to(dev)
        batch.extra["mlm_pos"], batch.extra["mlm_labels"] = pos.to(dev), labels.to(dev)

    def _step_seed(self, step: int) -> int:
        return (self.seed * 1_000_003 + step * 7919 + self.rank * 104_729) % (2 ** 62)

    def teacher_targets(self, batch: Batch, needs: Needs, cache_ok: bool) -> Side:
        """The teacher's side for this batch: from the cache when every needed target is there, else a forward
        under inference_mode (whose cacheable outputs are then stored)."""
        fields = [f for f, want in (("logits", needs.logits), ("mean", needs.mean), ("cls", needs.cls)) if want]
        dev = batch.ids.device
        cache_ok = cache_ok and self.cache is not None and bool((batch.index >= 0).all())  # -1: no example index
        if (cache_ok and fields and not needs.hidden and not needs.qkv and set(fields) <= self._cacheable
                and self.cache.has(fields, batch.index)):
            self.cache.hits += 1
            return Side(**{f: self.cache.get(f, batch.index, dev).to(self.student_dtype) for f in fields})
        with torch.inference_mode():
            t = forward_side(self.teacher, batch, needs)
            if self.teacher_dtype != self.student_dtype:  # e.g. a bf16 teacher: targets in the student's dtype
                t = side_to(t, self.student_dtype)
        if cache_ok:
            self.cache.misses += 1
            for f in fields:
                if f in self._cacheable and f in self.cache.fields:
                    self.cache.put(f, batch.index, getattr(t, f))
        return t

    def __call__(self, batch, step: int | None = None, model=None) -> dict:
        """Losses of one batch: {"loss": the weighted total (with graph), <objective name>: unweighted loss}.

        Args:
            batch: a packed Batch or a dict (input_ids, attention_mask, token_type_ids, optional labels and
                `index`: example indices, needed for the cache).
            step: the step whose phase applies (default: the distiller's own counter).
            model: the module that runs `core` (a DDP or Trainer wrapper of distiller.core); default: the
                distiller's own (DDP when distributed, else core).
        """
        step = self.global_step if step is None else step
        phase = self._apply_phase(self.plan.phase(step))
        batch = self._as_batch(batch)
        weights = {n: w for n, w in phase.weights.items() if w != 0}
        if not weights:
            raise ValueError(f"phase {phase.name!r} has no active objective")
        ns, nt = self._needs(weights)
        mlm = ns.logits and isinstance(self.teacher, FastStudentForMaskedLM)
        if mlm and "mlm_pos" not in batch.extra:
            self._mask_mlm(batch, step)
        t = self.teacher_targets(batch, nt, cache_ok=not mlm)
        if model is None:
            model = self._ddp if self._ddp is not None else self.core
        out = model(batch, t, ns, weights)
        return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}

    def step(self, batch) -> dict:
        """One optimisation step on `batch`: forward, backward, clip, optimizer and scheduler. Returns floats:
        loss, each objective, lr, grad_norm, tokens. Raises NonFiniteError, with the weights, optimizer and step
        count unchanged, when the loss or the gradient norm is NaN or inf."""
        torch.manual_seed(self._step_seed(self.global_step))
        self.core.train()
        batch = self._as_batch(batch)
        out = self(batch)
        if out["loss"].requires_grad:  # else nothing this phase reads is trainable: the step only advances
            out["loss"].backward()
        params = [p for p in self.core.parameters() if p.grad is not None]
        gn = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        if not (math.isfinite(float(out["loss"].detach())) and math.isfinite(float(gn))):  # never into the weights
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(self.global_step + 1, {**{k: float(v.detach()) for k, v in out.items()},
                                                        "grad_norm": float(gn),
                                                        "lr": self.optimizer.param_groups[0]["lr"]})
        if self.grad_clip and float(gn) > self.grad_clip:  # scale only when clipping (a no-op pass otherwise)
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, gn)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        res = {k: float(v.detach()) for k, v in out.items()}
        res.update(lr=lr, grad_norm=float(gn), tokens=batch.num_tokens,
                   phase=self.phase.name)
        self.global_step += 1
        return res

    def fit(self, batches, max_steps: int | None = None, callback=None) -> list[dict]:
        """Train on an iterable of batches until it ends or `max_steps` (default: self.max_steps) steps are done.
        `callback(step_result)` is called after every step; returns the list of step results."""
        max_steps = self.max_steps if max_steps is None else max_steps
        history = []
        for batch in batches:
            if max_steps is not None and self.global_step >= max_steps:
                break
            r = self.step(batch)
            r["step"] = self.global_step
            history.append(r)
            if callback is not None:
                callback(r)
        return history

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"core": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.core.load_state_dict(state["core"])
        self.global_step = int(state["global_step"])
        self._apply_phase(self.plan.phase(self.global_step))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
