"""Optimisers with TensorFlow-1 semantics, for faithful f-AnoGAN encoder training.

The official encoder is trained with ``tf.train.RMSPropOptimizer(5e-5)`` (FANOGAN-SPEC.md §1.4),
whose update differs from ``torch.optim.RMSprop`` in three ways: decay 0.9 (PyTorch alpha 0.99),
epsilon 1e-10 added *inside* the square root (PyTorch: 1e-8 outside), and the mean-square
accumulator starts at **1** (PyTorch: 0), so TF's first steps are about ``lr·|g|`` rather than
``lr/sqrt(1 - alpha) ≈ 10·lr``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["RMSpropTF"]


class RMSpropTF(Optimizer):
    """RMSProp as in TensorFlow 1 (``tf.train.RMSPropOptimizer``, non-centred).

    For each parameter ``p`` with gradient ``g``::

        ms  = alpha·ms + (1 − alpha)·g²         # ms starts at 1
        mom = momentum·mom + lr·g / sqrt(ms + eps)   # mom starts at 0
        p   = p − mom

    With ``momentum = 0`` this is ``p −= lr·g / sqrt(ms + eps)``. This matches
    ``timm.optim.RMSpropTF`` with ``lr_in_momentum=True`` and no weight decay.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups, as for any ``torch.optim.Optimizer``.
    lr : float, default 5e-5
        Learning rate (the official encoder value).
    alpha : float, default 0.9
        Decay of the mean-square accumulator (TF ``decay``).
    eps : float, default 1e-10
        Added inside the square root (TF ``epsilon``).
    momentum : float, default 0.0
        TF ``momentum``; the learning rate is applied inside the momentum buffer, as in TF.

    Raises
    ------
    ValueError
        If ``lr``, ``eps`` or ``momentum`` is negative, or ``alpha`` is outside [0, 1).

    Notes
    -----
    The state (``square_avg``, ``momentum_buffer`` when momentum > 0, and ``step``) is stored per
    parameter, so ``state_dict()``/``load_state_dict()`` round-trip like any PyTorch optimiser.
    Sparse gradients are not supported.

    Examples
    --------
    >>> p = torch.nn.Parameter(torch.tensor([1.0]))
    >>> opt = RMSpropTF([p], lr=0.1)
    >>> p.grad = torch.tensor([2.0])
    >>> _ = opt.step()
    >>> round(p.item(), 6)                     # ms = 0.9 + 0.1·4 = 1.3; 1 − 0.1·2/sqrt(1.3)
    0.824588
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 5e-5,
        alpha: float = 0.9,
        eps: float = 1e-10,
        momentum: float = 0.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not momentum >= 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss.

        Returns
        -------
        float or None
            The closure's loss, if a closure was given.

        Raises
        ------
        RuntimeError
            If a gradient is sparse.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, alpha, eps, momentum = group["lr"], group["alpha"], group["eps"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    # TF1 initialises the "rms" slot to ones, not zeros.
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    if momentum > 0:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                square_avg = state["square_avg"]
                # ms += (1 - alpha) * (g² - ms), the TF ApplyRMSProp form of alpha·ms + (1 - alpha)·g².
                square_avg.add_(grad * grad - square_avg, alpha=1.0 - alpha)
                denom = (square_avg + eps).sqrt_()
                if momentum > 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:  # momentum switched on after the first step
                        buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    buf.mul_(momentum).addcdiv_(grad, denom, value=lr)
                    p.sub_(buf)
                else:
                    p.addcdiv_(grad, denom, value=-lr)
        return loss
