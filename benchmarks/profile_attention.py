"""One forward+backward of our Triton kernel between cudaProfilerStart/Stop, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        --csv --page details python benchmarks/profile_attention.py sink|block

L = 32K, 32 query / 8 KV heads, d = 128, bf16, the kernel's default tiles for the pattern.
"""
import torch, sys
sys.path.insert(0, ".")
from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern
from megatron_longgen.attention.triton_kernels import sparse_attention
L, H, KV, D = 32768, 32, 8, 128
pat = AttnSinkPattern(64, 4096) if (sys.argv[1:] or ["sink"])[0] == "sink" else BlockSparsePattern(64, 16, 8, False, 32, 8)
q = torch.randn(1, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, KV, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, KV, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
heads = torch.arange(H)
for _ in range(3):
    o = sparse_attention(q, k, v, pat, heads, D ** -0.5)
    o.backward(torch.ones_like(o))
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
o = sparse_attention(q, k, v, pat, heads, D ** -0.5)
o.backward(torch.ones_like(o))
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("done")
