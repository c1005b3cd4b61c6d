"""The teacher-output cache: per-example teacher targets in memory-mapped files, keyed by example index.

A teacher's logits, pooled embedding or [CLS] vector for an example do not change between epochs (the teacher is
frozen and runs in eval mode), so they are computed once and read back from disk afterwards: with every objective
of a step served from the cache, the teacher does not run at all.

Layout of a cache directory:
    meta.json            {"fingerprint": ..., "n": N, "fields": {name: [shape..., dtype]}}
    <field>.bin          (N, *shape) raw array (numpy memmap), one row per example index
    <field>.filled       (N,) uint8, 1 once the row holds the teacher's value
A fingerprint (teacher identity, data, max length) that differs from the one on disk resets the cache, so a stale
cache is never read. Rows are written before their `filled` flag, and each process writes only the rows of its
own examples, so several processes (DDP ranks) may share a cache directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_error

_NP = {"float32": np.float32, "float16": np.float16}


def _allocate(path: Path, size: int) -> None:
    """A zero-filled file of `size` bytes whose blocks are reserved now: a page of a sparse memory-mapped file
    written when the disk is full kills the process with SIGBUS, where posix_fallocate fails cleanly (ENOSPC)."""
    try:
        with open(path, "wb") as f:
            if size and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)
            else:
                f.truncate(size)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise write_error(path, e) from None


class TeacherCache:
    """Memory-mapped per-example teacher targets.

    Args:
        directory: where the files live (created if needed).
        n: number of examples (index range 0..n-1).
        fields: {name: (shape tuple, "float32"|"float16")} e.g. {"logits": ((2,), "float32"), "mean": ((768,),
            "float32")}.
        fingerprint: a string identifying teacher + data + tokenisation; a mismatch resets the directory.
        create: create or reset files (rank 0); other ranks open what rank 0 made.
    """

    def __init__(self, directory, n: int, fields: dict, fingerprint: str, create: bool = True):
        self.dir = Path(directory)
        self.n, self.fields, self.fingerprint = int(n), {k: (tuple(s), d) for k, (s, d) in fields.items()}, \
            fingerprint
        for name, (_, dt) in self.fields.items():
            if dt not in _NP:
                raise ValueError(f"cache field {name}: dtype must be one of {sorted(_NP)}, got {dt!r}")
        meta = {"fingerprint": fingerprint, "n": self.n,
                "fields": {k: [list(s), d] for k, (s, d) in self.fields.items()}}
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
            old = self._read_meta()
            if old != meta:
                for k, (shape, dt) in self.fields.items():
                    for suffix, shp, npd in ((".bin", (self.n, *shape), _NP[dt]), (".filled", (self.n,), np.uint8)):
                        _allocate(self.dir / f"{k}{suffix}", int(np.prod(shp)) * np.dtype(npd).itemsize)
                tmp = self.dir / "meta.json.tmp"
                tmp.write_text(json.dumps(meta))
                os.replace(tmp, self.dir / "meta.json")
        elif self._read_meta() != meta:
            raise RuntimeError(f"teacher cache {self.dir} was not created for this run (fingerprint mismatch)")
        self._data = {k: np.memmap(self.dir / f"{k}.bin", dtype=_NP[d], mode="r+", shape=(self.n, *s))
                      for k, (s, d) in self.fields.items()}
        self._filled = {k: np.memmap(self.dir / f"{k}.filled", dtype=np.uint8, mode="r+", shape=(self.n,))
                        for k in self.fields}
        self.hits = self.misses = 0

    def _read_meta(self):
        try:
            return json.loads((self.dir / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def has(self, names, index: torch.Tensor) -> bool:
        """True when every field in `names` is filled for every example in `index` ((B,) int64)."""
        idx = index.cpu().numpy()
        return all(bool(self._filled[k][idx].all()) for k in names)

    def get(self, name: str, index: torch.Tensor, device=None) -> torch.Tensor:
        """Rows `index` of field `name` as a float32 tensor (B, *shape) on `device`."""
        rows = np.asarray(self._data[name][index.cpu().numpy()], dtype=np.float32)
        return torch.from_numpy(rows).to(device)

    def put(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Store teacher values (B, *shape) for examples `index`; the rows first, then their filled flags."""
        idx = index.cpu().numpy()
        shape = self.fields[name][0]
        if tuple(values.shape[1:]) != shape:
            raise ValueError(f"cache field {name} holds rows of shape {shape}, got {tuple(values.shape[1:])}")
        self._data[name][idx] = values.detach().float().cpu().numpy().astype(self._data[name].dtype)
        self._filled[name][idx] = 1

    def flush(self) -> None:
        for m in (*self._data.values(), *self._filled.values()):
            m.flush()

    def coverage(self, name: str) -> float:
        """Fraction of examples whose `name` row is filled."""
        return float(self._filled[name].mean()) if self.n else 1.0
