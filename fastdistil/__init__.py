"""fastdistil: fused, padding-free runtime for small BERT encoders, for inference and knowledge distillation.

Importing fastdistil never touches a GPU and does not import triton, transformers or the C++ extension.
"""
from . import ops
from .backend import availability, get_backend, set_backend, use_backend
from .config import FastStudentConfig
from .heads import (FastStudentForQuestionAnswering, FastStudentForSequenceClassification,
                    FastStudentForTokenClassification)
from .graphs import GraphRunner
from .model import FastStudent
from .patch import is_patched, patch, patch_sentence_transformer, unpatch

__version__ = "0.1.0"

__all__ = ["FastStudent", "FastStudentConfig", "GraphRunner", "FastStudentForSequenceClassification",
           "FastStudentForTokenClassification", "FastStudentForQuestionAnswering", "set_backend", "get_backend",
           "use_backend", "availability", "ops", "patch", "unpatch", "patch_sentence_transformer", "is_patched",
           "__version__"]
