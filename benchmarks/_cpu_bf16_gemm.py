"""A speed workaround for bf16 matrix products on CPUs without AVX-512 (benchmarks only; values and memory unchanged
up to one small copy).

On an x86 CPU without AVX-512 (`torch.backends.cpu.get_cpu_capability() == "AVX2"`), PyTorch does not hand bf16
products to oneDNN and falls back to its own reference GEMM, whose speed depends on the operands' layouts. Measured
with torch 2.13 on a 2-core AMD EPYC (AVX2), `[128, 4096] @ [4096, 4096]` in bf16:

    both operands row-major ("NN")      80 s    0.05 GFLOP/s
    both transposed views ("TT")        17 s    0.26 GFLOP/s
    second operand transposed ("NT")   1.2 s     3.6 GFLOP/s     (a linear layer's forward: x @ W.t())
    first operand transposed ("TN")    1.1 s     4.1 GFLOP/s

A linear layer's forward is NT, but its backward `grad_input = grad_output @ W` is NN (the weight is row-major), and so
is the fused pass's `grad_hidden += grad_logits @ W[tile]` (`token_stats.fused._addmm_fp32_`): a 2-layer Llama-3-8B
step at 128 tokens would take hours. [`patch`] makes those products TN by copying their *first* operand (a gradient
of activations, `[tokens, out]`, or a `[chunk, vocab tile]` gradient tile) into a column-major layout first. It does
not touch the weights (no copy of a weight is made), so the memory of a step grows only by that transient copy of
one activation gradient. TRL's own CPU kernel (`trl.kernels.chunked_logprob._addmm_fp32`) upcasts its operands to
float32 instead and is left as it is: it is what `DPOTrainer` does on CPU.
"""

import torch
import torch.nn.functional as F


def _column_major(tensor: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column-major (a transposed view of a contiguous transpose)."""
    return tensor.t().contiguous().t()


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D `a`, `b`, with `a` column-major (PyTorch's fast bf16 layout on AVX2)."""
    return _column_major(a) @ b


class _LinearTN(torch.autograd.Function):
    """`F.linear` whose backward computes `grad_output @ weight` as a TN product. Saves what aten's linear saves:
    the input only when the weight needs a gradient, the weight only when the input does."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        ctx.has_bias = bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, grad_output.size(-1))
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = mm_tn(grad_2d, weight).view(*grad_output.shape[:-1], weight.size(1))
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.t() @ input.reshape(-1, input.size(-1))  # already TN
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_input, grad_weight, grad_bias


_ORIGINAL_LINEAR = F.linear


def _linear(input, weight, bias=None):
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        input, weight = input.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if input.device.type != "cpu" or input.dtype != torch.bfloat16 or not torch.is_grad_enabled():
        return _ORIGINAL_LINEAR(input, weight, bias)
    with torch.autocast("cpu", enabled=False):
        return _LinearTN.apply(input, weight, bias)


def _addmm_fp32_tn(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`token_stats.fused._addmm_fp32_` with its CPU bf16 product taken as TN."""
    if a.dtype == accumulator.dtype or accumulator.device.type != "cpu":
        return _ORIGINAL_ADDMM(accumulator, a, b)
    accumulator.add_(mm_tn(a, b))


_ORIGINAL_ADDMM = None


def patch() -> None:
    """Route bf16 CPU linear layers (`torch.nn.functional.linear`, which `nn.Linear` calls) and the fused pass's
    gradient product through TN products. For this process only (`unpatch` undoes it); call before the first step."""
    global _ORIGINAL_ADDMM
    from trl_tokenpref.token_stats import fused

    if _ORIGINAL_ADDMM is None:
        _ORIGINAL_ADDMM = fused._addmm_fp32_
    fused._addmm_fp32_ = _addmm_fp32_tn
    torch.nn.functional.linear = _linear


def unpatch() -> None:
    """Undo [`patch`]."""
    global _ORIGINAL_ADDMM
    from trl_tokenpref.token_stats import fused

    if _ORIGINAL_ADDMM is not None:
        fused._addmm_fp32_ = _ORIGINAL_ADDMM
        _ORIGINAL_ADDMM = None
    torch.nn.functional.linear = _ORIGINAL_LINEAR
