"""FastStudentConfig: the BERT hyper-parameters fastdistil needs, read from and written to HF config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

_GELU = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class FastStudentConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    # everything else config.json held (id2label, problem_type, ...), written back unchanged
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in _GELU:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; fastdistil runs BERT's GELU "
                             f"variants {sorted(_GELU)}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not supported "
                             "(only 'absolute')")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        """'none' for BERT's exact erf GELU, 'tanh' only when the checkpoint asks for the tanh form."""
        return _GELU[self.hidden_act]

    @property
    def num_labels(self) -> int:
        if "id2label" in self.extra:
            return len(self.extra["id2label"])
        return int(self.extra.get("num_labels", 2))

    @classmethod
    def from_dict(cls, d: dict) -> "FastStudentConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if extra.get("is_decoder") or extra.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention BERT configs are not supported by fastdistil")
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        d["model_type"] = "bert"
        d.setdefault("architectures", ["BertModel"])
        return d

    @classmethod
    def from_hf(cls, hf_config) -> "FastStudentConfig":
        return cls.from_dict(hf_config.to_dict())

    def to_hf(self):
        from transformers import BertConfig
        return BertConfig(**self.to_dict())
