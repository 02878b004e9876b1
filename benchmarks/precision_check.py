#!/usr/bin/env python
"""Precision of the whitening factor on real hazelnut embeddings, at every 8th grid position, against a float64
Cholesky reference: float32 vs float64 finalisation, float32 vs float16 (and per-row scaled fp16/int16) storage.

Usage: PYTHONPATH=$PWD .venv-bench/bin/python benchmarks/precision_check.py lite0|wr50|r18
"""
import sys, torch, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import bench_padim as B
from padim_hf import PadimConfig, PadimModel, PadimImageProcessor
from padim_hf.gaussian import LowerBlockRows, PatchStatistics, whitening_factors, mahalanobis_distances, pack_lower, unpack_lower
torch.manual_seed(0)
cfg = sys.argv[1]
kw, _ = B.CONFIGS[cfg]
m = PadimModel(PadimConfig(**kw, image_size=224)).eval()
if cfg == "lite0":
    from padim_hf.weights import export_lite0_weights
    m.load_backbone_weights(export_lite0_weights("/tmp/padim_bench_lite0.safetensors"))
proc = PadimImageProcessor.from_padim_config(m.config)
train, test, masks, labels = B.load_hazelnut(proc, 224)
with torch.inference_mode():
    st = m.collect_statistics([train[i:i+10] for i in range(0, 50, 10)], allow_random_backbone=True)
    sel = torch.arange(0, st.shift.shape[0], 8)
    sub = PatchStatistics(count=st.count, shift=st.shift[sel].clone(), shifted_sum=st.shifted_sum[sel].clone(), shifted_outer=st.shifted_outer.map(lambda block: block[sel].clone()))
    del st
    q = m.embed(test).flatten(2).permute(2, 0, 1)[sel].contiguous()
    mean = sub.mean()
    cov = sub.covariance() + 0.01 * torch.eye(sub.shift.shape[1], dtype=torch.float64)
    ev = torch.linalg.eigvalsh(cov[:8])
    print("eig range", ev.min().item(), ev.max().item(), "cond", (ev.max(-1).values/ev.min(-1).values).max().item())
    L = torch.linalg.cholesky(cov); Wref = torch.linalg.solve_triangular(L, torch.eye(cov.shape[-1], dtype=torch.float64).expand_as(L), upper=False)
    dref = ((q.double() - mean.unsqueeze(1)) @ Wref.transpose(1, 2)).norm(dim=-1)
    C = sub.shift.shape[1]
    def err(W, name):
        d = mahalanobis_distances(q.float(), mean.float(), W).double()
        rel = (d - dref).abs() / dref
        print(f"{name:28s} max rel {rel.max().item():.2e}  median rel {rel.median().item():.2e}  max-over-positions rel {( (d.amax(0)-dref.amax(0)).abs()/dref.amax(0)).max().item():.2e}")
    W64 = whitening_factors(sub, 0.01, dtype=torch.float64)
    W32 = whitening_factors(sub, 0.01, dtype=torch.float32)
    err(W64, "fp64 finalise, fp32 W")
    err(W32, "fp32 finalise, fp32 W")
    err(unpack_lower(pack_lower(W64, torch.float16), C), "fp64 finalise, fp16 W")
    err(unpack_lower(pack_lower(W32, torch.float16), C), "fp32 finalise, fp16 W")
    print("W abs max", W64.dense().abs().max().item(), "fraction |W|<6.1e-5 (fp16 subnormal):", (W64.dense().abs() < 6.1e-5).float().mean().item())
    # per-row scaled fp16
    rows, cols = torch.tril_indices(C, C)
    for name, Wsrc in (("fp64", W64), ("fp32", W32)):
        full = Wsrc.dense()
        scale = full.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        Wq = ((full / scale).half().float() * scale)
        err(LowerBlockRows.from_dense(Wq), f"{name} finalise, fp16 per-row scale")
        q16 = torch.round(full / scale * 32767).clamp(-32767, 32767) / 32767 * scale
        err(LowerBlockRows.from_dense(q16), f"{name} finalise, int16 per-row")
