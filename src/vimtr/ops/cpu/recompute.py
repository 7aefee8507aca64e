"""The backward of a fused kernel as autograd through its reference, recomputed from the saved inputs."""
from __future__ import annotations

import torch


def grads_via_reference(reference, saved, needs_input_grad, grad_outputs) -> tuple:
    """Gradients of ``reference(*saved)`` (a tuple of outputs) for the inputs ``needs_input_grad`` marks,
    None for the others. Outputs without an upstream gradient, or that depend on none of the wanted inputs
    (a frozen layer's residual stream when only the norm weight trains), are left out of the sum."""
    inputs = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(saved, needs_input_grad)]
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(())
    if wanted:
        with torch.enable_grad():
            pairs = [(o, g) for o, g in zip(reference(*inputs), grad_outputs) if g is not None and o.requires_grad]
            if pairs:
                outs, grads = zip(*pairs)
                got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
    return tuple(next(got, None) if t is not None and t.requires_grad else None for t in inputs)
