"""The layout of fastdistil/ops/ (issue 15): one file per op with all of its backends, one dropout-seed policy, and
native implementations that register only once the C++ extension imports (``import fastdistil`` works without it)."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastdistil
from fastdistil.ops import dispatch

OPS = Path(fastdistil.__file__).parent / "ops"
NATIVE_OK, NATIVE_WHY = fastdistil.availability()["native"]
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"native extension not built: {NATIVE_WHY}")

# op -> the file that owns every backend of it
OWNER = {"attention": "attention", "varlen_attention": "attention", "layer_norm": "layer_norm",
         "bias_gelu": "gelu", "embed_layer_norm": "embedding", "linear_gelu": "fused",
         "linear_layer_norm": "fused", "encoder_layer": "encoder", "encoder": "encoder"}


def test_import_without_the_extension_runs_the_torch_backend():
    """fastdistil._C missing: import works (no transformers, no triton), no native implementation is registered,
    the model's forward (inference and training) runs on the torch backend, and asking for native says why not."""
    code = textwrap.dedent("""
        import sys
        sys.modules["fastdistil._C"] = None  # as if the extension were not built
        import torch, fastdistil
        from fastdistil.ops import dispatch
        assert "transformers" not in sys.modules and "triton" not in sys.modules
        assert not fastdistil.availability()["native"][0]
        cfg = fastdistil.FastStudentConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=16)
        torch.manual_seed(0)
        m = fastdistil.FastStudent(cfg)
        ids, mask = torch.randint(1, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
        mask[1, 4:] = 0
        m.train()(ids, mask).last_hidden_state.sum().backward()
        with torch.inference_mode():
            y = m.eval()(ids, mask).last_hidden_state
            with fastdistil.use_backend("torch"):
                ref = m(ids, mask).last_hidden_state
        assert fastdistil.backend.resolve("cpu") == "torch" and torch.equal(y, ref)
        held = [op for op in %r if dispatch.implemented(op, "native")]
        assert not held, held
        try:
            fastdistil.set_backend("native")
        except Exception as e:
            print("REFUSED", type(e).__name__)
        print("OK", "fastdistil._C" in sys.modules and sys.modules["fastdistil._C"] is not None)
    """ % (sorted(OWNER),))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "REFUSED" in r.stdout and "OK False" in r.stdout, r.stdout


def test_import_leaves_the_extension_unimported():
    """The native implementations are defined at import but read fastdistil._C only once the backend is used."""
    code = ("import sys, fastdistil\n"
            "print(sorted(m for m in ('fastdistil._C', 'triton', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


@needs_native
@pytest.mark.parametrize("op", sorted(OWNER))
def test_each_native_op_lives_in_its_op_file(op):
    with fastdistil.use_backend("native"):
        fn = dispatch.lookup(op, torch.device("cpu"))
    assert dispatch.implemented(op, "native")
    assert fn.__module__ == f"fastdistil.ops.{OWNER[op]}", fn.__module__
    others = [dispatch._IMPLS[(op, b)] for b in ("torch", "triton") if (op, b) in dispatch._IMPLS]
    assert all(f.__module__ == f"fastdistil.ops.{OWNER[op]}" for f in others), [f.__module__ for f in others]


def test_no_backend_module_spans_several_ops():
    assert not (OPS / "native.py").exists()
    long = {p.name: n for p in OPS.glob("*.py") if (n := len(p.read_text().splitlines())) >= 500}
    assert not long, long


def test_one_dropout_seed_policy():
    """Only ops/rng.py draws dropout seeds: no other op file calls torch.randint."""
    drawers = []
    for p in OPS.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "randint":
                drawers.append(p.name)
    assert drawers == ["rng.py"], drawers


def test_seed_pool_serves_one_draw_in_order():
    """Inside seed_pool the ops' seeds are consecutive (1,) slices of one draw, distinct per site; past its end,
    outside it, on another device or in another thread each op draws its own."""
    import threading
    from fastdistil.ops import rng
    torch.manual_seed(4)
    want = torch.randint(0, 2 ** 62, (3,), dtype=torch.int64)
    torch.manual_seed(4)
    with rng.seed_pool(3, "cpu"):
        got = [rng.dropout_seed(torch.device("cpu")) for _ in range(3)]
        other = []
        t = threading.Thread(target=lambda: other.append(rng.take(1)))
        t.start()
        t.join()
        assert other == [None]  # the pool is this thread's
        assert rng.take(1, "meta") is None  # and serves only its device
        extra = rng.dropout_seed("cpu")  # exhausted: a fresh draw
    assert torch.equal(torch.cat(got), want) and len(set(torch.cat(got).tolist())) == 3
    assert all(g.shape == (1,) and g.dtype == torch.int64 for g in got)
    assert extra.shape == (1,) and rng.take(1) is None  # closed
    with rng.use_seeds(want[1:]):
        assert int(rng.dropout_seed("cpu")) == int(want[1]) and torch.equal(rng.take(1), want[2:])
    with rng.seed_pool(0, "cpu"):
        assert rng.take(1) is None


@needs_native
def test_native_dropout_seed_is_the_rng_draw():
    """The native layer_norm's dropout mask is the one the C++ kernel makes from rng.host_seed() after the same
    torch.manual_seed: the seed comes through ops/rng.py."""
    from fastdistil import _C
    from fastdistil.ops import rng
    x, w, b = torch.randn(6, 16), torch.ones(16), torch.zeros(16)
    with fastdistil.use_backend("native"):
        torch.manual_seed(7)
        y = fastdistil.ops.layer_norm(x, w, b, 1e-12, None, dropout_p=0.5)
    torch.manual_seed(7)
    ref = _C.layer_norm_fwd(x, w, b, 1e-12, None, None, 0.5, rng.host_seed(), False)[0]
    torch.manual_seed(8)
    other = _C.layer_norm_fwd(x, w, b, 1e-12, None, None, 0.5, rng.host_seed(), False)[0]
    assert torch.equal(y, ref) and not torch.equal(y, other)
