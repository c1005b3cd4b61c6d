"""One training step (BertForSequenceClassification-shaped: encoder + pooler + linear head, cross-entropy, AdamW)
on workload A's batch: fastdistil on each available backend beside transformers eager and sdpa. Loss and every
gradient are checked against transformers eager (dropout off) before timing; extra_info records the activation
bytes autograd saves (and peak CUDA memory on a GPU)."""
import pytest
import torch

from fastdistil.bench import engines as E
from fastdistil.bench.workloads import get_workload


@pytest.fixture(scope="module")
def train_ctx(bench_device, bench_threads):
    ctx = E.make_context(get_workload("train"), bench_device, bench_threads, "minilm")
    ref = E.make_engine("transformers-eager", "train")
    ref.setup(ctx)
    ctx.scratch["reference"] = ref.check()
    ref.teardown()
    return ctx


@pytest.mark.parametrize("engine", E.engine_names("train"))
def test_train_step(benchmark, train_ctx, bench_device, bench_threads, bench_rounds, engine):
    ctx = train_ctx
    eng = E.make_engine(engine, "train")
    try:
        eng.setup(ctx)
    except E.Skip as e:
        pytest.skip(str(e))
    agree = E.agreement(eng.check(), ctx.scratch["reference"])
    assert agree["max_abs_diff"] <= 1e-3, f"{engine}: loss/gradients disagree with transformers: {agree}"
    benchmark.group = "train step (workload A batch)"
    benchmark.extra_info.update(real_tokens=ctx.real_tokens, threads=bench_threads, **agree, **eng.extra)
    if bench_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        eng()
        ctx.sync()

    benchmark.pedantic(step, rounds=bench_rounds, iterations=1, warmup_rounds=1)
    if bench_device.type == "cuda":
        benchmark.extra_info["peak_cuda_MB"] = torch.cuda.max_memory_allocated() / 2**20
    if benchmark.stats is not None:  # None under --benchmark-disable (a smoke run: the calls and checks only)
        benchmark.extra_info["real_tokens_per_s"] = ctx.real_tokens / benchmark.stats.stats.median
    eng.teardown()
