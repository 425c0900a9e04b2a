"""The chunked loss's CUDA path (its two Triton kernels) against the float64 loss on a GPU:
an odd token count, the real vocabulary, bf16 and fp16, loss and both gradients."""

import pytest
import torch

from megatron_longgen.models.linear_cross_entropy import _LinearCrossEntropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def loss_and_grads(hidden, weight, target, grad_loss, op):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = op(hidden, weight, target)
    return (loss.detach(), *torch.autograd.grad((loss.double() * grad_loss).sum(), (hidden, weight)))


def exact_loss(hidden, weight, target):
    logits = hidden @ weight.t()
    return torch.logsumexp(logits, -1) - logits.gather(1, target[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_loss_and_gradients_against_float64(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 1061, 256, 32000
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(v, h, device="cuda", generator=g) / h ** 0.5).to(dtype)
    target = torch.randint(0, v, (n,), device="cuda", generator=g)
    grad_loss = torch.rand(n, device="cuda", generator=g, dtype=torch.float64)
    exact = loss_and_grads(hidden.double(), weight.double(), target, grad_loss, exact_loss)
    got = loss_and_grads(hidden, weight, target, grad_loss,
                         lambda x, w, t: _LinearCrossEntropy.apply(x, w, t, None, 100))
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), got, exact):
        error = float((a.double() - e).abs().max() / e.abs().max())
        assert error < 1e-2, (name, error)  # a few roundings of the input dtype
