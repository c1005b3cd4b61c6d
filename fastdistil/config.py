"""FastStudentConfig: the encoder hyper-parameters fastdistil needs, read from and written to HF config.json in
the spelling of its architecture (fastdistil/arch/: BERT, DistilBERT, RoBERTa, XLM-R)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from . import arch as arch_registry

_GELU = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# transformers' PretrainedConfig attributes that Trainer, PEFT, callbacks and model code read, with BertConfig's
# defaults: a config.json key held in `extra` overrides them (see FastStudentConfig.__getattr__)
_HF_DEFAULTS = {"output_hidden_states": False, "output_attentions": False, "return_dict": True, "torchscript": False,
                "is_encoder_decoder": False, "is_decoder": False, "add_cross_attention": False, "use_cache": True,
                "tie_word_embeddings": True, "problem_type": None, "classifier_dropout": None,
                "chunk_size_feed_forward": 0, "architectures": None, "_name_or_path": "", "pruned_heads": {}}


def _check(name: str, value, kind: type, ok, want: str) -> None:
    """A config field is of `kind` (int: not bool; float: int or float, not bool) and satisfies `ok`."""
    types = (int, float) if kind is float else kind
    if isinstance(value, bool) or not isinstance(value, types):
        raise TypeError(f"config {name} must be {want}, got {value!r} ({type(value).__name__})")
    if not ok(value):
        raise ValueError(f"config {name} must be {want}, got {value!r}")


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
    model_type: str = "bert"  # the architecture (fastdistil/arch/): config.json spelling, keys, embeddings variant
    # everything else config.json held (id2label, problem_type, ...), written back unchanged
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Check every field (TypeError for a wrong type, ValueError for a value out of range), naming it."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            _check(name, getattr(self, name), int, lambda v: v > 0, "a positive integer")
        _check("hidden_dropout_prob", self.hidden_dropout_prob, float, lambda v: 0 <= v < 1, "in [0, 1)")
        _check("attention_probs_dropout_prob", self.attention_probs_dropout_prob, float, lambda v: 0 <= v < 1,
               "in [0, 1)")
        _check("layer_norm_eps", self.layer_norm_eps, float, lambda v: 0 < v < math.inf, "a finite number > 0")
        _check("initializer_range", self.initializer_range, float, lambda v: 0 <= v < math.inf,
               "a finite number >= 0")
        if self.pad_token_id is not None:
            _check("pad_token_id", self.pad_token_id, int, lambda v: 0 <= v < self.vocab_size,
                   f"in [0, vocab_size={self.vocab_size}) or null")
        _check("hidden_act", self.hidden_act, str, lambda v: v in _GELU,
               f"one of BERT's GELU variants {sorted(_GELU)}, which fastdistil runs")
        _check("position_embedding_type", self.position_embedding_type, str, lambda v: v == "absolute",
               "'absolute' (the only kind fastdistil runs)")
        _check("model_type", self.model_type, str, arch_registry.is_known,
               f"one of the architectures fastdistil runs {sorted(arch_registry.ARCHS)}")
        for name, value in self.arch.fixed:
            if getattr(self, name) != value:
                raise ValueError(f"config {name} must be {value!r} for model_type {self.model_type!r} (transformers "
                                 f"fixes it), got {getattr(self, name)!r}")
        if self.arch.offset_positions and self.pad_token_id is None:
            raise ValueError(f"config pad_token_id must be set for model_type {self.model_type!r}: its position ids "
                             "count from padding_idx + 1")
        if not isinstance(self.extra, dict):
            raise TypeError(f"config extra must be a dict, got {type(self.extra).__name__}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"config hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")

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

    @num_labels.setter
    def num_labels(self, n: int) -> None:  # as transformers: fresh LABEL_i names when the count changes
        if "id2label" not in self.extra or len(self.extra["id2label"]) != n:
            self.extra["id2label"] = {i: f"LABEL_{i}" for i in range(n)}
            self.extra["label2id"] = {f"LABEL_{i}": i for i in range(n)}

    @property
    def arch(self) -> "arch_registry.Arch":
        """The architecture's adapter (fastdistil/arch/<model_type>.py)."""
        return arch_registry.get(self.model_type)

    @property
    def token_types(self) -> bool:
        """The embeddings add a token-type table (BERT, RoBERTa); DistilBERT has none."""
        return self.arch.token_types

    @property
    def position_offset(self) -> int | None:
        """First position id of a real token when computed from the ids (RoBERTa: padding_idx + 1), or None when
        default positions are 0..L-1 (BERT, DistilBERT)."""
        return self.pad_token_id + 1 if self.arch.offset_positions else None

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence the position table serves: max_position_embeddings, less RoBERTa's offset."""
        return self.max_position_embeddings - (self.position_offset or 0)

    @property
    def sinusoidal_positions(self) -> bool:
        """A fresh model's position table starts sinusoidal (DistilBERT's sinusoidal_pos_embds)."""
        return bool(self.extra.get("sinusoidal_pos_embds", False))

    # ---- transformers' PretrainedConfig surface: config.json keys read and written as attributes
    def __getattr__(self, name):  # only reached when ordinary lookup fails
        extra = self.__dict__.get("extra")
        if name.startswith("__") or extra is None:
            raise AttributeError(name)
        if name in extra:
            return extra[name]
        if name in _HF_DEFAULTS:
            v = _HF_DEFAULTS[name]
            return dict(v) if isinstance(v, dict) else v
        raise AttributeError(f"'FastStudentConfig' object has no attribute {name!r}")

    def __setattr__(self, name, value):
        """Fields and private names as usual; any other name (e.g. ``config.id2label = ...``, Trainer's
        ``use_cache``) is a config.json key, kept in `extra` and saved, as transformers keeps it."""
        if name in self.__dataclass_fields__ or name.startswith("_") or isinstance(getattr(type(self), name, None),
                                                                                    property):
            object.__setattr__(self, name, value)
        else:
            self.extra[name] = value

    @property
    def use_return_dict(self) -> bool:
        return bool(self.return_dict) and not self.torchscript

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @name_or_path.setter
    def name_or_path(self, value) -> None:
        self._name_or_path = str(value)

    @property
    def id2label(self) -> dict:
        if "id2label" in self.extra:
            return {int(k): v for k, v in self.extra["id2label"].items()}
        return {i: f"LABEL_{i}" for i in range(self.num_labels)}

    @id2label.setter
    def id2label(self, value) -> None:
        self.extra["id2label"] = dict(value)

    @property
    def label2id(self) -> dict:
        return dict(self.extra["label2id"]) if "label2id" in self.extra else {v: k for k, v in self.id2label.items()}

    @label2id.setter
    def label2id(self, value) -> None:
        self.extra["label2id"] = dict(value)

    def get_text_config(self, *args, **kwargs) -> "FastStudentConfig":
        return self

    def to_json_string(self, use_diff: bool = True) -> str:
        import json
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "FastStudentConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a config is a JSON object (dict), got {type(d).__name__}")
        arch = arch_registry.get(d.get("model_type"))  # other BERT derivatives load (and save) as BERT
        d = {**arch.config_from_hf(d), "model_type": arch.model_type}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if extra.get("is_decoder") or extra.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention BERT configs are not supported by fastdistil")
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return self.arch.config_to_hf(d)

    @classmethod
    def from_hf(cls, hf_config) -> "FastStudentConfig":
        return cls.from_dict(hf_config.to_dict())

    def to_hf(self):
        """transformers' config of this architecture (BertConfig, DistilBertConfig, RobertaConfig, ...)."""
        import transformers
        return getattr(transformers, self.arch.hf_config)(**self.to_dict())
