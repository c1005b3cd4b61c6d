"""The complete distillation run behind `fastdistil distill`: data, models, recipe, cache, loop, checkpoints,
exact resume, metrics and DistributedDataParallel.

Exact resume: everything a step depends on is a function of the arguments and the step number (the data order of
StepOrder, the per-step RNG seed of the Distiller, the learning-rate schedule), or is in the checkpoint (model,
projections, optimizer, scheduler, step, RNG). A checkpoint is written atomically (checkpoint.py), so a run killed
at any moment resumes from the last complete one and reaches bit-for-bit the same final loss on the same machine.

Under `torchrun --nproc_per_node=N` each rank takes 1/N of every global batch (--batch-size is the global batch);
gradients are averaged by DDP (gloo on CPU, nccl on GPU); rank 0 writes metrics, checkpoints and the final model.
The loss of a step is the mean of the ranks' batch losses, as in every DDP trainer: it equals the single-process
loss of the same global batch when the ranks' batches weigh the same (e.g. equal token counts for per-token means).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..atomic import atomic_write, remove_stale_temporaries, write_error
from ..loading import TOKENIZER_FILES
from . import checkpoint as ckpt
from .cache import TeacherCache
from .corpus import default_corpus
from .data import Examples, StepOrder, align_labels, collate, encode, read_examples
from .distiller import Distiller, NonFiniteError
from .models import FastStudentForSequenceClassification, body, check_pair, load_model, student_from_teacher
from .recipes import RECIPES
from .recipes import build as build_recipe

log = logging.getLogger("fastdistil")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "final"


@dataclass
class RunArgs:
    """The arguments of `fastdistil distill` (see its --help)."""
    teacher: str
    recipe: str
    out: str
    data: str | None = None
    student: str | None = None
    student_layers: list | None = None
    max_steps: int = 1000
    batch_size: int = 32
    max_length: int = 128
    lr: float = 1e-4
    seed: int = 0
    save_every: int = 500
    log_every: int = 1
    resume: bool = False
    warmup_ratio: float = 0.06
    cache: bool = True
    progress: bool = True
    max_texts: int | None = 20000
    teacher_dtype: str = "float32"

    def schedule_key(self) -> dict:
        """The arguments a resumed run must share with the run it continues."""
        keys = ("teacher", "recipe", "data", "student", "student_layers", "max_steps", "batch_size", "max_length",
                "lr", "seed", "warmup_ratio", "max_texts", "teacher_dtype")
        d = {k: getattr(self, k) for k in keys}
        d["teacher"] = str(Path(d["teacher"]).resolve()) if Path(d["teacher"]).exists() else d["teacher"]
        return d


def _validate(a: RunArgs) -> None:
    if a.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {a.recipe!r}; choose one of {', '.join(RECIPES)}")
    for name in ("max_steps", "batch_size", "save_every", "log_every"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {a.max_length}")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        raise ValueError(f"--lr must be a positive number, got {a.lr}")
    if a.teacher_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--teacher-dtype must be float32, bfloat16 or float16, got {a.teacher_dtype!r}")
    if a.student and a.student_layers:
        raise ValueError("give either --student or --student-layers, not both")


def _dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, dev


def _barrier(world):
    if world > 1:
        dist.barrier()


def _tokenizer(teacher_dir: str):
    from ..loading import load_tokenizer
    try:
        return load_tokenizer(teacher_dir)  # refuses a tokenizer that does not fit the teacher's vocabulary
    except Exception as e:
        raise OSError(f"teacher {teacher_dir} has no usable tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                      f"{type(e).__name__}: {e}") from None


def _examples(a: RunArgs) -> Examples:
    if a.data:
        return read_examples(a.data)
    return Examples(list(default_corpus(a.max_texts)), source="default corpus (Python standard library docstrings)")


def _fingerprint(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _teacher_id(directory: str) -> list:
    out = [str(Path(directory).resolve())]
    for f in sorted(Path(directory).glob("*")):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics of steps <= last_step (a resumed run rewrites the rest); drop a torn last line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with atomic_write(path) as f:
        f.write("".join(x + "\n" for x in keep).encode())


def _json_line(r: dict) -> str:
    """One metrics line of strict JSON: a non-finite number becomes null (json.dumps would write a bare NaN)."""
    safe = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
    return json.dumps(safe, allow_nan=False) + "\n"


def _content_key(examples: Examples, teacher_dir: str) -> dict:
    """Hashes of the training data (its parsed examples, so the built-in corpus counts too) and of the teacher's
    tokenizer files: a resumed run must see the same of both, not merely the same paths."""
    h = hashlib.sha256()
    for part in (examples.texts, examples.pairs or [], examples.labels or [], examples.label_names or []):
        for x in part:
            h.update(str(x).encode("utf-8", "surrogatepass") + b"\0")
        h.update(b"\1")
    t = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(teacher_dir) / name
        t.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"-") + b"\1")
    return {"data_sha256": h.hexdigest(), "tokenizer_sha256": t.hexdigest()}


def _check_resume_key(saved: dict, key: dict, out: Path) -> None:
    changed = [k for k in ("data_sha256", "tokenizer_sha256") if k in saved and saved[k] != key[k]]
    if changed:
        what = " and ".join({"data_sha256": "the training data", "tokenizer_sha256": "the teacher's tokenizer "
                             "files"}[k] for k in changed)
        raise ValueError(f"--resume: {what} changed since the checkpoint in {out} was written (content hash "
                         "differs); resuming would train on other examples than the run it continues. Restore them, "
                         "or start a new run in another --out")
    if not all(k in saved for k in ("data_sha256", "tokenizer_sha256")):
        log.warning("--resume: the checkpoint in %s predates content hashes; the data and tokenizer cannot be "
                    "checked to be unchanged", out)
    saved = {**{k: v for k, v in key.items() if k not in saved}, **saved}
    if saved != key:
        diff = {k: (saved.get(k), v) for k, v in key.items() if saved.get(k) != v}
        raise ValueError(f"--resume: the checkpoint in {out} was made with other arguments "
                         f"(checkpoint vs now: {diff}); resume with the same arguments")


def _check_finite(module, what: str) -> None:
    """Never write NaN/inf weights: raise naming how many tensors are not finite."""
    bad = [n for n, t in module.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise RuntimeError(f"not writing {what}: {len(bad)} tensors hold NaN or inf (first: {bad[0]}); training "
                           "diverged, rerun with a lower --lr")


def _check_label_range(examples: Examples, model, who: str) -> None:
    if examples.labels is None or not isinstance(model, FastStudentForSequenceClassification):
        return
    n = body(model).config.num_labels
    i = max(range(len(examples.labels)), key=examples.labels.__getitem__)
    if examples.labels[i] >= n:
        line = f":{examples.lines[i]}" if examples.lines else ""
        raise ValueError(f"{examples.source}{line}: label {examples.labels[i]} is out of range: the {who} classifies "
                         f"{n} classes (ids 0..{n - 1})")


def save_final(student, out_dir: Path, teacher_dir: str, tokenizer) -> Path:
    """The student as an HF directory (config.json + model.safetensors + tokenizer files)."""
    final = out_dir / FINAL
    student.save_pretrained(final)
    copied = False
    for f in TOKENIZER_FILES:
        if (Path(teacher_dir) / f).is_file():
            with atomic_write(final / f) as dst:
                dst.write((Path(teacher_dir) / f).read_bytes())
            copied = True
    if not copied:
        tokenizer.save_pretrained(str(final))
    return final


def run(a: RunArgs) -> dict:
    """Run (or resume) a distillation; returns the last step's metrics (with "final_dir")."""
    _validate(a)
    rank, world, dev = _dist_setup()
    if a.batch_size % world:
        raise ValueError(f"--batch-size {a.batch_size} (the global batch) must divide by the {world} processes")
    out = Path(a.out)
    ck_path = out / CHECKPOINT
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if ck_path.exists() and not a.resume:
            raise ValueError(f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose "
                             "another --out")
        for d in (out, out / FINAL):  # temporaries of a killed run (a checkpoint's can be hundreds of MB)
            for p in remove_stale_temporaries(d):
                log.info("removed %s, left by an interrupted write", p)
    torch.manual_seed(a.seed)
    teacher = load_model(a.teacher, role="teacher", device=dev)  # float32 first: the student copies its layers
    teacher_dir = teacher.name_or_path
    tok = _tokenizer(teacher_dir)
    tcfg = body(teacher).config
    max_length = min(a.max_length, tcfg.max_sequence_length)
    examples = _examples(a)
    align_labels(examples, tcfg.extra.get("label2id"))
    _check_label_range(examples, teacher, "teacher")
    if a.student:
        student = load_model(a.student, role="student", device=dev)
        check_pair(teacher, student)
    else:
        n = tcfg.num_hidden_layers
        layers = a.student_layers if a.student_layers else list(range(0, n, 2))
        student = student_from_teacher(teacher, layers)
    _check_label_range(examples, student, "student")
    student.to(dev)
    teacher.to(dtype=getattr(torch, a.teacher_dtype))
    max_length = min(max_length, body(student).config.max_sequence_length)
    enc = encode(examples, tok, max_length)
    recipe = build_recipe(a.recipe, teacher, student, has_labels=examples.labels is not None,
                          max_steps=a.max_steps)
    cache = None
    fields = {}
    if a.cache:
        for o in recipe.objectives:
            for f in o.cache_fields:
                if f == "logits" and isinstance(teacher, FastStudentForSequenceClassification):
                    fields[f] = ((tcfg.num_labels,), "float32")
                elif f in ("mean", "cls"):
                    fields[f] = ((tcfg.hidden_size,), "float32")
    if fields:
        fp = _fingerprint(_teacher_id(teacher_dir), examples.source, len(examples),
                          hashlib.sha1(enc.ids.numpy().tobytes()).hexdigest(), max_length)
        if rank == 0:
            cache = TeacherCache(out / "teacher_cache", len(examples), fields, fp, create=True)
        _barrier(world)
        if rank != 0:
            cache = TeacherCache(out / "teacher_cache", len(examples), fields, fp, create=False)
    distiller = Distiller(teacher, student, recipe.objectives, plan=recipe.plan, lr=a.lr, max_steps=a.max_steps,
                          warmup_steps=int(a.warmup_ratio * a.max_steps), cache=cache, seed=a.seed,
                          mask_token_id=tok.mask_token_id if tok.mask_token_id is not None else 103)
    order = StepOrder(len(enc), a.seed, a.batch_size, rank, world)
    start = 0
    key = {**a.schedule_key(), **_content_key(examples, teacher_dir)}
    if a.resume and ck_path.exists():
        state = ckpt.load(ck_path)
        _check_resume_key(state["args"], key, out)
        if state["world"] != world:
            log.warning("resuming a %d-process run with %d processes: same global batch, same data order",
                        state["world"], world)
        distiller.load_state_dict(state["distiller"])
        ckpt.set_rng_state(state["rng"])
        start = distiller.global_step
        if rank == 0:
            log.info("resumed from %s at step %d", ck_path, start)
    elif a.resume and rank == 0:
        log.info("--resume: no checkpoint in %s yet, starting from step 0", out)
    metrics_path = out / METRICS
    if rank == 0:
        _truncate_metrics(metrics_path, start) if start else metrics_path.write_text("")
        log.info("distilling %s (%d layers, d=%d) into %d layers (d=%d) with %s on %d examples (%s), %d steps of "
                 "%d sequences, %d process(es) on %s", teacher_dir, tcfg.num_hidden_layers, tcfg.hidden_size,
                 body(student).config.num_hidden_layers, body(student).config.hidden_size, a.recipe, len(examples),
                 examples.source, a.max_steps, a.batch_size, world, dev)

    saved = [start] if start else []

    def save(step):
        if rank == 0:
            _check_finite(distiller.core, f"the checkpoint of step {step}")
            ckpt.atomic_save({"distiller": distiller.state_dict(), "rng": ckpt.rng_state(), "args": key,
                              "world": world, "step": step}, ck_path)
            if cache is not None:
                cache.flush()
        saved[:] = [step]
        _barrier(world)

    bar = None
    if rank == 0 and a.progress:
        from tqdm import tqdm
        bar = tqdm(total=a.max_steps, initial=start, desc=f"distill {a.recipe}", unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
    last = {"step": start, "loss": float("nan")}  # a resumed run that was already complete trains no step
    t_last, tok_acc = time.perf_counter(), 0
    try:  # the bar is closed on every way out: left open, it redraws after the CLI's error line
        with open(metrics_path, "a") if rank == 0 else open(os.devnull, "w") as mf:
            for step in range(start, a.max_steps):
                batch = collate(enc, order.indices(step)).to(dev)
                try:
                    r = distiller.step(batch)
                except NonFiniteError as e:  # stop with the weights of the step before; keep the last checkpoint
                    mf.write(_json_line({"step": step + 1, **e.values, "error": "non-finite loss or gradient"}))
                    kept = f"{ck_path} (step {saved[0]}) is kept" if saved else "no checkpoint was written yet"
                    raise RuntimeError(f"{e}; the run stopped (--lr {a.lr:g}): {kept}, no final model is written") \
                        from None
                if world > 1:
                    vals = torch.tensor([r["loss"], float(r["tokens"])], dtype=torch.float64)
                    dist.all_reduce(vals)
                    r["loss"], r["tokens"] = float(vals[0]) / world, int(vals[1])
                tok_acc += r["tokens"]
                done = step + 1
                now = time.perf_counter()
                rate = tok_acc / max(now - t_last, 1e-9)
                r.update(step=done, epoch=round(order.epoch(done), 4), tokens_per_s=round(rate, 1))
                last = r
                if bar is not None:
                    bar.set_postfix(loss=f"{r['loss']:.4f}", tok_s=f"{rate:,.0f}", phase=r["phase"], refresh=False)
                    bar.update(1)
                if rank == 0 and (done % a.log_every == 0 or done == a.max_steps):
                    try:
                        mf.write(_json_line(r))
                        mf.flush()
                    except OSError as e:  # a full disk: say so and where, like every other write of the run
                        raise write_error(metrics_path, e) from None
                    t_last, tok_acc = now, 0
                if done % a.save_every == 0 or done == a.max_steps:
                    save(done)
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        _check_finite(distiller.student, "the final student")
        final = save_final(distiller.student, out, teacher_dir, tok)
        last["final_dir"] = str(final)
        if cache is not None:
            last["cache_hits"], last["cache_misses"] = cache.hits, cache.misses
        log.info("final student written to %s", final)
    _barrier(world)
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return last
