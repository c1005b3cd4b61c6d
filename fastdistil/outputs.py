"""ModelOutput: attribute, key and index access like transformers' ModelOutput, without importing transformers."""
from __future__ import annotations

from collections import OrderedDict


class ModelOutput(OrderedDict):
    """Ordered fields; None-valued fields are skipped by integer indexing and to_tuple(), as in transformers."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)
        self.__dict__["_all"] = tuple(fields)

    def __getattr__(self, name):
        if name in self:
            return self[name]
        if name in self.__dict__["_all"]:
            return None
        raise AttributeError(name)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def __iter__(self):  # iterate keys like a dict (transformers does the same)
        return super().__iter__()

    def to_tuple(self) -> tuple:
        return tuple(self.values())
