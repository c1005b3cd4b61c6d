"""`fastdistil embed --model DIR --input texts.txt --output emb.npy`: sentence embeddings, one row per line."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("embed", help="embed the lines of a text file into a .npy matrix")
    p.add_argument("--model", default=None, help="HF or sentence-transformers directory (default: embedded MiniLM)")
    p.add_argument("--input", required=True, help="UTF-8 text file, one text per line (blank lines skipped)")
    p.add_argument("--output", required=True, help="where to write the (N, d) float32 .npy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    return p


def run(args) -> int:
    import numpy as np

    from .. import FastStudent
    from .demo import default_model_dir

    src = Path(args.input)
    try:
        texts = [line.strip() for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise OSError(f"cannot read {src}: {e}") from None
    if not texts:
        raise ValueError(f"{src} holds no non-empty lines")
    model = FastStudent.from_pretrained(args.model or default_model_dir())
    emb = model.encode(texts, batch_size=args.batch_size, normalize=not args.no_normalize,
                       max_length=args.max_length, show_progress=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, emb.numpy())
    print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32")
    return 0
