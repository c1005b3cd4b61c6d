"""Engines of the training workloads (`train`: one forward + backward + optimizer step; `distill`: one distillation
step through fastdistil.distill), with the saved-activation and peak-RSS measures they report. The inference engines
and the registry that names all of them live in bench/engines.py."""
from __future__ import annotations


import torch

from ..backend import use_backend
from .engines import Engine, FastEngine, Skip, TransformersEngine, _check_backend, hf_model


# ---- training step ---------------------------------------------------------------------------------------------


class _TrainMixin:
    kind = "train"
    autocast = None  # a dtype: fp32 weights under torch.autocast (what Trainer(bf16=True / fp16=True) runs)

    def _build(self, ctx):  # -> model with transformers' head keys
        raise NotImplementedError

    def setup(self, ctx):
        Engine.setup(self, ctx)
        self.model = self._build(ctx)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.extra["saved_activation_MB"] = round(saved_bytes(self._loss) / 2**20, 1)
        self.model.zero_grad(set_to_none=True)
        # one untimed step for its peak memory, then the weights and optimizer are put back as they were
        keep = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
            base = torch.cuda.memory_allocated(ctx.device)
            self()
            self.extra["peak_cuda_MB"] = round((torch.cuda.max_memory_allocated(ctx.device) - base) / 2**20, 1)
        else:
            peak = peak_rss_delta(self)
            if peak is not None:
                self.extra["peak_rss_MB"] = round(peak / 2**20, 1)
        self.model.load_state_dict(keep)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.model.zero_grad(set_to_none=True)

    def _loss(self):
        with torch.autocast(self.ctx.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            return self._forward(self.ctx.ids, self.ctx.mask, self.ctx.labels).loss

    def __call__(self):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        self.opt.step()
        return loss

    def check(self):
        """Loss and every gradient of one step with dropout off (eval mode, gradients on), weights unchanged."""
        m = self.model
        m.eval()
        m.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        out = {"loss": loss.detach().float().cpu().reshape(1)}
        out.update({k: p.grad.detach().float().cpu() for k, p in m.named_parameters() if p.grad is not None})
        m.zero_grad(set_to_none=True)
        m.train()
        return out


class TransformersTrainEngine(_TrainMixin, TransformersEngine):
    def _build(self, ctx):
        return hf_model(ctx, self.attn, self.dtype, head=True).train()

    def _forward(self, ids, mask, labels):
        return self.model(input_ids=ids, attention_mask=mask, labels=labels)


class FastTrainEngine(_TrainMixin, FastEngine):
    def _build(self, ctx):
        _check_backend(self.backend, ctx.device)
        from ..heads import FastStudentForSequenceClassification
        hf = hf_model(ctx, "eager", head=True)
        return FastStudentForSequenceClassification.from_hf(hf).to(device=ctx.device, dtype=self.dtype).train()

    def _forward(self, ids, mask, labels):
        with use_backend(self.backend):
            return self.model(ids, attention_mask=mask, labels=labels)

    def __call__(self):
        with use_backend(self.backend):
            return super().__call__()

    def check(self):
        with use_backend(self.backend):
            return super().check()


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs its forward (each storage counted once;
    parameters excluded): the activation memory of training, measurable on any device."""
    seen: dict[tuple, int] = {}
    params = set()

    def pack(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device.type)] = st.nbytes()
        return t

    ctx = getattr(fn, "__self__", None)
    model = getattr(ctx, "model", None)
    if model is not None:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    del loss
    return sum(seen.values())


def peak_rss_delta(fn) -> int | None:
    """Peak resident memory while `fn()` runs, above the resident memory before it (Linux: the high-water mark
    is reset through /proc/self/clear_refs; None where that is not possible). Memory the allocator returns to
    the system between steps is counted again, so this is an upper bound of the step's working set."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status("VmRSS")
        fn()
        return max(0, _proc_status("VmHWM") - before)
    except OSError:
        return None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


# ---- distillation step -----------------------------------------------------------------------------------------


class DistillEngine(Engine):
    """One fastdistil.distill Distiller step (recipe minilmv2, as many relation heads as the student has heads):
    a BERT-base-shaped teacher (12 x 768, random weights; 2 x twice the width for the tiny smoke-test model) and
    the workload's student (the reference weights), on one backend."""
    family = "fastdistil"
    kind = "distill"

    def setup(self, ctx):
        super().setup(ctx)
        _check_backend(self.backend, ctx.device)
        try:
            from ..distill import Distiller, build_recipe
        except ImportError as e:
            raise Skip(f"fastdistil.distill is not available ({e})") from None
        from ..config import FastStudentConfig
        from ..model import FastStudent
        student = FastStudent.from_hf(hf_model(ctx, "eager")).to(ctx.device).train()
        tc = ctx.scratch.get("teacher_state")
        c = ctx.hf_config
        big = c.hidden_size >= 384  # BERT-base-shaped teacher; a small one for the tiny smoke-test student
        tcfg = FastStudentConfig(vocab_size=c.vocab_size, hidden_size=768 if big else 2 * c.hidden_size,
                                 num_hidden_layers=12 if big else 2, num_attention_heads=12 if big else
                                 c.num_attention_heads, intermediate_size=3072 if big else 8 * c.hidden_size,
                                 max_position_embeddings=c.max_position_embeddings)
        torch.manual_seed(0)
        teacher = FastStudent(tcfg)
        if tc is None:
            ctx.scratch["teacher_state"] = teacher.state_dict()
        else:
            teacher.load_state_dict(tc)
        teacher = teacher.to(ctx.device)
        try:
            recipe = build_recipe("minilmv2", teacher, student, relation_heads=c.num_attention_heads)
        except (ValueError, TypeError) as e:
            raise Skip(f"fastdistil.distill cannot build the minilmv2 recipe here: {e}") from None
        with use_backend(self.backend):
            self.distiller = Distiller(teacher, student, recipe.objectives, plan=recipe.plan, lr=1e-5)
        self.batch = {"input_ids": ctx.ids, "attention_mask": ctx.mask,
                      "token_type_ids": torch.zeros_like(ctx.ids)}
        self.extra["recipe"] = "minilmv2"

    def __call__(self):
        with use_backend(self.backend):
            return self.distiller.step(self.batch)

    def check(self):
        with use_backend(self.backend):
            out = self.distiller(self.batch, step=0)
        return {"loss": out["loss"].detach().float().cpu().reshape(1)}
