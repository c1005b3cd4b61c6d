"""The embedded default corpus: English sentences from the docstrings of Python's standard library.

Every machine that runs fastdistil has these files, so `fastdistil distill` without `--data` needs no download.
The sources are parsed with `ast` (never imported: importing stdlib modules has side effects and is slow),
docstrings are split into paragraphs, paragraphs that look like prose (no code, doctest or table lines) are kept,
and the result is de-duplicated and sorted by a hash so the order does not depend on the file system. The same
Python version gives the same corpus on every machine. Building takes a few seconds, so the result is kept in
~/.cache/fastdistil (XDG_CACHE_HOME), keyed by Python version, stdlib path and the extraction settings.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import platform
import re
import sysconfig
from pathlib import Path

_VERSION = 1  # bump when the extraction rules change (invalidates cached corpora)
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "ensurepip",
              "turtledemo", "tkinter", "pydoc_data", "encodings"}
_CODE = re.compile(r"(>>>|\.\.\. |::|==|\{|\}|\[\d|\bdef |\breturn\b|=\s*\w+\(|^\s*[-*=]{3,})", re.M)


def _docstrings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _paragraphs(doc: str, min_words: int, max_words: int):
    for para in re.split(r"\n\s*\n", doc):
        if _CODE.search(para):
            continue
        text = " ".join(para.split())
        words = text.split(" ")
        if not (min_words <= len(words) <= max_words):
            continue
        letters = sum(c.isalpha() for c in text)
        if letters < 0.7 * len(text) or not text[0].isupper():
            continue
        yield text


@functools.lru_cache(maxsize=4)
def default_corpus(max_texts: int | None = 20000, min_words: int = 6, max_words: int = 120) -> tuple[str, ...]:
    """Prose paragraphs from the standard library's docstrings.

    Args:
        max_texts: keep at most this many (the first ones in hash order); None keeps all.
        min_words, max_words: paragraph length bounds in words.
    Returns:
        A tuple of unique strings in a deterministic order (sorted by SHA-1 of the text).
    Raises:
        OSError: when the standard library's sources cannot be found (an embedded Python without .py files).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha1(f"{_VERSION}|{root}|{platform.python_version()}|{min_words}|{max_words}".encode()).hexdigest()
    cache = _cache_dir() / f"corpus-{key[:16]}.json"
    try:
        texts = json.loads(cache.read_text())
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            raise ValueError("not a corpus")
        texts = tuple(texts)
    except (OSError, ValueError):
        texts = _build(root, min_words, max_words)
        try:  # best effort: a read-only home just rebuilds next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(texts))
            os.replace(tmp, cache)
        except OSError:
            pass
    return texts if max_texts is None else texts[:max_texts]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdistil"


def _build(root: Path, min_words: int, max_words: int) -> tuple[str, ...]:
    files = sorted(p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1])))
    seen: dict[str, str] = {}
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for doc in _docstrings(tree):
            for text in _paragraphs(doc, min_words, max_words):
                seen.setdefault(hashlib.sha1(text.encode()).hexdigest(), text)
    if not seen:
        raise OSError(f"no docstrings found under the standard library directory {root}; pass --data FILE")
    return tuple(seen[h] for h in sorted(seen))
