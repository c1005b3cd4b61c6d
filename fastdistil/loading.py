"""Hugging Face checkpoints <-> fastdistil modules, strictly.

Our state-dict keys are transformers' keys, so loading is a checked copy: every checkpoint key is used or
reported, every shape is checked, and errors list the offending keys. Pickle checkpoints are read with
`torch.load(weights_only=True)` only; nothing in a checkpoint can execute code.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from . import arch as arch_registry
from .config import FastStudentConfig

log = logging.getLogger("fastdistil")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_BASE_ROOTS = ("embeddings.", "encoder.", "pooler.")  # FastStudent's own (BERT's) key roots, for every architecture


class CheckpointError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if str(dtype) == "auto":
        return "auto"
    if str(dtype) not in names:
        raise TypeError(f"dtype must be a torch floating dtype or one of {sorted(names)}, got {dtype!r}")
    return names[str(dtype)]


def resolve_dir(name_or_path) -> Path:
    """A directory holding config.json: a local directory, the transformer module of a sentence-transformers
    directory, or a hub id's snapshot in the local Hugging Face cache (no download is attempted)."""
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        modules = p / "modules.json"
        if modules.is_file():  # sentence-transformers: find the Transformer module's folder
            entries = read_json(modules)
            if not (isinstance(entries, list) and all(isinstance(m, dict) and isinstance(m.get("type", ""), str)
                                                      and isinstance(m.get("path", ""), str) for m in entries)):
                raise ValueError(f"{modules} is not a sentence-transformers modules.json: expected a list of "
                                 "objects with string 'type' and 'path'")
            for m in entries:
                if m.get("type", "").endswith("models.Transformer"):
                    sub = p / m.get("path", "")
                    if (sub / "config.json").is_file():
                        return sub
        raise OSError(f"{p} has no config.json (nor a sentence-transformers modules.json pointing to one)")
    if p.exists():
        raise OSError(f"{p} is a file; pass the directory that holds config.json and the weights")
    try:
        from huggingface_hub import snapshot_download
        snap = Path(snapshot_download(repo_id=str(name_or_path), local_files_only=True))
    except Exception as e:  # not a valid repo id, or not in the cache
        raise OSError(f"{name_or_path!r} is neither a local directory nor a model in the local Hugging Face cache "
                      f"({type(e).__name__}: {e})") from None
    return resolve_dir(snap)


def _os_error(e: OSError, path) -> OSError:
    """The same kind of OSError, saying "cannot read PATH: REASON"."""
    return type(e)(e.errno, f"cannot read {path}: {e.strerror}") if e.errno else OSError(f"cannot read {path}: {e}")


def read_json(path: Path):
    """The JSON in `path`; every failure (unreadable, not UTF-8, not JSON) an OSError naming the file."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:  # permission denied, a directory, ...: say so, not "corrupt"
        raise _os_error(e, path) from None
    except UnicodeDecodeError as e:
        raise OSError(f"{path} is not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise OSError(f"{path} is not valid JSON: {e}") from None


_FIELDS = tuple(f for f in FastStudentConfig.__dataclass_fields__ if f not in ("extra", "model_type"))
_HEAD_SETTINGS = ("num_labels", "id2label", "label2id", "problem_type", "classifier_dropout")


def read_config(directory: Path, overrides: dict | None = None) -> FastStudentConfig:
    """config.json of `directory` with keyword `overrides`, every field checked; errors name the file.

    An override must be a FastStudentConfig field, a head setting (num_labels, id2label, ...) or a key the file
    already has: anything else is a TypeError, so a misspelled or unsupported keyword never passes silently.
    """
    path = directory / "config.json"
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got a JSON {type(d).__name__}")
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in _FIELDS and k not in _HEAD_SETTINGS and k not in d]
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: "
                        f"neither config fields ({', '.join(_FIELDS)}) nor head settings "
                        f"({', '.join(_HEAD_SETTINGS)}) nor keys of {path}")
    if "num_labels" in overrides:
        n = overrides["num_labels"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_labels must be a positive integer, got {n!r}")
        overrides.setdefault("id2label", {str(i): f"LABEL_{i}" for i in range(n)})
        overrides.setdefault("label2id", {f"LABEL_{i}": i for i in range(n)})
    mt = d.get("model_type", "bert")
    if not arch_registry.is_known(mt) and (not isinstance(mt, str) or "bert" not in mt):
        log.warning("config.json has model_type %r; loading it as BERT", mt)
    try:
        return FastStudentConfig.from_dict({**d, **overrides})
    except (TypeError, ValueError) as e:
        where = f"{path} with keyword overrides {sorted(overrides)}" if overrides else str(path)
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{where}: {e}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: model.safetensors (single or sharded), else pytorch_model.bin (weights only)."""
    from safetensors.torch import load_file
    st, idx, pt = directory / "model.safetensors", directory / "model.safetensors.index.json", \
        directory / "pytorch_model.bin"
    files = [st] if st.is_file() else []
    if not files and idx.is_file():
        index = read_json(idx)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(wm, dict) and wm and all(isinstance(v, str) and v for v in wm.values())):
            raise ValueError(f"{idx} is not a safetensors index: expected a non-empty \"weight_map\" object of "
                             "tensor name -> shard file name")
        files = [directory / s for s in sorted(set(wm.values()))]
    if files:
        out = {}
        for f in files:
            _readable(f)
            try:
                out.update(load_file(str(f)))
            except Exception as e:  # truncated header, bad offsets, missing shard
                raise OSError(f"cannot read safetensors file {f}: it is truncated or corrupt ({e})") from None
        return out
    if pt.is_file():
        _readable(pt)
        try:
            sd = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as e:
            raise OSError(f"cannot read {pt} with torch.load(weights_only=True): it is corrupt or holds objects "
                          f"other than tensors, which fastdistil never unpickles ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise OSError(f"{pt} does not hold a flat state dict of tensors")
        return sd
    raise OSError(f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _readable(path: Path) -> None:
    """Open `path` once ourselves, so that a missing shard or a permission problem is reported as what it is
    (readers such as safetensors' report every failure alike)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _os_error(e, path) from None


def _normalise(key: str) -> str:
    # original BERT checkpoints name LayerNorm parameters gamma/beta
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def _internal(key: str, arch) -> str | None:
    """A checkpoint key relative to the base model in FastStudent's names (None: a buffer), or the key unchanged
    when it is not the base model's (a head key). transformers' names of `arch` and FastStudent's own both map."""
    k = _normalise(key)
    for pre in (arch.prefix, "bert."):  # transformers' head prefix, or FastStudent's own heads' `bert.`
        if k.startswith(pre):
            k = k[len(pre):]
            break
    if k in arch.buffers or k in _BUFFERS:
        return None
    return arch.key_to_internal(k) if k.startswith(arch.roots) else k


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() under transformers' keys of its architecture (DistilBERT's transformer.layer.N.*, heads'
    distilbert./roberta. prefixes); BERT's are FastStudent's own."""
    arch, base = model.config.arch, getattr(model, "base_prefix", "")
    out = {}
    for k, v in model.state_dict().items():
        if base and k.startswith(base):
            k = arch.prefix + arch.key_to_hf(k[len(base):])
        elif not base and k.startswith(_BASE_ROOTS):
            k = arch.key_to_hf(k)
        out[k] = v
    return out


def load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], base_prefix: str = "",
               optional: tuple[str, ...] = ("pooler.",)) -> None:
    """Copy `sd` into `model` strictly.

    base_prefix: where the encoder sits in `model` ("" for FastStudent, "bert." for the heads); checkpoint
        keys with or without transformers' head prefix of the model's architecture ("bert.", "distilbert.",
        "roberta.") are mapped onto it, in transformers' names or FastStudent's (fastdistil/arch/).
    optional: key prefixes (relative to the encoder, or the head's own) that may be missing: they keep their
        initialisation and are reported, as transformers does for a new head or a missing pooler.
    Raises CheckpointError listing missing keys, mismatched shapes and integer tensors for float parameters;
    unused checkpoint keys are reported.
    """
    own = model.state_dict()
    arch = model.config.arch
    mapped, unused = {}, []
    for k, v in sd.items():
        k2 = _internal(k, arch)
        if k2 is None:
            continue
        if k2.startswith(_BASE_ROOTS):
            k2 = base_prefix + k2
        elif base_prefix and _normalise(k) in own:  # a head key, e.g. classifier.weight
            k2 = _normalise(k)
        (mapped.__setitem__(k2, v) if k2 in own else unused.append(k))
    missing = [k for k in own if k not in mapped]
    opt = tuple(base_prefix + o if o.startswith(_BASE_ROOTS) else o for o in optional)
    hard_missing = [k for k in missing if not k.startswith(opt)]
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in mapped.items() if v.shape != own[k].shape]
    # copy_ would cast an integer tensor into a float parameter without a word
    not_float = [f"{k} ({v.dtype})" for k, v in mapped.items() if own[k].is_floating_point()
                 and not v.is_floating_point()]
    problems = []
    if not_float:
        problems.append("non-floating tensors for floating parameters: " + ", ".join(not_float))
    if hard_missing:
        problems.append(f"missing keys ({len(hard_missing)}): " + ", ".join(hard_missing))
    if bad:
        problems.append("shape mismatches (key: checkpoint vs model): " +
                        ", ".join(f"{k}: {a} vs {b}" for k, a, b in bad))
    if problems:
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(problems))
    soft = [k for k in missing if k.startswith(opt)]
    if soft:
        log.warning("not in the checkpoint, newly initialised: %s", ", ".join(soft))
    if unused:
        log.warning("checkpoint keys not used by %s: %s", type(model).__name__, ", ".join(unused))
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)


def check_sizes(cfg: FastStudentConfig, sd: dict[str, torch.Tensor], where) -> None:
    """Before allocating anything: the config's sizes must be those of the checkpoint's tensors, so that a config
    of 10**9 layers or a vocabulary of 10**12 fails at once, naming the file, instead of allocating first."""
    shapes = {_internal(k, cfg.arch): tuple(v.shape) for k, v in sd.items()}
    d = cfg.hidden_size
    want = {"embeddings.word_embeddings.weight": (cfg.vocab_size, d),
            "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, d),
            "encoder.layer.0.intermediate.dense.weight": (cfg.intermediate_size, d)}
    if cfg.token_types:
        want["embeddings.token_type_embeddings.weight"] = (cfg.type_vocab_size, d)
    bad = [f"{k} is {shapes[k]} but the config implies {s}" for k, s in want.items() if shapes.get(k, s) != s]
    n = 1 + max((int(k.split(".")[2]) for k in shapes if k and k.startswith("encoder.layer.")
                 and k.split(".")[2].isdigit()), default=-1)
    if cfg.num_hidden_layers > n:
        bad.append(f"num_hidden_layers is {cfg.num_hidden_layers} but the checkpoint holds {n} layers")
    if bad:
        raise CheckpointError(f"{where} does not fit the checkpoint's weights: " + "; ".join(bad))


def from_pretrained(cls, name_or_path, *, dtype=None, device=None, quantize=None, **config_overrides):
    """Build `cls` from a checkpoint directory or cached hub id (see resolve_dir) and load it strictly.

    quantize: None, or "int8": the encoder's GEMMs in int8 for CPU inference, calibrated on the shipped sentences
        (model.quantize; fastdistil/quantize.py).
    config_overrides: config fields (hidden_dropout_prob=0.0, ...) or head settings (num_labels=3, ...); any other
    keyword is a TypeError (see read_config).
    """
    directory = resolve_dir(name_or_path)
    dt = _dtype(dtype)
    cfg = read_config(directory, config_overrides)
    sd = read_weights(directory)
    check_sizes(cfg, sd, directory / "config.json")
    if dt == "auto":
        dt = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    model = cls(cfg)
    load_state(model, sd, base_prefix=getattr(cls, "base_prefix", ""), optional=getattr(cls, "optional_keys",
                                                                                         ("pooler.",)))
    model.config.name_or_path = str(directory)  # model.name_or_path reads it (hf_surface.py)
    model.to(device=device, dtype=dt or torch.float32)
    if quantize is not None:
        from .quantize import quantize as quantize_model
        return quantize_model(model.eval(), quantize)
    return model.eval()


def save_pretrained(model, directory) -> None:
    """config.json + model.safetensors (+ tokenizer files when the model came from a directory that had them).
    Each file is written whole or not at all (fastdistil.atomic: a temporary renamed over the name, created with
    the umask's mode like any new file); a failed write (a full disk) removes its temporary and raises OSError
    naming the file."""
    from safetensors.torch import save

    from .atomic import atomic_write
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["architectures"] = [getattr(model, "hf_architecture", None) or model.config.arch.hf_class()]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in hf_state_dict(model).items()}
    # serialised in memory (one extra copy of the weights) and written through our own file: safetensors'
    # save_file reports a failed write as a SafetensorError without errno or path (safetensors 0.8)
    for name, data in (("model.safetensors", lambda: save(tensors, metadata={"format": "pt"})),
                       ("config.json", lambda: json.dumps(cfg, indent=2, sort_keys=True).encode())):
        with atomic_write(directory / name) as f:
            f.write(data())
    src = getattr(model, "name_or_path", None)
    if src and Path(src).is_dir() and Path(src).resolve() != directory.resolve():
        for f in TOKENIZER_FILES:
            if (Path(src) / f).is_file():
                with atomic_write(directory / f) as out:
                    out.write((Path(src) / f).read_bytes())


def from_hf(cls, hf_model):
    """A fastdistil model holding copies of a transformers model's weights (same dtype and device): BERT,
    DistilBERT, RoBERTa or XLM-R (fastdistil/arch/), a base model or a head holding one."""
    cfg = FastStudentConfig.from_hf(hf_model.config)
    bert = getattr(hf_model, cfg.arch.prefix[:-1], hf_model)
    if getattr(cls, "base_prefix", ""):
        model = cls(cfg)
        sd = hf_model.state_dict()
    else:
        model = cls(cfg, add_pooling_layer=getattr(bert, "pooler", None) is not None)
        sd = bert.state_dict()
    p = next(bert.parameters())
    model.to(device=p.device, dtype=p.dtype)
    load_state(model, sd, base_prefix=getattr(cls, "base_prefix", ""), optional=())
    return model.train(hf_model.training)


def to_hf(model):
    """The transformers model with the same architecture and copies of the weights."""
    import transformers
    arch = getattr(model, "hf_architecture", None) or model.config.arch.hf_class()
    cfg = model.config.to_hf()
    if arch == model.config.arch.hf_class() and model.config.arch.pooler:
        hf = getattr(transformers, arch)(cfg, add_pooling_layer=model.pooler is not None)
    else:
        hf = getattr(transformers, arch)(cfg)
    p = next(model.parameters())
    hf.to(device=p.device, dtype=p.dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith(_BUFFERS)]
    if missing or unexpected:
        raise CheckpointError(f"to_hf: missing {missing}, unexpected {unexpected}")
    return hf.train(model.training)


# files holding a tokenizer's vocabulary (tokenizer_config.json alone makes transformers build a 5-token one)
_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                "tokenizer.model")


def load_tokenizer(name_or_path, vocab_size: int | None = None):
    """The tokenizer saved with a model (a directory or cached hub id, resolved as from_pretrained does), checked
    against the model's vocabulary.

    transformers quietly builds a 5-token tokenizer from a directory without vocabulary files, which turns every
    text into [UNK]s; such a tokenizer, or one that does not fit the model, is refused here.
    Args:
        vocab_size: the model's vocabulary size; default: config.json's beside the tokenizer.
    Raises:
        OSError: no tokenizer files in the directory, or transformers cannot load them.
        ValueError: the tokenizer does not fit (see check_tokenizer).
    """
    directory = resolve_dir(name_or_path)
    if not any((directory / f).is_file() for f in _VOCAB_FILES):
        raise OSError(f"{directory} has no tokenizer files (looked for {', '.join(_VOCAB_FILES)}); save the "
                      "tokenizer beside the model (tokenizer.save_pretrained(directory))")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise OSError(f"cannot load the tokenizer in {directory} ({type(e).__name__}: {e})") from None
    if vocab_size is None:
        vocab_size = read_config(directory).vocab_size
    check_tokenizer(tok, vocab_size, directory)
    return tok


def check_tokenizer(tokenizer, vocab_size: int, where="") -> None:
    """Refuse a tokenizer that does not fit a model of `vocab_size` rows: one that can emit an id >= vocab_size,
    or one with fewer than 90% as many tokens (embedding tables are sometimes padded to a round size, but a much
    smaller tokenizer is the wrong one, e.g. transformers' fallback). Raises ValueError naming both sizes."""
    n = len(tokenizer)
    if n > vocab_size or n < 0.9 * vocab_size:
        src = f" in {where}" if where else ""
        raise ValueError(f"the tokenizer{src} has {n} tokens but the model's vocab_size is {vocab_size}: it is not "
                         "the model's tokenizer")
