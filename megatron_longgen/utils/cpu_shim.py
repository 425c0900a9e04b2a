"""Run Megatron-Core on CPU (gloo): the one place that bends its CUDA assumptions.

Used by the tests and the CPU quickstart only; the GPU path never imports it. It provides:
  * a CPU RNG-states tracker with the API of Megatron's CUDA tracker (attention and
    tensor-parallel init fork it even with dropout 0);
  * a TorchFunctionMode that sends ``device="cuda"``, ``.cuda()`` and ``.to("cuda")`` to the
    CPU and drops ``pin_memory``;
  * CUDA type strings from ``Tensor.type()`` (Megatron's optimizer asserts them);
  * no-op stand-ins for the few ``torch.cuda`` calls Megatron makes unconditionally.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.autograd.backward and not kwargs.get("inputs"):
            return _backward_in_mode(self, *args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda()
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if name == "pin_memory":
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:
            # Megatron's optimizer asserts type strings like 'torch.cuda.FloatTensor'.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _backward_in_mode(mode, tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                      inputs=None, grad_variables=None):
    """``torch.autograd.backward`` with the mode kept on while the graph runs backward.

    A mode is switched off while it handles a call, so a plain ``func(...)`` would run every
    backward op (sequence-parallel reduce-scatter buffers, recomputed forwards) without the
    CUDA-to-CPU rewrite. This is backward's own body minus its override check."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)),
                        is_grads_batched=False)
    with mode:
        _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph,
                             create_graph, (), allow_unreachable=True, accumulate_grad=True)


class CpuRNGStatesTracker:
    """Named CPU RNG states with the API of megatron's CudaRNGStatesTracker."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def install_cpu_shim() -> None:
    """Idempotent. Call before building Megatron modules on a machine without CUDA."""
    global _INSTALLED
    if _INSTALLED:
        return
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.initialize_rng_tracker = lambda *a, **k: None
    # Activation recompute saves/restores the "CUDA" RNG state; on CPU there is none.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    _CudaToCpu().__enter__()  # stays on for the life of the process
    _INSTALLED = True


def cpu_model_parallel_seed(seed: int) -> None:
    """CPU counterpart of megatron's ``model_parallel_cuda_manual_seed``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    install_cpu_shim()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
