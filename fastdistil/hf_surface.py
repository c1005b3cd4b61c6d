"""The parts of transformers' PreTrainedModel API that Trainer, PEFT, callbacks and users' code call on a model.

FastStudent and the heads of heads.py inherit this mixin, so code written against transformers.BertModel (embedding
access and resizing, gradient checkpointing, parameter counts, input-gradient hooks) works on them unchanged and
gives transformers' results for the same weights. Each method follows transformers 5's semantics (arguments, defaults
and random draws included, so a seeded resize adds the same rows); only what a BERT encoder can do is provided.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class PreTrainedSurface:
    """transformers' PreTrainedModel surface over a module whose BERT encoder (a FastStudent) is `base_model`."""

    main_input_name = "input_ids"
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Embeddings", "Layer"]  # accelerate's device maps keep each of these on one device

    @property
    def base_model(self) -> nn.Module:
        """The encoder (`self` for FastStudent, `.bert` for a head), as transformers' ``base_model``."""
        return getattr(self, self.base_model_prefix, self)

    @property
    def name_or_path(self) -> str:
        return self.config.name_or_path

    # ------------------------------------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Module:
        """The word-embedding module (token id -> vector)."""
        return self.base_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the word-embedding module. A module that is not a plain nn.Embedding (or one with hooks) is called
        as a module, so adapters and hooks on it take effect."""
        if not isinstance(value, nn.Module):
            raise TypeError(f"set_input_embeddings expects an nn.Module, got {type(value).__name__}")
        self.base_model.embeddings.word_embeddings = value

    def get_output_embeddings(self):
        """None: a BERT encoder and its classification heads have no language-model head."""
        return None

    def tie_weights(self, *args, **kwargs) -> None:
        """A no-op: a BERT encoder and its classification heads tie no weights."""

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Module:
        """Resize the word embeddings to `new_num_tokens` rows (rounded up to `pad_to_multiple_of`), as transformers'
        ``resize_token_embeddings``: the same Parameter object keeps the old rows; added rows are drawn from a normal
        distribution with the old rows' mean and (1e-9 x) covariance when `mean_resizing`, else N(0,
        initializer_range); ``config.vocab_size`` is updated. Returns the embedding module."""
        old = self.get_input_embeddings()
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) \
                    or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            if new_num_tokens is None:
                new_num_tokens = old.weight.shape[0]
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return old
        if not isinstance(new_num_tokens, int) or isinstance(new_num_tokens, bool) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        if not isinstance(old, nn.Embedding):
            raise TypeError(f"resize_token_embeddings needs an nn.Embedding as input embeddings, got "
                            f"{type(old).__name__}")
        n_old, dim = old.weight.shape
        if new_num_tokens != n_old:
            # the same draws as transformers: nn.Embedding's own init, then the added rows' init
            new = nn.Embedding(new_num_tokens, dim, device=old.weight.device, dtype=old.weight.dtype)
            added = new_num_tokens - n_old
            if added > 0 and not mean_resizing:
                nn.init.normal_(new.weight, 0.0, self.config.initializer_range)
            elif added > 0:
                new.weight.data[-added:] = _mean_rows(old.weight.data, added)
            n = min(n_old, new_num_tokens)
            new.weight.data[:n] = old.weight.data[:n]
            old.weight.data = new.weight.data  # same Parameter: optimizers and requires_grad stay as they were
            if old.padding_idx is not None and new_num_tokens - 1 < old.padding_idx:
                old.padding_idx = None
        old.num_embeddings = new_num_tokens
        self.config.vocab_size = new_num_tokens  # shared with base_model's config
        self.vocab_size = new_num_tokens
        self.tie_weights()
        return old

    # ------------------------------------------------------------------------------------------------ counting
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters (only those requiring grad when `only_trainable`; without nn.Embedding weights when
        `exclude_embeddings`), as transformers counts them."""
        skip = ({f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
                if exclude_embeddings else set())
        return sum(p.numel() for n, p in self.named_parameters()
                   if n not in skip and (p.requires_grad or not only_trainable))

    # ------------------------------------------------------------------------------------------------ checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each encoder layer's activations in the backward pass (torch.utils.checkpoint) while training.

        Args:
            gradient_checkpointing_kwargs: passed to torch.utils.checkpoint.checkpoint; default
                ``{"use_reentrant": False}`` (transformers 5's default).
            every_n_layers: checkpoint layers 0, n, 2n, ... only.
            offload: keep the tensors saved for the recompute in (pinned) host memory (CUDA only).
        """
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        fn = functools.partial(checkpoint, **kwargs)
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing, m._checkpoint = True, (fn, every_n_layers, bool(offload))
        if self.main_input_name == "input_ids":  # as transformers: reentrant checkpoints need grad-carrying inputs
            self.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5.24's name for :meth:`gradient_checkpointing_enable` (what Trainer calls there)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        """Store every activation again (the default)."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    is_activation_checkpointing = is_gradient_checkpointing

    # ------------------------------------------------------------------------------------------------ input grads
    def enable_input_require_grads(self) -> None:
        """Make the word embeddings' output require grad (a forward hook, as transformers does), so frozen
        embeddings still pass gradients to adapters through reentrant checkpoints."""
        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(_inputs_require_grad)

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()


def _inputs_require_grad(module, inputs, output):
    output.requires_grad_(True)


def _mean_rows(old: torch.Tensor, added: int) -> torch.Tensor:
    """transformers' mean resizing: `added` rows from N(mean, 1e-9 * covariance) of the old rows (the mean itself
    where that covariance is not positive definite), computed in float32."""
    w = old.to(torch.float32)
    mean = torch.mean(w, dim=0)
    centred = w - mean
    cov = 1e-9 * (centred.T @ centred / w.shape[0])
    if torch.distributions.constraints.positive_definite.check(cov).all():
        dist = torch.distributions.multivariate_normal.MultivariateNormal(mean, covariance_matrix=cov)
        return dist.sample(sample_shape=(added,)).to(old.dtype)
    return mean[None, :].repeat(added, 1).to(old.dtype)
