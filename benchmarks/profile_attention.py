"""One forward+backward of our Triton kernel between cudaProfilerStart/Stop, for Nsight Compute.

    ncu --profile-from-start off --kernel-name regex:"_fwd_kernel|_bwd_dkdv_kernel|_bwd_dq_kernel" \\
        --metrics launch__registers_per_thread,l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,... \\
        python benchmarks/profile_attention.py sink|block
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
