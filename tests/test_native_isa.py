"""Kernel tables per instruction set (csrc/dispatch.cpp): the choice as a pure function of (features, environment)
on mocked CPUs, every table this CPU can run against the float64 reference on awkward shapes, the instructions each
table really contains, torch's thread count in every parallel region, and bfloat16 on a CPU without native bf16
dot products (forced on this AVX-512 machine)."""
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastdistil
from fastdistil import reference as R

NATIVE_OK, NATIVE_WHY = fastdistil.availability()["native"]
pytestmark = pytest.mark.skipif(not NATIVE_OK, reason=f"native extension not built: {NATIVE_WHY}")

AVX2 = dict.fromkeys(["avx", "avx2", "fma", "f16c", "bmi1", "bmi2"], True)  # AMD Zen 3, Intel Haswell..Alder Lake
AVX512 = dict(AVX2, **dict.fromkeys(["avx512f", "avx512bw", "avx512vl", "avx512dq"], True))


def _python(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ, **env)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), e.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------ choice, mocked CPUs
@pytest.mark.parametrize("features,aten,want", [
    ({}, "", "generic"), (dict(AVX2, fma=False), "", "generic"), (AVX2, "", "avx2"), (AVX512, "", "avx512"),
    (dict(AVX512, avx512bw=False), "", "avx2"),  # AVX-512F without BW (Knights Landing) is not the avx512 table
    (AVX512, "avx2", "avx2"), (AVX512, "default", "generic"), (AVX2, "default", "generic"),
    (AVX512, "avx512", "avx512"), (AVX2, "avx512", "avx2"), (AVX512, "zvector", "avx512")])
def test_choose_isa_auto(features, aten, want):
    from fastdistil import _C
    for forced in ("", "auto", "AUTO"):
        assert _C.choose_isa(features, forced, aten) == want


@pytest.mark.parametrize("features", [{}, AVX2, AVX512])
@pytest.mark.parametrize("forced", ["generic", "avx2", "avx512", "AVX2"])
def test_choose_isa_forced_runs_or_names_what_is_missing(features, forced):
    from fastdistil import _C
    need = {"generic": {}, "avx2": AVX2, "avx512": AVX512}[forced.lower()]
    if all(features.get(k) for k in need):
        assert _C.choose_isa(features, forced, "default") == forced.lower()  # forcing beats ATen's cap
        return
    lacks = [k for k in need if not features.get(k)]
    with pytest.raises(ValueError) as e:
        _C.choose_isa(features, forced, "")
    msg = str(e.value)
    assert f"FASTDISTIL_NATIVE_ISA='{forced.lower()}' asks for the {forced.lower()} kernel table" in msg
    assert "this CPU lacks " + " ".join(lacks) in msg and "CPU features seen: " in msg, msg
    assert msg.endswith("tables this CPU can run: " + ("generic avx2" if features == AVX2 else "generic")), msg


def test_choose_isa_unknown_name():
    from fastdistil import _C
    with pytest.raises(ValueError, match=r"FASTDISTIL_NATIVE_ISA='avx1024' is not a kernel table; use one of auto, "
                                         r"generic, avx2, avx512"):
        _C.choose_isa(AVX512, "avx1024", "")


def test_cpu_features_and_supported_tables():
    from fastdistil import _C
    f = _C.cpu_features()
    assert {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "avx_ne_convert"} <= set(f)
    if os.path.exists("/proc/cpuinfo"):
        flags = set(re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M).group(1).split())
        for k in ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                  "avx512_bf16", "avx512_vnni"):
            assert f[k] == (k in flags), k
    sup = _C.supported_isas()
    assert sup[0] == "generic" and sup == [n for n in ("generic", "avx2", "avx512") if n == "generic"
                                           or all(f[k] for k in (AVX2 if n == "avx2" else AVX512))]
    assert _C.choose_isa(f, "", "") == sup[-1]


def test_environment_selects_the_table(monkeypatch):
    """FASTDISTIL_NATIVE_ISA and ATEN_CPU_CAPABILITY are read at selection (the first use, or set_isa('auto'));
    a bad name is a ValueError there and at every native op until it is fixed, never another table."""
    from fastdistil import _C
    sup = _C.supported_isas()
    monkeypatch.delenv("FASTDISTIL_NATIVE_ISA", raising=False)
    try:
        for aten, want in (("default", "generic"), ("avx2", "avx2" if "avx2" in sup else "generic")):
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", aten)
            _C.set_isa("auto")
            assert _C.isa() == want
        monkeypatch.delenv("ATEN_CPU_CAPABILITY")
        for name in sup:
            monkeypatch.setenv("FASTDISTIL_NATIVE_ISA", name)
            _C.set_isa("auto")
            assert _C.isa() == name
        monkeypatch.setenv("FASTDISTIL_NATIVE_ISA", "avx1024")
        with pytest.raises(ValueError, match="'avx1024' is not a kernel table"):
            _C.set_isa("auto")
        x = torch.randn(3, 8)
        with pytest.raises(ValueError, match="FASTDISTIL_NATIVE_ISA='avx1024'"):
            _C.layer_norm_fwd(x, torch.ones(8), torch.zeros(8), 1e-5, None, None, 0.0, 0, False)
        with pytest.raises(ValueError, match="set_isa='avx1024' is not a kernel table"):
            _C.set_isa("avx1024")
    finally:
        monkeypatch.undo()
        _C.set_isa("auto")
    assert _C.isa() == _C.choose_isa(_C.cpu_features(), os.environ.get("FASTDISTIL_NATIVE_ISA", ""),
                                     os.environ.get("ATEN_CPU_CAPABILITY", ""))


def test_bad_isa_is_a_clear_error_at_first_use_and_in_info():
    r = _python("""
        import torch, fastdistil
        from fastdistil.commands import info
        print("INFO", info.run(None))
        fastdistil.ops.layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), 1e-5, None)
        """, env={"FASTDISTIL_NATIVE_ISA": "avx1024"})
    assert "native  no   fastdistil native: FASTDISTIL_NATIVE_ISA='avx1024' is not a kernel table" in r.stdout
    assert "INFO 2" in r.stdout
    assert r.returncode == 1 and "ValueError: fastdistil native: FASTDISTIL_NATIVE_ISA='avx1024'" in r.stderr, r.stderr


def test_info_names_table_features_and_bf16_int8_modes(capsys):
    from fastdistil import _C
    from fastdistil.commands import info
    from fastdistil.ops import onednn
    assert info.run(None) == 0
    out = capsys.readouterr().out
    f = _C.cpu_features()
    assert f"native kernels: {_C.isa()} table" in out
    assert "CPU features seen: " + " ".join(k for k in sorted(f) if f[k]) in out
    bf16 = "native bf16 dot products (avx512_bf16/AMX)" if onednn.native_bf16() else "bf16 storage-only: fp32 compute"
    assert "bf16: " + bf16 in out
    assert ("int8: VNNI dot products" if f["avx512_vnni"] or f["avx_vnni"] or f["amx_int8"] else
            "int8: no VNNI") in out
    assert onednn.native_bf16() == (f["avx512_bf16"] and onednn.bf16_ok())


# ------------------------------------------------------------------------- every table against the float64 reference
@pytest.fixture(params=["generic", "avx2", "avx512"])
def table(request):
    """Each kernel table this CPU can run (the others are skipped: on an AVX2 CI machine, avx512)."""
    from fastdistil import _C
    if request.param not in _C.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} table (features: {_C.cpu_features()})")
    _C.set_isa(request.param)
    assert _C.isa() == request.param
    yield request.param
    _C.set_isa("auto")


def _close(ours, ref, dtype, what):
    """fp32: within 2e-5 of the float64 reference (relative to its scale); bf16: within a few bf16 ulps."""
    scale = max(1.0, ref.abs().max().item())
    tol = (2e-5 if dtype == torch.float32 else 2e-2) * scale
    e = (ours.double() - ref).abs().max().item()
    assert e <= tol, f"{what}: error {e:.3g} > {tol:.3g}"


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


SHAPES = [[1], [7], [129], [13, 1, 31, 0, 7]]  # 1, 7, 129 tokens, primes and an empty sequence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", SHAPES)
def test_attention_fwd_bwd(table, lens, dtype):
    from fastdistil import _C
    H, D = 3, 24  # D not a multiple of 16: the vector loops' tails
    g = torch.Generator().manual_seed(sum(lens))
    q, k, v, do = (torch.randn(sum(lens), H, D, generator=g).to(dtype) for _ in range(4))
    cu, L = _cu(lens), max(lens)
    o, lse = _C.varlen_attention_fwd(q, k, v, cu, L, 0.3, 0.0, 0, True)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = R.varlen_attention(*leaves, cu, L, softmax_scale=0.3)
    _close(o, ref.detach(), dtype, "o")
    ref.backward(do.double())
    dq, dk, dv = _C.varlen_attention_bwd(do, q, k, v, o, lse, cu, L, 0.3, 0.0, 0)
    for name, ours, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        _close(ours, leaf.grad, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,N", [(1, 37), (7, 384), (129, 17)])
def test_layer_norm_fwd_bwd(table, rows, N, dtype):
    from fastdistil import _C
    g = torch.Generator().manual_seed(N)
    x, res, dy = (torch.randn(rows, N, generator=g).to(dtype) for _ in range(3))
    w, b, ib = (torch.randn(N, generator=g).to(dtype) for _ in range(3))
    y, s, mean, rstd = _C.layer_norm_fwd(x, w, b, 1e-5, res, ib, 0.0, 0, True)
    leaves = [t.double().requires_grad_() for t in (x, w, b, res, ib)]
    ref = R.layer_norm(leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], input_bias=leaves[4])
    _close(y, ref.detach(), dtype, "y")
    ref.backward(dy.double())
    dres, dx, dw, db, dib = _C.layer_norm_bwd(dy, s, mean, rstd, w, 0.0, 0)
    for name, ours, leaf in zip(("dx", "dw", "db", "dres", "dib"), (dx, dw, db, dres, dib), leaves):
        _close(ours, leaf.grad, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,N", [(1, 37), (129, 61)])
def test_bias_gelu_fwd_bwd(table, rows, N, approximate, dtype):
    from fastdistil import _C
    g = torch.Generator().manual_seed(rows)
    x, dy = (3 * torch.randn(rows, N, generator=g)).to(dtype), torch.randn(rows, N, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    tanh = approximate == "tanh"
    leaves = [t.double().requires_grad_() for t in (x, b)]
    ref = R.bias_gelu(*leaves, approximate)
    _close(_C.bias_gelu_fwd(x, b, tanh), ref.detach(), dtype, "y")
    ref.backward(dy.double())
    dx, db = _C.bias_gelu_bwd(dy, x, b, tanh)
    _close(dx, leaves[0].grad, dtype, "dx")
    _close(db, leaves[1].grad, dtype, "db")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,N", [(1, 37), (129, 64)])
def test_embed_layer_norm(table, T, N, dtype):
    from fastdistil import _C
    g = torch.Generator().manual_seed(T)
    word, pos, typ = (torch.randn(n, N, generator=g).to(dtype) for n in (53, 131, 2))
    w, b = torch.randn(N, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    ids, pids, tids = (torch.randint(0, n, (T,), generator=g) for n in (53, 131, 2))
    ours = _C.embed_layer_norm_fwd(ids, tids, pids, word, pos, typ, w, b, 1e-12)
    ref = R.embed_layer_norm(ids, tids, pids, *(t.double() for t in (word, pos, typ, w, b)), 1e-12)
    _close(ours, ref, dtype, "y")


@pytest.mark.parametrize("lens", SHAPES)
def test_encoder_layer(table, lens):
    """The whole C++ layer (ATen GEMMs + this table's kernels) against the layer in float64 from the reference ops."""
    from fastdistil import _C
    T, d, H, f = sum(lens), 48, 4, 96
    g = torch.Generator().manual_seed(T)
    shapes = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (f, d), (f,), (d, f), (d,), (d,), (d,)]
    ws = [0.2 * torch.randn(s, generator=g) for s in shapes]
    x, cu, L = torch.randn(T, d, generator=g), _cu(lens), max(lens)
    from fastdistil.layer_weights import LayerWeights
    ours = _C.encoder_layer(x, LayerWeights(*ws, eps1=1e-12, eps2=1e-5, heads=H), cu, L)
    w = [t.double() for t in ws]
    x64 = x.double()
    q, k, v = (x64 @ w[0].T + w[1]).view(T, 3, H, d // H).unbind(1)
    ctx = R.varlen_attention(q, k, v, cu, L).reshape(T, d)
    x1 = R.layer_norm(ctx @ w[2].T + w[3], w[4], w[5], 1e-12, x64)
    h = R.gelu(x1 @ w[6].T + w[7])
    _close(ours, R.layer_norm(h @ w[8].T + w[9], w[10], w[11], 1e-5, x1), torch.float32, "out")


# ------------------------------------------------------------------------------ what each table is compiled to
def test_each_table_is_compiled_for_its_instruction_set():
    """generic: baseline x86-64 (no VEX, no FMA); avx2: 256-bit ymm with FMA, no zmm; avx512: zmm with FMA. And the
    hot loops are vector code in registers: attention's products as register-to-register FMAs (a 64-byte vector type
    on AVX2 went through the stack), GELU's erf vectorised in every table (GCC 12 left it scalar below AVX-512 until
    -fno-trapping-math)."""
    if shutil.which("objdump") is None or not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        pytest.skip("needs objdump on x86-64 Linux")
    from fastdistil import _C
    asm = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    fn = {}  # (isa, "name<args>") -> disassembly
    for block in asm.split("\n\n"):
        m = re.match(r"[0-9a-f]+ <void fd::(generic|avx2|avx512)::(\w+<[^>]*>)\(fd::\w+ const&\)>:", block)
        if m:
            fn[m.group(1), m.group(2)] = block
    body = {isa: "\n".join(b for (i, _), b in fn.items() if i == isa) for isa in ("generic", "avx2", "avx512")}
    for isa in body:
        assert all((isa, k) in fn for k in ("attn_fwd<float>", "attn_bwd<unsigned short>", "ln_bwd<float>",
                                           "gelu_fwd_rows<float, false, true>", "embed_fwd<float>")), isa
    assert not re.search(r"%[yz]mm|\tvfmadd|\tv[a-z0-9]+\s+%xmm", body["generic"])
    assert "%zmm" not in body["avx2"] and "%zmm" in body["avx512"]
    reg_fma = r"\tvfmadd231ps\s+%{0}mm\d+,%{0}mm\d+,%{0}mm\d+"
    assert re.search(reg_fma.format("y"), fn["avx2", "attn_fwd<float>"])
    assert re.search(reg_fma.format("z"), fn["avx512", "attn_fwd<float>"])
    gelu = "gelu_fwd_rows<float, false, true>"
    assert re.search(r"\tvfmadd\S*ps\s.*%ymm", fn["avx2", gelu]) and re.search(r"\tmulps\s", fn["generic", gelu])


# ------------------------------------------------------------------------------------------------- threads
def _threaded_ops():
    """Every C++ op at sizes that split over threads; the outputs whose summation order is per row or per (sequence,
    head), i.e. independent of the thread count (not the column sums dgamma, dbeta, dbias)."""
    from fastdistil import _C
    g = torch.Generator().manual_seed(0)
    lens = [129, 64, 7, 31, 97]
    q, k, v, do = (torch.randn(sum(lens), 4, 32, generator=g) for _ in range(4))
    cu = _cu(lens)
    o, lse = _C.varlen_attention_fwd(q, k, v, cu, 129, 0.2, 0.1, 7, True)
    dq, dk, dv = _C.varlen_attention_bwd(do, q, k, v, o, lse, cu, 129, 0.2, 0.1, 7)
    x, res, dy = (torch.randn(1031, 64, generator=g) for _ in range(3))
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    y, s, mean, rstd = _C.layer_norm_fwd(x, w, b, 1e-5, res, b, 0.1, 3, True)
    ds, dx = _C.layer_norm_bwd(dy, s, mean, rstd, w, 0.1, 3)[:2]
    h = torch.randn(1031, 256, generator=g)
    gy = _C.bias_gelu_fwd(h, torch.randn(256, generator=g), False)
    gdx = _C.bias_gelu_bwd(h, h, torch.zeros(256), False)[0]
    ids = torch.randint(0, 64, (1031,), generator=g)
    e = _C.embed_layer_norm_fwd(ids, ids % 2, ids, x[:64], x[64:128], x[128:130], w, b, 1e-12)
    return dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv, y=y, s=s, ds=ds, dx=dx, gy=gy, gdx=gdx, e=e)


def test_one_thread_equals_two_threads_bit_for_bit():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _threaded_ops()
        torch.set_num_threads(2)
        two = _threaded_ops()
    finally:
        torch.set_num_threads(n)
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc/self/task")
@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_regions_use_torch_set_num_threads(threads):
    """The C++ ops' parallel regions run on torch's OpenMP pool with torch.set_num_threads threads: one OpenMP
    runtime in the process (a second one, linked by the extension, would ignore set_num_threads and start a team
    of one thread per core), and exactly threads - 1 workers started by the ops."""
    head = "import os, re, torch\n" + inspect.getsource(_cu) + inspect.getsource(_threaded_ops)
    r = _python(head + textwrap.dedent(f"""
        torch.set_num_threads(1)
        _threaded_ops()
        base = len(os.listdir("/proc/self/task"))
        torch.set_num_threads({threads})
        _threaded_ops()
        _threaded_ops()
        maps = open("/proc/self/maps").read()
        omp = {{m.group(0) for m in re.finditer(r"\\S*lib(g|i)omp[^/\\s]*\\.so[.0-9]*", maps)}}
        print("OMP", len(omp), "NEW", len(os.listdir("/proc/self/task")) - base, sorted(omp))
        """), env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"OMP 1 NEW {threads - 1} " in r.stdout, r.stdout


# ------------------------------------------------------------------------------- bf16 and oneDNN that never raise
def _tiny(**kw):
    from fastdistil import FastStudent, FastStudentConfig
    torch.manual_seed(0)
    return FastStudent(FastStudentConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, **kw)).eval()


def _ids():
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(1, 120, (3, 29), generator=g), torch.ones(3, 29, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 1:] = 0
    return ids, mask


def test_onednn_refusing_any_dtype_sends_layers_to_blas(monkeypatch):
    """A oneDNN that refuses fp32 too (an old CPU, an ONEDNN_MAX_CPU_ISA cap, a torch build) is found by the probe
    before any layer chooses it: the model runs on ATen's GEMMs and matches the torch backend."""
    from fastdistil.ops import onednn

    def refuse(*args, **kw):
        raise RuntimeError("onednn: this CPU is not supported")

    m = _tiny()
    ids, mask = _ids()
    real = mask.bool()
    with torch.inference_mode(), fastdistil.use_backend("torch"):
        ref = m(ids, mask).last_hidden_state[real]
    monkeypatch.setattr(onednn, "_PROBES", {})
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    with torch.inference_mode(), fastdistil.use_backend("native"):
        ours = m(ids, mask).last_hidden_state[real]
    assert onednn._PROBES[torch.float32] is False
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("native_bf16", [True, False])
def test_bf16_storage_only_warns_once(monkeypatch, native_bf16):
    """Without native bf16 dot products one RuntimeWarning says bf16 is storage-only, whichever path runs and however
    often; with them, none."""
    import warnings
    from fastdistil.ops import onednn
    monkeypatch.setattr(onednn, "_PROBES", {})
    monkeypatch.setattr(onednn, "native_bf16", lambda: native_bf16)
    m = _tiny().to(torch.bfloat16)
    ids, mask = _ids()
    with warnings.catch_warnings(record=True) as rec, fastdistil.use_backend("native"):
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.inference_mode():
                m(ids, mask)  # the whole-layer path
            m(ids, mask)  # the per-op path
    storage = [w for w in rec if "bfloat16 runs as a storage format with fp32 compute" in str(w.message)]
    assert len(storage) == (0 if native_bf16 else 1), [str(w.message) for w in rec]


def test_bf16_model_runs_without_native_bf16(tmp_path):
    """This AVX-512 machine made to look like an AVX2-only one (the avx2 table, oneDNN capped at AVX2, ATen at
    avx2): FastStudent.from_pretrained(dir, dtype=torch.bfloat16) runs under the default backend on the avx2 table
    and ATen's GEMMs, says once that bf16 is storage-only, and matches fp32 to bf16 accuracy."""
    _tiny().save_pretrained(tmp_path / "m")
    r = _python(f"""
        import warnings, torch, fastdistil
        from fastdistil import FastStudent, _C
        from fastdistil.ops import onednn
        d = {str(tmp_path / "m")!r}
        m32, m16 = FastStudent.from_pretrained(d).eval(), FastStudent.from_pretrained(d, dtype=torch.bfloat16).eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, 120, (3, 29), generator=g); mask = torch.ones(3, 29, dtype=torch.long); mask[1, 7:] = 0
        real = mask.bool()
        with torch.inference_mode():
            with fastdistil.use_backend("torch"):
                ref32, ref16 = (m(ids, mask).last_hidden_state[real].float() for m in (m32, m16))
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                ours = [m16(ids, mask).last_hidden_state[real].float() for _ in range(2)]
        n = sum("storage format with fp32 compute" in str(w.message) for w in rec)
        print("RESULT", _C.isa(), onednn.native_bf16(), onednn.bf16_ok(), n, fastdistil.get_backend(),
              max((o - ref32).abs().max().item() for o in ours), (ref16 - ref32).abs().max().item())
        """, env={"FASTDISTIL_NATIVE_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                  "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert r.returncode == 0, r.stderr[-3000:]
    isa, nat, onednn, n, backend, e_ours, e_torch = r.stdout.split("RESULT ")[1].split()
    assert (isa, nat, onednn, n, backend) == ("avx2", "False", "False", "1", "auto"), r.stdout
    assert float(e_ours) <= 2 * float(e_torch) + 1e-2, r.stdout
