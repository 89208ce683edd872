"""The f-AnoGAN training runtime: device, precision, threads, determinism, processes, compile.

:func:`training_runtime` resolves ``config.runtime`` into a :class:`Runtime` for one training
stage: the device (under ``torchrun``, CUDA device ``LOCAL_RANK``), the autocast precision
(:func:`octpipe.models.fanogan.score.resolve_precision`), channels-last memory format,
``torch.compile`` and the process group (:class:`Dist`: gloo on CPU, NCCL on CUDA). The
module helpers place a network on the run's device (:func:`place`), wrap it in
``DistributedDataParallel`` (:func:`ddp`) or compile it (:func:`maybe_compile`).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from octpipe.models.fanogan.config import FAnoGANConfig
from octpipe.models.fanogan.score import precision_context, resolve_device, resolve_precision

__all__ = ["Dist", "Runtime", "training_runtime", "distributed", "barrier", "all_mean", "place", "ddp",
           "maybe_compile", "to_device"]


@dataclass(frozen=True)
class Dist:
    """Where a process stands in the process group: ``rank``, ``world`` size and ``local_rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True for rank 0, the process that writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True with more than one process."""
        return self.world > 1


def distributed(device_name: str) -> Dist:
    """Join the default process group, creating it under ``torchrun`` (``WORLD_SIZE`` > 1).

    A group created here lives until the process exits (it is destroyed by an ``atexit`` hook):
    re-creating the default group after destroying it can hang with ``env://`` rendezvous, and
    ``stage='all'`` trains two stages in one process.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(_destroy_group)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Runtime:
    """How one training stage runs: device, autocast precision, memory format, compile, processes."""

    device: torch.device
    precision: str
    memory_format: torch.memory_format
    compile: bool
    dist: Dist

    @property
    def channels_last(self) -> bool:
        """True when networks and batches use the channels-last memory format."""
        return self.memory_format == torch.channels_last

    def amp(self) -> Any:
        """The autocast context of the run's precision."""
        return precision_context(self.precision, self.device)

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in checkpoints and ``run.json``."""
        return {"device": str(self.device), "precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile, "world_size": self.dist.world}


@contextmanager
def training_runtime(config: FAnoGANConfig) -> Iterator[Runtime]:
    """The :class:`Runtime` of ``config.runtime`` for the duration of a ``with`` block.

    Joins the process group under ``torchrun``, picks the device, and sets the torch thread
    count and deterministic algorithms when asked, restoring both on exit.
    """
    rt = config.runtime
    with ExitStack() as stack:
        d = distributed(rt.device)
        device = resolve_device(rt.device)
        if device.type == "cuda":
            if d.active:
                device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
        if rt.threads:
            old_threads = torch.get_num_threads()
            torch.set_num_threads(rt.threads)
            stack.callback(torch.set_num_threads, old_threads)
        if rt.deterministic:
            old_det = torch.are_deterministic_algorithms_enabled()
            old_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
            stack.callback(torch.use_deterministic_algorithms, old_det)
            stack.callback(setattr, torch.backends.cudnn, "deterministic", old_cudnn[0])
            stack.callback(setattr, torch.backends.cudnn, "benchmark", old_cudnn[1])
        channels_last = rt.channels_last if rt.channels_last != "auto" else True  # faster on CPU and CUDA
        yield Runtime(device=device, precision=resolve_precision(rt.precision, device, training=True),
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format,
                       compile=rt.compile, dist=d)


def barrier(d: Dist) -> None:
    """Wait for every process (no-op with one)."""
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def all_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of ``t`` over the processes (``t`` itself with one)."""
    if not d.active:
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t / d.world


def place(module: nn.Module, rt: Runtime) -> nn.Module:
    """Move ``module`` to the device and memory format of the run.

    With channels_last, weights that have a size-1 channel or kernel dimension (the 1-channel
    input convolutions, the 1x1 shortcuts) are laid out the same either way, but their formal
    strides differ; they are kept in the canonical contiguous strides that autograd gives their
    gradients (also through the gradient penalty's double backward), so that DDP's gradient
    buckets match them (otherwise it warns "Grad strides do not match bucket view strides").
    """
    module.to(rt.device, memory_format=rt.memory_format)
    if rt.channels_last:
        for p in module.parameters():
            if p.ndim == 4 and 1 in p.shape[1:]:
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    return module


def ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` with several processes, else itself."""
    if not rt.dist.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def maybe_compile(module: Any, rt: Runtime) -> Any:
    """``torch.compile(module)`` when the run compiles, else ``module``."""
    return torch.compile(module) if rt.compile else module


def to_device(x: np.ndarray, rt: Runtime) -> torch.Tensor:
    """A batch of patches as a tensor on the run's device, in its memory format."""
    return torch.from_numpy(x).to(rt.device).contiguous(memory_format=rt.memory_format)
