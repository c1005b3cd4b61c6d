"""The GEMM floor engine (fastdistil/bench/floor.py) and the per-engine peer lines of `fastdistil bench`."""
import torch

from fastdistil.bench import floor, runner


def test_floor_runs_the_encoders_gemms_and_is_reported_against():
    res = runner.run_workload("B", engines=["gemm-floor-fp32", "fastdistil-torch-fp32", "onnxruntime-padded"],
                              rounds=1, model="tiny", threads=1, progress=False)
    rows = {r["engine"]: r for r in res["rows"]}
    fl = rows["gemm-floor-fp32"]
    assert fl["status"] == "ok" and fl["checked"] == "n/a" and fl["agrees"] is None
    assert fl["gemm_route"] in ("aten", "onednn")
    fd = rows["fastdistil-torch-fp32"]
    assert fd["of_gemm_floor"] == fl["median_ms"] / fd["median_ms"]
    lines = runner.format_table(res)
    assert any("of the GEMM floor" in ln for ln in lines)
    if rows["onnxruntime-padded"]["status"] == "ok":
        assert fd["ort_best"] == "onnxruntime-padded"
        assert any("ONNX Runtime best (onnxruntime-padded)" in ln for ln in lines)


def test_floor_gemms_are_the_layers_products():
    state = {f"encoder.layer.0.{k}": torch.randn(*s) for k, s in (
        ("attention.self.query.weight", (8, 8)), ("attention.self.key.weight", (8, 8)),
        ("attention.self.value.weight", (8, 8)), ("attention.self.query.bias", (8,)),
        ("attention.self.key.bias", (8,)), ("attention.self.value.bias", (8,)),
        ("attention.output.dense.weight", (8, 8)), ("attention.output.dense.bias", (8,)),
        ("intermediate.dense.weight", (32, 8)), ("intermediate.dense.bias", (32,)),
        ("output.dense.weight", (8, 32)), ("output.dense.bias", (8,)))}
    ws = floor._layer_weights(state, 0, torch.float32)
    assert [tuple(w.shape) for w, _ in ws] == [(24, 8), (8, 8), (32, 8), (8, 32)]
    x = torch.randn(5, 8)
    packed = floor._onednn_linears(ws, torch.float32)
    if packed is not None:  # the prepacked route computes the same product as F.linear
        got = torch.ops.mkldnn._linear_pointwise(x, packed[0][0], packed[0][1], "none", [], "")
        torch.testing.assert_close(got, torch.nn.functional.linear(x, *ws[0]), rtol=1e-5, atol=1e-5)
