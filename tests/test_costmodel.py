"""The GPU cost model: cost arithmetic by hand on a tiny config, the layer enumeration, the op recorder on a known
module, the modeled report's contents, and the compile-report cache. Everything runs on CPU in a few seconds."""
import json

import pytest
import torch

from fastdistil.bench import costmodel as cm
from fastdistil.config import FastStudentConfig
from fastdistil.kernels.spec import Cost, gemm_cost

# a tiny encoder: d = 8, H = 2 (D = 4), f = 16, two layers; sequences of 3 and 5 tokens (T = 8)
TINY = dict(vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SEQLENS = [3, 5]


def _tiny_inputs(pad_to=6):
    ids = torch.randint(5, 64, (2, pad_to))
    mask = torch.zeros(2, pad_to, dtype=torch.int64)
    for i, n in enumerate(SEQLENS):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


# test doubles with round numbers, to check the enumeration and the arithmetic independently of the kernels'
# own formulas (tests/test_*kernels* check those); each forward is one launch, each backward two
def _fake(name, flops=100.0, nbytes=1000.0):
    def cost(*args, backward=False, **kw):
        out = [Cost(f"{name}.fwd", flops, nbytes, 1, name == "attention")]
        if backward:
            out.append(Cost(f"{name}.bwd", 2 * flops, 2 * nbytes, 2, name == "attention"))
        return out
    return cost


FAKES = cm.KernelCosts(attention=_fake("attention"), layer_norm=_fake("layer_norm"), gelu=_fake("gelu"),
                       embedding=_fake("embedding"), matmul=_fake("linear"))


def test_gemm_cost_by_hand():
    (c,) = gemm_cost("qkv", 8, 24, 8, 2)  # (8, 8) @ (8, 24) in bf16
    assert c.flops == 2 * 8 * 24 * 8 == 3072
    assert c.bytes == 2 * (8 * 8 + 8 * 24 + 8 * 24) == 896
    assert c.tensor_core and c.launches == 1
    fwd, da, db = gemm_cost("qkv", 8, 24, 8, 2, backward=True)
    assert da.flops == db.flops == fwd.flops and da.bytes == db.bytes == fwd.bytes


def test_kernel_time_formula_by_hand():
    gpu = cm.GPU("test", bandwidth=1e12, matrix_flops={"bf16": 100e12}, vector_flops=10e12,
                 launch_eager=5e-6, launch_graph=1e-6)
    mem = cm.kernel_time(Cost("ew", 1e6, 4e6, 2, False), gpu, "bf16")  # 1e6/10e12 = 0.1 us vs 4e6/1e12 = 4 us
    assert mem["bound"] == "memory"
    assert mem["time_eager_s"] == pytest.approx(4e-6 + 2 * 5e-6)
    assert mem["time_graph_s"] == pytest.approx(4e-6 + 2 * 1e-6)
    mat = cm.kernel_time(Cost("mm", 1e9, 1e6, 1, True), gpu, "bf16")  # 10 us of math vs 1 us of bytes
    assert mat["bound"] == "compute" and mat["compute_s"] == pytest.approx(1e-5)
    assert mat["time_eager_s"] == pytest.approx(1e-5 + 5e-6)
    with pytest.raises(ValueError, match="no matrix rate"):
        cm.kernel_time(Cost("mm", 1.0, 1.0, 1, True), gpu, "fp16")


def test_real_kernel_costs_by_hand_tiny_config():
    """The real cost functions on the tiny config: the algorithmic numbers every version must keep."""
    missing = [m for m, ok in cm.available_kernel_costs().items() if not ok]
    if missing:
        pytest.skip(f"kernel modules without cost() yet: {missing}")
    from fastdistil.kernels import attention, gelu
    fwd = attention.cost(SEQLENS, 2, 4, 2)[0]
    assert fwd.flops == 4 * (3 * 3 + 5 * 5) * 2 * 4  # QK^T and PV: 4 n^2 D per head and sequence
    assert fwd.bytes >= 2 * 4 * 8 * 8  # q, k, v read and o written once, bf16
    g = gelu.cost(8, 16, 2)[0]
    assert g.bytes == 2 * 8 * 16 * 2 + 16 * 2  # x read, h written, bias once
    plan = cm.layer_plan(8, 2, 16, SEQLENS, 2, fused=True)
    assert [s for s, _, _ in plan] == ["qkv_gemm", "attention", "o_proj_ln1", "ffn1_gelu", "ffn2_ln2"]
    gemm_flops = 2 * 8 * (8 * 24 + 8 * 8 + 8 * 16 + 16 * 8)
    tc_flops = sum(c.flops for _, m, c in plan if m in ("gemm", "matmul"))
    assert tc_flops >= gemm_flops  # + the epilogues' vector work
    assert cm.launches_per_layer(8, 2, 16, SEQLENS, 2, fused=True) == 1 + fwd.launches + 3


def test_layer_plan_forward_fused_and_unfused():
    fused = cm.layer_plan(8, 2, 16, SEQLENS, 2, fused=True, source=FAKES)
    assert [(s, m) for s, m, _ in fused] == [("qkv_gemm", "gemm"), ("attention", "attention"),
                                             ("o_proj_ln1", "matmul"), ("ffn1_gelu", "matmul"),
                                             ("ffn2_ln2", "matmul")]
    assert fused[0][2] == gemm_cost("qkv_gemm", 8, 24, 8, 2)[0]
    unfused = cm.layer_plan(8, 2, 16, SEQLENS, 2, fused=False, source=FAKES)
    assert [c.name for _, _, c in unfused] == ["qkv_gemm", "attention.fwd", "o_proj_gemm", "layer_norm.fwd",
                                               "ffn1_gemm", "gelu.fwd", "ffn2_gemm", "layer_norm.fwd"]
    assert cm.launches_per_layer(8, 2, 16, SEQLENS, 2, fused=True, source=FAKES) == 5
    assert cm.launches_per_layer(8, 2, 16, SEQLENS, 2, fused=False, source=FAKES) == 8


def test_layer_plan_training_adds_backward_and_autograd_glue():
    plan = cm.layer_plan(8, 2, 16, SEQLENS, 2, training=True, fused=True, source=FAKES)
    stages = [s for s, _, _ in plan]
    assert stages.count("qkv_weight_cat") == 1 and "qkv_unbind" in stages and "grad_accumulate" in stages
    # forward 5 + cat 1 + qkv dA, dB, dbias 3 + stack 1 + (attention, 3 fused linears) backward 2 each + 2 adds
    assert sum(c.launches for _, _, c in plan) == 5 + 1 + 3 + 1 + 4 * 2 + 2
    cat = [c for s, _, c in plan if s == "qkv_weight_cat"][0]
    assert cat.bytes == 2 * 2 * (3 * 8 * 8 + 3 * 8)  # read and write the (3d, d) weight and (3d,) bias, bf16
    rows = cm.model_kernels(cm_config(), SEQLENS, 2, source=FAKES)
    assert [r["layer"] for r in rows] == [-1] + [0] * 5 + [1] * 5


def cm_config():
    return FastStudentConfig(**TINY)


def test_missing_kernel_module_is_a_clear_error():
    src = cm.KernelCosts()
    with pytest.raises(cm.KernelCostMissing, match="kernels/no_such_op.py"):
        src.no_such_op = None
        src.get("no_such_op")


def test_op_recorder_counts_a_known_module():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with torch.no_grad(), cm.OpRecorder() as rec:
        m(x)
    assert rec.counts() == {"addmm": 2, "relu": 1}
    assert rec.counts(kernels_only=False)["t"] == 2  # the weight transposes: views, no kernel
    first = rec.kernel_ops()[0]
    assert [t.shape for t in first.inputs] == [(3,), (5, 4), (4, 3)] and first.outputs[0].shape == (5, 3)
    c = cm.op_cost(first)
    assert c.flops == 2 * 5 * 4 * 3 and c.tensor_core
    assert c.bytes == 4 * (3 + 5 * 4 + 4 * 3 + 5 * 3)
    relu = cm.op_cost(rec.kernel_ops()[1])
    assert relu.bytes == 4 * (5 * 3 + 5 * 3) and not relu.tensor_core

    rec = cm.OpRecorder()
    with rec:
        rec.phase = "forward"
        y = m(x)
        rec.phase = "backward"
        y.backward(torch.ones_like(y))
    back = [o.packet for o in rec.kernel_ops() if o.phase == "backward"]
    assert back.count("mm") == 3 and back.count("sum") == 2 and back.count("threshold_backward") == 1


def test_op_recorder_gathers_read_rows_not_tables():
    table = torch.randn(1000, 16)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), cm.OpRecorder() as rec:
        torch.nn.functional.embedding(ids, table)
    (c,) = rec.costs()
    assert c.bytes == 3 * 16 * 4 * 2 + 3 * 8  # rows read + rows written + the int64 ids


def test_model_perf_report_contents():
    cfg = cm_config()
    ids, mask = _tiny_inputs()
    rep = cm.model_perf("A", cfg=cfg, inputs=(ids, mask), train=True, peers=("eager",), source=FAKES, fused=True,
                        compile_report=None)
    assert rep["modeled"] is True
    assert rep["launches_per_layer"] == 5
    assert rep["workload"]["real_tokens"] == 8 and rep["workload"]["padded_tokens"] == 12
    fwd = rep["fastdistil"]["forward"]
    assert fwd["per_layer_totals"]["launches"] == 5
    assert fwd["kernels_totals"]["launches"] == 1 + 2 * 5  # embeddings + 2 layers
    assert fwd["whole_model"]["launches"] == fwd["kernels_totals"]["launches"] + fwd["glue"]["totals"]["launches"]
    tr = rep["transformers"]["eager"]["forward"]["totals"]
    assert rep["modeled_speedup_vs_transformers"] == pytest.approx(
        tr["time_eager_s"] / fwd["whole_model"]["time_eager_s"])
    assert tr["launches"] > fwd["whole_model"]["launches"] - fwd["glue"]["totals"]["launches"]
    assert "training" in rep["fastdistil"] and "training" in rep["transformers"]["eager"]
    assert rep["transformers"]["eager"]["training"]["totals"]["launches"] > tr["launches"]
    lines = cm.format_report(rep)
    assert lines and all("modeled" in ln for ln in lines)
    back = json.loads(json.dumps(cm.to_jsonable(rep)))
    assert back["launches_per_layer"] == 5 and back["modeled_speedup_vs_transformers"] > 0


def test_padding_costs_transformers_not_fastdistil():
    cfg = cm_config()
    ids, mask = _tiny_inputs(6)
    ids2, mask2 = _tiny_inputs(12)
    a = cm.model_perf("A", cfg=cfg, inputs=(ids, mask), peers=("eager",), source=FAKES, fused=True,
                      compile_report=None, host=None)  # host=None: no measured (noisy) host time in the totals
    b = cm.model_perf("A", cfg=cfg, inputs=(ids2, mask2), peers=("eager",), source=FAKES, fused=True,
                      compile_report=None, host=None)
    assert a["fastdistil"]["forward"]["kernels_totals"] == b["fastdistil"]["forward"]["kernels_totals"]
    ta, tb = (r["transformers"]["eager"]["forward"]["totals"] for r in (a, b))
    assert tb["bytes"] > ta["bytes"] and tb["flops"] > ta["flops"]


def test_gpu_overrides_and_unknown_names():
    g = cm.get_gpu("h100", bandwidth=2e12, launch_eager=None)
    assert g.bandwidth == 2e12 and g.launch_eager == cm.GPUS["h100"].launch_eager
    assert cm.get_gpu("A100").matrix_rate("bf16") < cm.get_gpu("h100").matrix_rate("bf16")
    with pytest.raises(ValueError, match="unknown GPU"):
        cm.get_gpu("v100")
    with pytest.raises(ValueError, match="dtype"):
        cm.model_perf("A", dtype="int8", source=FAKES)


def test_compile_report_cache(tmp_path, monkeypatch):
    def build(kernel, config, regs, spill, arch=90, module="attention"):
        return {"module": module, "kernel": kernel, "config": config, "arch": arch, "registers": regs,
                "spill_bytes": spill, "ok": spill == 0}
    rows = [build("attention_fwd", "hd=32 bf16 varlen fwd", 128, 0),
            build("attention_fwd", "hd=32 bf16 varlen dropout fwd", 168, 0),
            build("attention_fwd", "hd=32 fp16 varlen fwd", 120, 0),
            build("attention_bwd", "hd=32 bf16 varlen bwd", 255, 16),
            build("attention_fwd", "hd=32 bf16 varlen fwd", 96, 0, arch=80),
            build("_linear_fwd", "bf16 bias+gelu infer", 200, 0, module="matmul"),
            build("_linear_fwd", "bf16 N<=512 bias+dropout+res+LN infer", 230, 0, module="matmul"),
            build("_linear_fwd", "bf16 N<=512 bias+dropout+res+LN train", 255, 64, module="matmul")]
    f = tmp_path / "report.json"
    f.write_text(json.dumps(rows))  # the `fastdistil check-kernels --json` format
    s = cm.summarize_compile_report(cm.load_compile_report(f), 90)
    assert len(s["builds"]) == 7 and "2 failed, 80 spill bytes" in s["summary"] and s["stale"] is None
    note = lambda name, module, **kw: cm._compile_note(s, name, module, **kw)  # noqa: E731
    assert note("attention.fwd", "attention", head_dim=32) == "regs 128 spill 0"  # bf16, no dropout, sm_90
    assert note("attention.fwd", "attention", dtype="fp16", head_dim=32) == "regs 120 spill 0"
    assert note("attention.bwd", "attention", training=True) == "regs 255 spill 16 FAILED 1"
    assert note("linear_gelu", "matmul") == "regs 200 spill 0"
    assert note("linear_layer_norm", "matmul") == "regs 230 spill 0"
    assert note("linear_layer_norm", "matmul", training=True) == "regs 255 spill 64 FAILED 1"
    assert note("qkv_gemm", "gemm") == "library" and note("linear_gelu.dA", "matmul") == "library"
    assert cm._compile_note(None, "attention.fwd", "attention") == "-"
    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps({"fingerprint": "not-the-current-one", "results": rows}))
    monkeypatch.setenv("FASTDISTIL_COMPILE_REPORT", str(cache))
    assert cm.compile_report_path() == cache
    assert cm.load_compile_report()["stale"] is True
    assert cm.load_compile_report(tmp_path / "absent.json") is None
    cache.write_text(json.dumps({"fingerprint": cm.kernels_fingerprint(), "results": rows}))
    assert cm.load_compile_report()["stale"] is False
