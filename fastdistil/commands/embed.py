"""`fastdistil embed --model DIR --input texts.txt --output emb.npy`: sentence embeddings, one row per line."""
from __future__ import annotations

from pathlib import Path


def read_lines(path) -> list[str]:
    """The lines of a UTF-8 text file, split on "\\n" only (a CRLF's "\\r" is dropped; form feeds, U+2028 and other
    characters str.splitlines() breaks on stay inside their line). Every line is a row, empty ones included, so row
    i of the output is line i + 1 of the file; a final newline ends the last line rather than starting another."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror or e}") from None
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the first text
        text = text[1:]
    if not text:
        raise ValueError(f"{path} is empty: nothing to embed")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def add_parser(sub):
    from ..cli import int_at_least
    p = sub.add_parser("embed", help="embed the lines of a text file into a .npy matrix")
    p.add_argument("--model", default=None, help="HF or sentence-transformers directory (default: embedded MiniLM)")
    p.add_argument("--input", required=True, help="UTF-8 text file, one text per line: lines are split on \\n only "
                   "(CRLF is fine) and every line is a row, an empty line included (the embedding of the empty "
                   "text), so row i is line i + 1")
    p.add_argument("--output", required=True, help="the .npy file to write, exactly this path (written to a "
                   "temporary file and renamed: an interrupted run leaves the old file)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--max-length", type=int_at_least(2), default=None,
                   help="tokens per text, [CLS] and [SEP] included (default: the model's)")
    p.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    return p


def run(args) -> int:
    import numpy as np

    from .. import FastStudent
    from ..atomic import atomic_write
    from .demo import default_model_dir

    out = Path(args.output)
    if out.is_dir():
        raise ValueError(f"--output {out} is a directory; give a file name, e.g. {out / 'embeddings.npy'}")
    texts = read_lines(args.input)
    model = FastStudent.from_pretrained(args.model or default_model_dir())
    emb = model.encode(texts, batch_size=args.batch_size, normalize=not args.no_normalize,
                       max_length=args.max_length, show_progress=True)
    with atomic_write(out) as f:  # np.save to a file object writes exactly `out` (a path would gain ".npy")
        np.save(f, emb.numpy())
    print(f"wrote {out}: {emb.shape[0]} x {emb.shape[1]} float32")
    return 0
