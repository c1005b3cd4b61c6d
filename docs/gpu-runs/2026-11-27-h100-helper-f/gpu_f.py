"""Helper F's one-shot GPU check (not part of the project): runtime configs vs compile specs, spills,
autocast training, >65535 grid, a few timings. Writes $OUT/gpu_f.json."""
import json, os, sys, time, traceback, importlib, copy, math
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch, triton
R = {"env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}}
OUT = os.environ.get("OUT", "/tmp")
def save():
    json.dump(R, open(os.path.join(OUT, "gpu_f.json"), "w"), indent=1, default=str)
def section(name):
    def deco(f):
        t = time.time()
        try:
            R[name] = f()
        except Exception as e:
            R[name] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-1500:]}
        R.setdefault("seconds", {})[name] = round(time.time() - t, 1)
        print(name, json.dumps(R[name], default=str)[:600], flush=True); save()
    return deco
import fastdistil
from fastdistil import FastStudent, ops
from test_model import hf_bert, batch
fastdistil.set_backend("triton")
dev = "cuda"

@section("model_steps")
def _():
    out = {}
    hf = hf_bert(hidden=384, heads=12, layers=2, inter=1536, dropout=0.1, max_pos=512, vocab=30522).to(dev)
    ids, mask, tt = (t.to(dev) for t in batch(16, 128, 30522))
    for dt in (torch.float32, torch.float16, torch.bfloat16, "amp16", "amp"):
        m = FastStudent.from_hf(hf).to(dev).train()
        if not isinstance(dt, str):
            m = m.to(dt)
        ac = torch.autocast("cuda", dtype=torch.float16 if dt == "amp16" else torch.bfloat16) if isinstance(dt, str) else torch.autocast("cuda", enabled=False)
        with ac:
            o = m(ids, mask, tt)
            loss = (o.last_hidden_state.float() * mask[..., None]).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            m.eval()(ids, mask, tt)
        out[str(dt)] = float(loss)
    return out

@section("kd_relation")
def _():
    s = torch.randn(256, 30522, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ops.kd_kl_rows(s, s.detach() * 1.1, 2.0).sum().backward()
    q = torch.randn(1000, 12, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.arange(0, 1001, 100, device=dev, dtype=torch.int32)
    ops.relation_kl_rows(q, q, q.detach(), q.detach(), num_relation_heads=12, cu_seqlens=cu, max_seqlen=100).sum().backward()
    return "ok"

@section("runtime_vs_specs")
def _():
    from fastdistil import kernels as KP, compile_check as cc
    rows, unmatched, spills = [], [], []
    for modname in KP.KERNEL_MODULES:
        mod = importlib.import_module(f"fastdistil.kernels.{modname}")
        specs = mod.compile_specs()
        for name, obj in vars(mod).items():
            caches = getattr(obj, "device_caches", None)
            if type(obj).__name__ != "JITFunction" or not caches:
                continue
            for entry in caches.values():
                kc = entry[0] if isinstance(entry, (tuple, list)) else entry
                for ck in list(kc.values()):
                    try:
                        ck._init_handles()
                    except Exception:
                        pass
                    md, src = ck.metadata, ck.src
                    sig = dict(src.signature)
                    consts = {obj.arg_names[k[0]]: v for k, v in src.constants.items()}
                    hinted = sorted(obj.arg_names[k[0]] for k, v in src.attrs.items() if ["tt.divisibility", 16] in [list(x) for x in v])
                    r = {"kernel": f"{modname}.{name}", "regs": ck.n_regs, "spills": ck.n_spills, "warps": md.num_warps,
                         "stages": md.num_stages, "hinted": len(hinted)}
                    best = None
                    for sp in specs:
                        if sp.fn is not obj or (sp.num_warps, sp.num_stages) != (md.num_warps, md.num_stages):
                            continue
                        if any(sp.constexprs.get(n, "?") != v for n, v in consts.items() if sig.get(n) == "constexpr" and n in sp.constexprs):
                            continue
                        typ_ok = all(sp.signature.get(n) == t for n, t in sig.items() if t != "constexpr")
                        if not typ_ok:
                            continue
                        al = set(cc.hinted_args(sp, "aligned"))
                        best = {"spec": sp.config, "hints": "aligned" if set(hinted) == al else ("unaligned" if not hinted else f"partial {len(hinted)}/{len(al)}")}
                        break
                    r["match"] = best
                    if best is None:
                        r["sig"] = {n: t for n, t in sig.items() if t != "constexpr"}; r["consts"] = {n: str(v) for n, v in consts.items()}
                        unmatched.append(r)
                    if ck.n_spills:
                        spills.append(r)
                    rows.append(r)
    return {"compiled": len(rows), "unmatched": unmatched, "spilling": spills, "rows": rows}

@section("autocast_vs_transformers")
def _():
    out = {}
    hf = hf_bert(hidden=384, heads=12, layers=2, inter=1536, max_pos=512, vocab=30522).to(dev).train()
    ids, mask, tt = (t.to(dev) for t in batch(8, 64, 30522))
    w = torch.randn(8, 64, 384, device=dev)
    def step(m, ac, dtype=torch.bfloat16):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=ac):
            o = m(input_ids=ids, attention_mask=mask, token_type_ids=tt)
            loss = (o.last_hidden_state.float() * w * mask[..., None]).sum() / mask.sum()
        loss.backward()
        g = torch.cat([p.grad.reshape(-1).double() for _, p in sorted(m.named_parameters()) if p.grad is not None])
        return o.last_hidden_state[mask.bool()].double().detach(), g
    ref = step(copy.deepcopy(hf).double(), False)
    for dtype in (torch.bfloat16, torch.float16):
        hfa = step(hf, True, dtype)
        ours = step(FastStudent.from_hf(hf).to(dev).train(), True, dtype)
        rel = lambda a, b: float((a - b).norm() / b.norm())
        out[str(dtype)] = {"hidden": [rel(ours[0], ref[0]), rel(hfa[0], ref[0])], "grads": [rel(ours[1], ref[1]), rel(hfa[1], ref[1])]}
    return out

@section("grid_65544")
def _():
    from fastdistil import reference
    B, L, H = 5462, 4, 12
    q = torch.randn(B * L, H, 32, device=dev, dtype=torch.float16)
    cu = torch.arange(0, B * L + 1, L, device=dev, dtype=torch.int32)
    o = ops.varlen_attention(q, q, q, cu, L)
    t = q[-40:].float()
    r = reference.varlen_attention(t, t, t, torch.arange(0, 41, 4, device=dev, dtype=torch.int32), L)
    torch.cuda.synchronize()
    return {"B*H": B * H, "tail_err": float((o[-40:].float() - r).abs().max())}

def time_fn(f, n=50):
    for _ in range(5): f()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize()
    return round(s.elapsed_time(e) / n, 4)

@section("timings_ms")
def _():
    import torch.nn.functional as F
    out = {}
    bf = dict(device=dev, dtype=torch.bfloat16)
    for M in (2304, 16384):
        x, W, b = torch.randn(M, 384, **bf), torch.randn(1536, 384, **bf) * 0.05, torch.randn(1536, **bf)
        out[f"linear_gelu M={M}"] = {"fd": time_fn(lambda: ops.linear_gelu(x, W, b)), "torch": time_fn(lambda: F.gelu(F.linear(x, W, b)))}
        h, W2, r = torch.randn(M, 1536, **bf), torch.randn(384, 1536, **bf) * 0.05, torch.randn(M, 384, **bf)
        g, be = torch.ones(384, **bf), torch.zeros(384, **bf)
        out[f"linear_layer_norm M={M} K=1536"] = {"fd": time_fn(lambda: ops.linear_layer_norm(h, W2, b[:384], r, g, be)),
            "torch": time_fn(lambda: F.layer_norm(F.linear(h, W2, b[:384]) + r, (384,), g, be))}
    x = torch.randn(16384, 384, **bf, requires_grad=True); r = torch.randn(16384, 384, **bf, requires_grad=True)
    g = torch.ones(384, **bf, requires_grad=True); be = torch.zeros(384, **bf, requires_grad=True)
    dy = torch.randn(16384, 384, **bf)
    y1 = ops.layer_norm(x, g, be, residual=r); y2 = F.layer_norm(x + r, (384,), g, be)
    out["layer_norm bwd M=16384"] = {"fd": time_fn(lambda: torch.autograd.grad(y1, [x, r, g, be], dy, retain_graph=True)),
                                     "torch": time_fn(lambda: torch.autograd.grad(y2, [x, r, g, be], dy, retain_graph=True))}
    q = torch.randn(128 * 128, 12, 32, **bf)
    cu = torch.arange(0, 128 * 128 + 1, 128, device=dev, dtype=torch.int32)
    qp = q.view(128, 128, 12, 32).transpose(1, 2)
    out["attention fwd 128x128 H12 D32"] = {"fd": time_fn(lambda: ops.varlen_attention(q, q, q, cu, 128)),
                                            "sdpa": time_fn(lambda: F.scaled_dot_product_attention(qp, qp, qp))}
    return out
save()
print("done")
