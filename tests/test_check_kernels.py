"""Proof 2 harness: `fastdistil check-kernels` builds real sm_80/sm_90 cubins without a GPU. Here a representative
subset of the attention configurations (the full matrix runs through the CLI in CI) and the failure paths (a build
error, a spill, missing tensor cores) on a throwaway kernel module."""
import json
import textwrap

import pytest

from fastdistil import cli, compile_check as cc

pytestmark = pytest.mark.compile


def run_cli(capsys, *argv):
    rc = cli.main(["check-kernels", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_attention_subset_builds_for_sm80_and_sm90(capsys):
    rc, out, err = run_cli(capsys, "--kernel", "attention", "--arch", "80,90", "--json",
                           "--match", r"^hd=32 (bf16 varlen dropout|fp32 padded)( fwd| bwd)?$")
    rows = json.loads(out)
    assert rc == 0, err
    got = {(r["kernel"], r["arch"], r["config"]) for r in rows}
    for arch in (80, 90):
        for kernel, config in [("attention_fwd", "hd=32 bf16 varlen dropout fwd"),
                               ("attention_bwd", "hd=32 bf16 varlen dropout bwd"),
                               ("attention_fwd", "hd=32 fp32 padded fwd"), ("attention_bwd", "hd=32 fp32 padded bwd"),
                               ("attention_bwd_delta", "hd=32 fp32 padded")]:
            assert (kernel, arch, config) in got
    for r in rows:
        assert {"kernel", "arch", "config", "registers", "shared_bytes", "spill_bytes", "ok"} <= r.keys()
        assert r["ok"] and r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 and r["shared_bytes"] >= 0
        if "bf16" in r["config"]:  # tensor cores: mma.sync on sm_80; on sm_90 wgmma for 64-row tiles, mma.sync
            # for the 32-row tiles of the dropout backward (a warp group's wgmma needs 64 rows)
            assert r["tensor_cores"] in (("wgmma", "mma") if r["arch"] == 90 else ("mma",)), r
            if r["arch"] == 90 and r["kernel"] == "attention_fwd":
                assert r["tensor_cores"] == "wgmma", r
        if "fp32" in r["config"]:  # ieee fp32: no tf32 MMA anywhere
            assert r["tensor_cores"] == "-" and not r["tf32"], r


FAKE = '''
import triton
import triton.language as tl
from fastdistil.kernels.spec import CompileSpec


@triton.jit
def _spill(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(X + offs[:, None] * N + offs[None, :])
    y = x / tl.sum(x, 1)[:, None] + tl.sum(x, 0)[None, :]
    tl.store(Y + offs[:, None] * N + offs[None, :], y * tl.max(y, 1)[:, None])


@triton.jit
def _broken(X, N: tl.constexpr):
    tl.static_assert(N == 0, "intentionally broken")


@triton.jit
def _copy(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs))


def compile_specs():
    sig = {"X": "*fp32", "Y": "*fp32", "N": "constexpr"}
    return [CompileSpec("fake_spill", _spill, sig, {"N": 64}, "64x64 fp32 tile in one warp", num_warps=1),
            CompileSpec("fake_broken", _broken, {"X": "*fp32", "N": "constexpr"}, {"N": 1}, "static_assert"),
            CompileSpec("fake_copy", _copy, sig, {"N": 64}, "no dot", expect_tensor_cores=True),
            CompileSpec("fake_copy", _copy, sig, {"N": 64}, "fine", extra={"divisible_by_16": ("X", "Y")})]
'''


def test_failures_spills_and_missing_tensor_cores_exit_nonzero(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "fake_kernels_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    monkeypatch.setattr("fastdistil.kernels.KERNEL_MODULES", ("fake_kernels_pkg.bad",))
    rc, out, err = run_cli(capsys, "--arch", "80", "--json")
    rows = {r["config"]: r for r in json.loads(out)}
    assert rc == 1
    assert not rows["64x64 fp32 tile in one warp"]["ok"] and rows["64x64 fp32 tile in one warp"]["spill_bytes"] > 0
    assert not rows["static_assert"]["ok"] and "intentionally broken" in rows["static_assert"]["error"]
    assert not rows["no dot"]["ok"] and "tensor-core" in rows["no dot"]["error"]
    assert rows["fine"]["ok"] and rows["fine"]["registers"] > 0
    assert "FAILED fake_spill sm_80" in err
    summary = {s["kernel"]: s for s in cc.summarize([cc.BuildResult(**r) for r in rows.values()])}
    assert summary["fake_copy"]["builds"] == 2 and summary["fake_copy"]["failed"] == 1


def test_ptx_tensor_core_detection():
    assert cc.tensor_core_instructions("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {...}") == ("wgmma", False)
    assert cc.tensor_core_instructions("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...}") == ("mma", True)
    assert cc.tensor_core_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == ("-", False)


def test_selection_errors(capsys):
    with pytest.raises(ValueError, match="no kernel or kernel module named 'nope'"):
        cc.collect("nope")
    assert run_cli(capsys, "--arch", "eighty")[0] == 1
    assert run_cli(capsys, "--kernel", "attention", "--match", "no such config")[0] == 1
    assert len(cc.collect("attention_fwd")) == 4 * 3 * 2 * 2  # head_dim x dtype x {padded, varlen} x dropout
