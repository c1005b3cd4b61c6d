"""Hugging Face checkpoints <-> fastdistil modules, strictly.

Our state-dict keys are transformers' keys, so loading is a checked copy: every checkpoint key is used or
reported, every shape is checked, and errors list the offending keys. Pickle checkpoints are read with
`torch.load(weights_only=True)` only; nothing in a checkpoint can execute code.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import FastStudentConfig

log = logging.getLogger("fastdistil")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_BASE_ROOTS = ("embeddings.", "encoder.", "pooler.")


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
            for m in json.loads(modules.read_text()):
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


def read_config(directory: Path) -> FastStudentConfig:
    try:
        d = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise OSError(f"{directory / 'config.json'} is not valid JSON: {e}") from None
    mt = d.get("model_type", "bert")
    if mt not in ("bert", "distilbert") and "bert" not in mt:
        log.warning("config.json has model_type %r; loading it as BERT", mt)
    return FastStudentConfig.from_dict(d)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: model.safetensors (single or sharded), else pytorch_model.bin (weights only)."""
    from safetensors.torch import load_file
    st, idx, pt = directory / "model.safetensors", directory / "model.safetensors.index.json", \
        directory / "pytorch_model.bin"
    files = [st] if st.is_file() else []
    if not files and idx.is_file():
        shards = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        files = [directory / s for s in shards]
    if files:
        out = {}
        for f in files:
            try:
                out.update(load_file(str(f)))
            except Exception as e:  # truncated header, bad offsets, missing shard
                raise OSError(f"cannot read safetensors file {f}: it is truncated or corrupt ({e})") from None
        return out
    if pt.is_file():
        try:
            sd = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as e:
            raise OSError(f"cannot read {pt} with torch.load(weights_only=True): it is corrupt or holds objects "
                          f"other than tensors, which fastdistil never unpickles ({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise OSError(f"{pt} does not hold a flat state dict of tensors")
        return sd
    raise OSError(f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _normalise(key: str) -> str:
    # original BERT checkpoints name LayerNorm parameters gamma/beta
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], base_prefix: str = "",
               optional: tuple[str, ...] = ("pooler.",)) -> None:
    """Copy `sd` into `model` strictly.

    base_prefix: where the BERT encoder sits in `model` ("" for FastStudent, "bert." for the heads); checkpoint
        keys with or without a "bert." prefix are mapped onto it.
    optional: key prefixes (relative to the encoder, or the head's own) that may be missing: they keep their
        initialisation and are reported, as transformers does for a new head or a missing pooler.
    Raises CheckpointError listing missing keys and mismatched shapes; unused checkpoint keys are reported.
    """
    own = model.state_dict()
    mapped, unused = {}, []
    for k, v in sd.items():
        k2 = _normalise(k)
        if k2.startswith("bert."):
            k2 = k2[len("bert."):]
        if k2 in _BUFFERS:
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
    problems = []
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


def from_pretrained(cls, name_or_path, *, dtype=None, device=None, **config_overrides):
    """Build `cls` from a checkpoint directory or cached hub id (see resolve_dir) and load it strictly."""
    directory = resolve_dir(name_or_path)
    cfg = read_config(directory)
    for k, v in config_overrides.items():
        if k in FastStudentConfig.__dataclass_fields__ and k != "extra":
            setattr(cfg, k, v)
        else:
            cfg.extra[k] = v
    if "num_labels" in config_overrides:
        n = config_overrides["num_labels"]
        cfg.extra["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        cfg.extra["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    sd = read_weights(directory)
    dt = _dtype(dtype)
    if dt == "auto":
        dt = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    model = cls(cfg)
    load_state(model, sd, base_prefix=getattr(cls, "base_prefix", ""), optional=getattr(cls, "optional_keys",
                                                                                         ("pooler.",)))
    model.name_or_path = str(directory)
    model.to(device=device, dtype=dt or torch.float32)
    return model.eval()


def save_pretrained(model, directory) -> None:
    """config.json + model.safetensors (+ tokenizer files when the model came from a directory that had them).
    Files are written to a temporary name and renamed, so an interrupted save leaves no half-written file."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["architectures"] = [getattr(model, "hf_architecture", "BertModel")]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for name, write in (("model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"})),
                        ("config.json", lambda f: Path(f).write_text(json.dumps(cfg, indent=2, sort_keys=True)))):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(fd)
        write(tmp)
        os.replace(tmp, directory / name)
    src = getattr(model, "name_or_path", None)
    if src and Path(src).is_dir() and Path(src).resolve() != directory.resolve():
        for f in TOKENIZER_FILES:
            if (Path(src) / f).is_file():
                shutil.copyfile(Path(src) / f, directory / f)


def from_hf(cls, hf_model):
    """A fastdistil model holding copies of a transformers BERT model's weights (same dtype and device)."""
    bert = getattr(hf_model, "bert", hf_model)
    cfg = FastStudentConfig.from_hf(hf_model.config)
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
    arch = getattr(model, "hf_architecture", "BertModel")
    cfg = model.config.to_hf()
    if arch == "BertModel":
        hf = transformers.BertModel(cfg, add_pooling_layer=model.pooler is not None)
    else:
        hf = getattr(transformers, arch)(cfg)
    p = next(model.parameters())
    hf.to(device=p.device, dtype=p.dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith(_BUFFERS)]
    if missing or unexpected:
        raise CheckpointError(f"to_hf: missing {missing}, unexpected {unexpected}")
    return hf.train(model.training)
