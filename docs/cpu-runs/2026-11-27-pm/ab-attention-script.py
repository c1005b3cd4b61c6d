import torch, time
import fastdistil
from fastdistil import ops
from fastdistil.bench.workloads import get_workload
torch.set_num_threads(2)
wl = get_workload("A"); lens = torch.tensor(wl.lengths())
T=int(lens.sum()); cu=torch.zeros(len(lens)+1,dtype=torch.int32); cu[1:]=lens.cumsum(0)
def t(f,n=20):
    f(); ts=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[n//2]*1e3
q,k,v=(torch.randn(T,12,32) for _ in range(3))
qkv=torch.randn(T,3,12,32); q,k,v=qkv.unbind(1)
x=torch.randn(T,384); r=torch.randn(T,384); w=torch.randn(384); b=torch.randn(384)
h=torch.randn(T,1536)
with torch.inference_mode():
  print("attention %.2f ms"%t(lambda: ops.varlen_attention(q,k,v,cu,int(lens.max()))))
  print("layer_norm+res %.2f ms"%t(lambda: ops.layer_norm(x,w,b,1e-12,r)))
  W=torch.randn(1536,384); bi=torch.randn(1536)
  print("linear_gelu(onednn via ops) %.2f ms"%t(lambda: ops.linear_gelu(x,W,bi)))
  print("linear only F %.2f ms"%t(lambda: torch.nn.functional.linear(x,W,bi)))
  print("gelu alone %.2f ms"%t(lambda: torch.nn.functional.gelu(h)))
