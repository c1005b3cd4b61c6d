"""The benchmark workloads: fixed shapes, fixed seeds, so every run (and every machine) times the same batch.

| name | batch | lengths (uniform, inclusive) | padded to | what it stands for |
|---|---|---|---|---|
| A | 32 | 16..128 | 128 | a serving batch of mixed-length sentences |
| B | 1 | 32 | 32 | one short request (latency, per-op overhead) |
| C | 128 | 64..256 | 256 | offline embedding of long passages |
| large | 1024 | 16..128 | 128 | a large GPU batch (encode of many short texts) |
| train | 32 | 16..128 | 128 | one training step (forward, loss, backward, optimizer) |
| distill | 32 | 16..128 | 128 | one distillation step, teacher BERT-base-shaped + 6x384 student |

Token ids are [CLS] random-ids [SEP] followed by padding (id 0), drawn from a torch.Generator seeded per workload,
so the real-token count of a workload is the same everywhere (A holds 2,135 real tokens of 4,096).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


@dataclass(frozen=True)
class Workload:
    """A batch shape: `batch` sequences with lengths uniform in [min_len, max_len], padded to `pad_to`."""
    name: str
    batch: int
    min_len: int
    max_len: int
    pad_to: int
    seed: int = 0
    kind: str = "inference"  # "inference", "train" or "distill"
    description: str = ""

    def lengths(self) -> list[int]:
        """The sequence lengths, drawn once from the workload's seed."""
        if self.min_len == self.max_len:
            return [self.min_len] * self.batch
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(self.min_len, self.max_len + 1, (self.batch,), generator=g).tolist()

    def real_tokens(self) -> int:
        return sum(self.lengths())

    def padded_tokens(self) -> int:
        return self.batch * self.pad_to

    def inputs(self, vocab_size: int = 30522) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (batch, pad_to) int64 on CPU; padding on the right.

        Args:
            vocab_size: ids are drawn below it (ids of [CLS]/[SEP] are clamped into range for tiny vocabularies).
        Returns:
            input_ids and attention_mask (1 = real token).
        """
        lens = self.lengths()
        g = torch.Generator().manual_seed(self.seed + 1)
        lo = min(1000, max(vocab_size // 2, 1))
        ids = torch.randint(lo, vocab_size, (self.batch, self.pad_to), generator=g)
        mask = torch.zeros(self.batch, self.pad_to, dtype=torch.int64)
        for i, n in enumerate(lens):
            mask[i, :n] = 1
            ids[i, 0] = min(CLS_ID, vocab_size - 1)
            ids[i, n - 1] = min(SEP_ID, vocab_size - 1)
            ids[i, n:] = PAD_ID
        return ids, mask

    def summary(self) -> str:
        n, p = self.real_tokens(), self.padded_tokens()
        span = f"{self.min_len}" if self.min_len == self.max_len else f"U[{self.min_len},{self.max_len}]"
        return (f"workload {self.name}: {self.batch} x lengths {span} padded to {self.pad_to}: {n} real tokens of "
                f"{p} ({100.0 * n / p:.0f}%)")


WORKLOADS: dict[str, Workload] = {
    "A": Workload("A", 32, 16, 128, 128, seed=0, description="32 sequences, lengths U[16,128]"),
    "B": Workload("B", 1, 32, 32, 32, seed=0, description="1 sequence of 32 tokens"),
    "C": Workload("C", 128, 64, 256, 256, seed=0, description="128 sequences, lengths U[64,256]"),
    "large": Workload("large", 1024, 16, 128, 128, seed=0, description="1,024 sequences, lengths U[16,128]"),
    "train": Workload("train", 32, 16, 128, 128, seed=0, kind="train",
                      description="training step on workload A's batch (classification head, AdamW)"),
    "distill": Workload("distill", 32, 16, 128, 128, seed=0, kind="distill",
                        description="distillation step on workload A's batch (BERT-base-shaped teacher)"),
}


def get_workload(name: str) -> Workload:
    """The workload called `name` (case-insensitive for A/B/C)."""
    key = name if name in WORKLOADS else name.upper() if name.upper() in WORKLOADS else name.lower()
    if key not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    return WORKLOADS[key]
