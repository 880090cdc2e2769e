"""The LM head fused with the next-token cross-entropy, so the (N, V) logits never exist at once.

A 32,000-word vocabulary over 16,384 tokens is 2 GB of fp32 logits, and autograd keeps them
(and their gradient) alive between forward and backward. Here the tokens go through the head
in chunks of rows: each chunk's logits give its loss AND, right away, its gradients
(softmax - onehot) w.r.t. the hidden states and the weight; then the chunk's logits are
freed. Backward only scales the stored gradients by grad_output. Peak extra memory is one
chunk's logits plus the (N, H) and (V, H) gradients that backward returns anyway.

`linear_cross_entropy_reference` is the twin: plain `F.linear` + `F.cross_entropy`.

Glossary: N tokens (rows), H hidden, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops.dispatch import current_impl, fast_path_enabled, triton_available

REDUCTIONS = ("mean", "sum")
# Default chunk, in logits: on a GPU large enough that each chunk's matrix products keep it
# busy (2**27: 4,194 rows of a 32,000-word vocabulary, 256 MB in bf16); on a CPU small enough
# that a chunk stays in cache (2**22: 512 rows of 8,192 words, 16 MB in fp32). Measured with
# bench/lm_loss.py (bench/results/lm_loss_h100.json): on the H100, 16,384 x 768 -> 32,000
# under bf16 autocast, forward + backward took 5.1 ms at 4,096 rows (6.6 at 1,024, 5.0 at
# 8,192; plain linear + cross_entropy 12.2, Liger-Kernel's fused loss 11.2); on 16 CPU
# cores at the demo's sizes, 27 ms at 512 rows, 34 at 1,024, 51 for the plain twin.
CHUNK_LOGITS_CUDA = 2**27
CHUNK_LOGITS_CPU = 2**22


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) without the (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,) long (ignore_index = no target). Returns a
    scalar: the mean over the targets (reduction "mean"; NaN when there are none, as
    F.cross_entropy) or their sum ("sum"). Logits are computed in the autocast dtype when
    autocast is on (else in the inputs' dtype) and their log-sum-exp in fp32, as
    `F.cross_entropy(F.linear(hidden, weight).float(), targets)` does. chunk_size: rows per
    chunk (None: about 2**27 logits a chunk on a GPU, 2**22 on a CPU). On a GPU with Triton
    each chunk's loss and logits gradient take one kernel (`cross_entropy_kernel`).
    `ops.use_impl("reference")` takes the twin, and so does a graph being compiled: the
    hand-written autograd Function (fp32 out= products on a GPU) does not trace, while the
    compiler fuses the plain head and loss itself."""
    _check(hidden, weight, targets, reduction, chunk_size)
    if current_impl() == "reference" or torch.compiler.is_compiling():
        return linear_cross_entropy_reference(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction
        )
    logits_per_chunk = CHUNK_LOGITS_CUDA if hidden.is_cuda else CHUNK_LOGITS_CPU
    rows = chunk_size or max(1, logits_per_chunk // weight.shape[0])
    compute_dtype = _compute_dtype(hidden, weight)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        with torch.autocast(hidden.device.type, enabled=False):
            total, count = _chunked_loss(hidden, weight, targets, ignore_index, rows,
                                         compute_dtype)
        return total if reduction == "sum" else total / count
    use_kernel = fast_path_enabled(hidden) and triton_available()
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, targets, ignore_index, reduction, rows, compute_dtype, use_kernel
    )


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The twin: full (N, V) logits, upcast to fp32, then F.cross_entropy."""
    logits = F.linear(hidden, weight).float()  # (N, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
           chunk_size: int | None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; allowed: {REDUCTIONS}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of rows (or None)")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.is_floating_point():
        raise ValueError(f"targets must be an integer tensor of shape ({hidden.shape[0]},); got "
                         f"{targets.dtype} of shape {tuple(targets.shape)}")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's where it is on, else the
    promotion of the two inputs."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h_chunk: torch.Tensor, weight_c: torch.Tensor, t_chunk: torch.Tensor,
                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: h_chunk (C, H), weight_c (V, H) in the compute dtype -> (the chunk's fp32
    logits (C, V), their log-sum-exp (C,), the summed loss of its targets ())."""
    logits = (h_chunk @ weight_c.T).float()  # (C, V): rounded to the compute dtype first
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    valid = t_chunk != ignore_index  # (C,)
    safe = torch.where(valid, t_chunk, 0)  # an index for ignored rows too; masked below
    picked = logits.gather(1, safe[:, None]).squeeze(1)  # (C,)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    return logits, lse, loss


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int, rows: int, compute_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only (no gradient wanted): (summed loss (), target count ())."""
    h_c, w_c = hidden.to(compute_dtype), weight.to(compute_dtype)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        t_chunk = targets[start:start + rows]
        total = total + _chunk_logits(h_c[start:start + rows], w_c, t_chunk, ignore_index)[2]
    return total, (targets != ignore_index).sum()


def _chunk_step(h_chunk: torch.Tensor, weight_c: torch.Tensor, t_chunk: torch.Tensor,
                ignore_index: int, grad_h: torch.Tensor | None, grad_w: torch.Tensor | None,
                start: int, use_kernel: bool) -> torch.Tensor:
    """One chunk of the fused pass: its summed loss (); writes its rows of grad_h (N, H) and
    adds its share to grad_w (V, H), both unscaled. Its (C, V) logits die on return."""
    if use_kernel:  # one Triton pass, in place over the logits in the compute dtype
        from hybridlm.ops.cross_entropy_kernel import cross_entropy_grad_

        grad = h_chunk @ weight_c.T  # (C, V)
        loss = cross_entropy_grad_(grad, t_chunk, ignore_index).sum()
    else:
        logits, lse, loss = _chunk_logits(h_chunk, weight_c, t_chunk, ignore_index)
        # d(loss)/d(logits) = softmax - onehot on rows with a target, 0 on ignored rows;
        # built in place over the fp32 logits.
        grad = logits.sub_(lse[:, None]).exp_()  # (C, V) softmax
        valid = t_chunk != ignore_index  # (C,)
        grad.scatter_add_(1, torch.where(valid, t_chunk, 0)[:, None],
                          torch.full_like(lse, -1.0)[:, None])
        grad = grad.mul_(valid[:, None]).to(weight_c.dtype)  # (C, V) in the compute dtype
    if grad_h is not None:
        torch.mm(grad, weight_c, out=grad_h[start:start + h_chunk.shape[0]])  # (C, H)
    if grad_w is not None:
        _add_product_(grad_w, grad.T, h_chunk)  # (V, H)
    return loss


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. A CUDA product of half-precision inputs writes fp32 straight into
    acc; elsewhere the product is rounded to the inputs' dtype first (CPU torch has no
    mixed-dtype product)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked pass (forward); backward scales them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, reduction: str, rows: int, compute_dtype: torch.dtype,
                use_kernel: bool) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h_c, w_c = hidden.to(compute_dtype), weight.to(compute_dtype)  # (N, H), (V, H)
            grad_h = torch.empty_like(h_c) if ctx.needs_input_grad[0] else None  # (N, H)
            # dW sums over every chunk: kept in fp32 so many small updates do not round away.
            grad_w = (torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
                      if ctx.needs_input_grad[1] else None)  # (V, H)
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            for start in range(0, hidden.shape[0], rows):
                stop = min(start + rows, hidden.shape[0])
                total = total + _chunk_step(h_c[start:stop], w_c, targets[start:stop],
                                            ignore_index, grad_h, grad_w, start, use_kernel)
            count = (targets != ignore_index).sum()
            # mean divides the sum, and so every gradient, by the number of targets
            scale = torch.ones((), device=hidden.device) if reduction == "sum" else 1.0 / count
        ctx.save_for_backward(grad_h, grad_w, scale)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_h, grad_w, scale = ctx.saved_tensors
        factor = grad_output * scale  # ()
        hidden_dtype, weight_dtype = ctx.input_dtypes
        d_hidden = (grad_h * factor).to(hidden_dtype) if grad_h is not None else None
        d_weight = (grad_w * factor).to(weight_dtype) if grad_w is not None else None
        return d_hidden, d_weight, None, None, None, None, None, None
