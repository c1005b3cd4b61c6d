"""Distillation data: reading texts (and labels), tokenising once, a data order that is a pure function of
(seed, step), and packed batches that never hold a padding token.

Files:
- ``.txt``: one text per non-empty line (task-agnostic distillation).
- ``.jsonl``: one JSON object per line with ``text`` (or ``sentence`` / ``text_a``), optional ``text_b`` (or
  ``text_pair``) and optional ``label``: integer class ids (>= 0) or string class names (mapped to ids in sorted
  order, or through the teacher's label2id); one type per file (1, 1.0, true and "1" are refused when mixed, and
  floats and booleans always, with the line number).
Lines are split on "\\n" only (a CRLF's "\\r" is dropped), never on the other characters str.splitlines() takes as
line breaks (U+2028 is valid inside a JSON string).
- ``.tsv``: a header row naming the columns ``text`` [``text_b``] [``label``]; without a header a line is
  ``text<TAB>label`` or ``text<TAB>text_b<TAB>label`` (a single column is a text).

The order: the example stream is epoch after epoch of a permutation drawn from ``(seed, epoch)``; the global batch
of step s is stream[s*G : (s+1)*G] and rank r of W takes its r-th slice of G/W. So where a run stops does not
matter: step s always sees the same examples, which is what makes resume exact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..padding import Packing


@dataclass
class Examples:
    """Texts with optional pairs and labels, in file order (the example index is the position here)."""
    texts: list[str]
    pairs: list[str] | None = None
    labels: list[int] | None = None
    label_names: list[str] | None = None
    source: str = ""
    lines: list[int] | None = None  # the file line of each example, for error messages

    def __len__(self) -> int:
        return len(self.texts)


def _label_ids(raw: list, lines: list[int], where: str) -> tuple[list[int], list[str]]:
    """Labels of one type: integer class ids (>= 0), or strings (all digits: ids; else names, sorted)."""
    first = {}
    for v, n in zip(raw, lines):
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            hint = f" (write {int(v)})" if isinstance(v, float) and v.is_integer() else ""
            raise ValueError(f"{where}:{n}: label {json.dumps(v)} is a {type(v).__name__}{hint}; labels are integer "
                             "class ids or string class names")
        first.setdefault(type(v), n)
    if len(first) > 1:
        raise ValueError(f"{where}: labels mix integers (first on line {first[int]}) and strings (first on line "
                         f"{first[str]}); use one type in a file (1 and \"1\" would be two different classes)")
    if str in first:
        if not all(v.strip().lstrip("-").isdecimal() for v in raw):
            names = sorted(set(raw))
            ids = {name: i for i, name in enumerate(names)}
            return [ids[v] for v in raw], names
        raw = [int(v) for v in raw]
    low = min(range(len(raw)), key=raw.__getitem__)
    if raw[low] < 0:
        raise ValueError(f"{where}:{lines[low]}: label {raw[low]} is negative; class ids start at 0")
    return list(raw), [str(i) for i in sorted(set(raw))]


def read_examples(path) -> Examples:
    """Read a .txt, .jsonl or .tsv file (see the module docstring).

    Raises:
        OSError: missing or unreadable file. ValueError: a malformed line (its number is given), no examples,
        labels on some lines but not others, an unknown extension.
    """
    path = Path(path)
    if not path.is_file():
        raise OSError(f"data file {path} does not exist" if not path.exists() else f"data path {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OSError(f"data file {path} is not UTF-8 text ({e})") from None
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.removeprefix("\ufeff").split("\n")]
    ext = path.suffix.lower()
    texts, pairs, labels, where = [], [], [], []
    if ext == ".txt":
        where = [n for n, t in enumerate(lines, 1) if t.strip()]
        texts = [lines[n - 1].strip() for n in where]
    elif ext == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where.append(n)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            text = next((obj[k] for k in ("text", "sentence", "text_a") if k in obj), None)
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: needs a string field 'text' (or 'sentence' / 'text_a')")
            texts.append(text)
            pair = next((obj[k] for k in ("text_b", "text_pair") if k in obj), None)
            pairs.append(pair)
            labels.append(obj.get("label"))
    elif ext == ".tsv":
        numbered = [(n, ln.split("\t")) for n, ln in enumerate(lines, 1) if ln.strip()]
        header = None
        if numbered and "text" in [c.strip().lower() for c in numbered[0][1]]:
            header = [c.strip().lower() for c in numbered[0][1]]
            numbered = numbered[1:]
        for n, row in numbered:
            where.append(n)
            if header:
                if len(row) != len(header):
                    raise ValueError(f"{path}: row {n} has {len(row)} columns, the header has {len(header)}")
                d = dict(zip(header, row))
                texts.append(d["text"])
                pairs.append(d.get("text_b"))
                labels.append(d.get("label"))
            elif len(row) == 1:
                texts.append(row[0]), pairs.append(None), labels.append(None)
            elif len(row) == 2:
                texts.append(row[0]), pairs.append(None), labels.append(row[1].strip())
            elif len(row) == 3:
                texts.append(row[0]), pairs.append(row[1]), labels.append(row[2].strip())
            else:
                raise ValueError(f"{path}: row {n} has {len(row)} columns; expected text[, text_b], label")
    else:
        raise ValueError(f"data file {path} has extension {ext!r}; use .txt (texts), .jsonl or .tsv (with labels)")
    if not texts:
        raise ValueError(f"data file {path} holds no examples")
    ex = Examples(texts=texts, source=str(path), lines=where)
    if any(p is not None for p in pairs):
        if any(p is None for p in pairs):
            raise ValueError(f"{path}: some examples have a second text (text_b) and others do not")
        ex.pairs = pairs
    if any(v is not None for v in labels):
        missing = [i for i, v in enumerate(labels) if v is None]
        if missing:
            raise ValueError(f"{path}:{where[missing[0]]}: {len(missing)} examples have no label (this is the first); "
                             "label all of them or none")
        ex.labels, ex.label_names = _label_ids(labels, where, str(path))
    return ex


def align_labels(examples: Examples, label2id: dict | None) -> Examples:
    """Map string labels onto a teacher's own label ids (config.json label2id) in place; numeric labels and
    teachers without label2id are left as they are.

    Raises:
        ValueError: a label of the data that the teacher does not know.
    """
    if examples.labels is None or not examples.label_names or not label2id or \
            all(n.isdigit() for n in examples.label_names):
        return examples
    unknown = sorted(set(examples.label_names) - set(label2id))
    if unknown:
        raise ValueError(f"labels {unknown} of {examples.source} are not among the teacher's labels "
                         f"{sorted(label2id)}")
    examples.labels = [int(label2id[examples.label_names[i]]) for i in examples.labels]
    examples.label_names = sorted(label2id, key=lambda n: int(label2id[n]))
    return examples


@dataclass
class Encoded:
    """Token ids of every example, tokenised once: a flat int32 buffer plus offsets."""
    ids: torch.Tensor          # (N_tokens,) int32
    type_ids: torch.Tensor     # (N_tokens,) int8
    offsets: torch.Tensor      # (N+1,) int64
    labels: torch.Tensor | None = None  # (N,) int64

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def encode(examples: Examples, tokenizer, max_length: int, chunk: int = 2048) -> Encoded:
    """Tokenise every example once with special tokens, truncated to max_length.

    Args:
        examples: from read_examples or the default corpus.
        tokenizer: a transformers tokenizer of the teacher's vocabulary.
        max_length: at most this many tokens per example, [CLS] and [SEP] included.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (room for [CLS] and [SEP]), got {max_length}")
    ids, tts, lens = [], [], []
    for s in range(0, len(examples), chunk):
        a = examples.texts[s:s + chunk]
        b = examples.pairs[s:s + chunk] if examples.pairs is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length, return_token_type_ids=True)
        for i, t in zip(enc["input_ids"], enc["token_type_ids"]):
            ids.extend(i), tts.extend(t), lens.append(len(i))
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0)
    labels = None if examples.labels is None else torch.tensor(examples.labels, dtype=torch.int64)
    return Encoded(torch.tensor(ids, dtype=torch.int32), torch.tensor(tts, dtype=torch.int8), offsets, labels)


@dataclass
class Batch:
    """A packed batch: real tokens only, laid end to end.

    ids, token_type_ids, position_ids: (T,) int64; packing: cu_seqlens (B+1,), max_seqlen; index: (B,) example
    indices in the data file (keys of the teacher cache); labels: (B,) or None.
    """
    ids: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    packing: Packing
    index: torch.Tensor
    labels: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device) -> "Batch":
        p = self.packing
        mv = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(mv(self.ids), mv(self.token_type_ids), mv(self.position_ids),
                     Packing(mv(p.indices), mv(p.cu_seqlens), p.max_seqlen, p.batch, p.seqlen), self.index,
                     mv(self.labels), {k: mv(v) for k, v in self.extra.items()})


def collate(enc: Encoded, index) -> Batch:
    """Pack examples `index` (a list or 1-D tensor of example indices) into a Batch (host tensors)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    starts, ends = enc.offsets[index], enc.offsets[index + 1]
    lens = ends - starts  # (B,)
    B = index.shape[0]
    L = int(lens.max()) if B else 0
    gather = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends)]) if B else \
        torch.zeros(0, dtype=torch.int64)
    ids = enc.ids[gather].to(torch.int64)
    tt = enc.type_ids[gather].to(torch.int64)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    seq = torch.repeat_interleave(torch.arange(B), lens)
    pos = torch.arange(ids.shape[0]) - cu.to(torch.int64)[seq]  # position within its sequence
    packing = Packing(seq * L + pos, cu, L, B, L)  # indices into a (B, L) layout, should anyone pad
    labels = None if enc.labels is None else enc.labels[index]
    return Batch(ids, tt, pos, packing, index, labels)


class StepOrder:
    """The examples of every step, a pure function of (n, seed, global_batch, step, rank, world).

    Args:
        n: number of examples. seed: the run's seed. global_batch: examples per step over all ranks.
        rank, world: this process and the number of processes; global_batch must divide by world.
    """

    def __init__(self, n: int, seed: int, global_batch: int, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("no examples to train on")
        if global_batch <= 0 or global_batch % world:
            raise ValueError(f"the global batch {global_batch} must be a positive multiple of the number of "
                             f"processes {world}")
        self.n, self.seed, self.global_batch, self.rank, self.world = n, seed, global_batch, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.n

    def indices(self, step: int) -> torch.Tensor:
        """Example indices of this rank at `step`: (global_batch // world,) int64."""
        per = self.global_batch // self.world
        start = step * self.global_batch + self.rank * per
        pos = torch.arange(start, start + per)
        out = torch.empty(per, dtype=torch.int64)
        for e in torch.unique(pos // self.n).tolist():
            sel = (pos // self.n) == e
            out[sel] = self._perm(e)[pos[sel] % self.n]
        return out
