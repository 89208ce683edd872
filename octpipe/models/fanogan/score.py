"""f-AnoGAN anomaly scores of patches (FANOGAN-SPEC.md §1.5), the pixel residual and calibration.

For each patch x, with the trained encoder E, generator G and critic features f:

- ``A_R``: mean over pixels of ``(x − G(E(x)))²``;
- ``A_D``: mean over the features of ``(f(x) − f(G(E(x))))²``;
- ``A = A_R + κ·A_D`` (the official ``img_distance``);
- ``z_distance``: mean of ``(E(x) − E(G(E(x))))²``.

These are plain means (no standardisation). Unlike the official script, every patch is scored:
the last partial batch is kept. ``pixel_residual`` returns the paper's ``|x − G(E(x))|`` map,
which the official code never produces.

Inference runs under ``torch.inference_mode`` with every network in eval mode (BatchNorm uses
its moving averages) and channels_last tensors. By default (``fast=True``) the scores are
computed by inference copies of the networks (:func:`~octpipe.models.fanogan.inference.prepare_model`:
BatchNorm folded, resampling convolutions as strided kernels; the same function with about 2/3 of
the multiply-adds), made per call; the trained model is left as it is. ``fast=False`` runs the
trained networks themselves. The critic sees x and G(E(x)) as one batch. The default precision
(``auto``) is bfloat16 autocast with TF32 on CUDA, and bfloat16 autocast on CPUs with native
bfloat16 instructions (AVX-512 BF16 or AMX), else float32. The speed of each path against a naive
fp32 run, natively and on an AVX2-only CPU, is in ``benchmarks/results/fanogan.json``. Scores are
always computed from float32 copies of the network outputs.

Held-out normal scores are summarised by :func:`calibrate` (``RUN/calibration.json``), and
:func:`calibration_percentile` expresses new scores as percentiles of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from octpipe.errors import ConfigError, OctpipeError
from octpipe.models.fanogan.checkpoint import FAnoGANModel
from octpipe.models.fanogan.inference import prepare_model
from octpipe.models.fanogan.losses import anomaly_scores, latent_distances

__all__ = [
    "SCORE_NAMES",
    "CSV_COLUMNS",
    "resolve_device",
    "cpu_has_native_bf16",
    "resolve_precision",
    "precision_context",
    "resolve_batch_size",
    "score_patches",
    "score_and_reconstruct",
    "pixel_residual",
    "calibrate",
    "calibration_percentile",
]

#: Names of the per-patch scores, in CSV order.
SCORE_NAMES = ("A_R", "A_D", "A", "z_distance")
#: Columns of the scores CSV written by :func:`octpipe.models.fanogan.store_scores.score_store`.
CSV_COLUMNS = ("volume_id", "bscan", "row", "col", "label", *SCORE_NAMES)

ArrayOrTensor = npt.NDArray[np.floating] | torch.Tensor


# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``'auto'``/``'cpu'``/``'cuda'`` (or a device) into a ``torch.device``.

    Under ``torchrun`` (``LOCAL_RANK`` set) ``'auto'``/``'cuda'`` pick ``cuda:LOCAL_RANK``.

    Parameters
    ----------
    device : str, torch.device or None, default 'auto'
        ``auto`` (or None) = CUDA when available, else CPU.

    Returns
    -------
    torch.device

    Raises
    ------
    ConfigError
        If CUDA is requested but not available, or the name is unknown.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
        if device == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return torch.device(device)
    raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX) that oneDNN uses.

    Without them bf16 autocast is emulated and slower than float32.
    """
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device, *, training: bool) -> str:
    """Resolve ``'auto'`` precision.

    Training: ``tf32`` on CUDA, ``fp32`` on CPU (bf16 changes the numerics of the adversarial
    game, so it is opt-in there). Inference: ``bf16`` on CUDA and on CPUs with native bfloat16
    (:func:`cpu_has_native_bf16`; measured AUC change 0.0004 at 3.7x the speed), else ``fp32``.

    Parameters
    ----------
    precision : {'auto', 'fp32', 'tf32', 'bf16'}
        Requested precision.
    device : torch.device
        Target device.
    training : bool
        Whether this is for training (``auto`` is more conservative there).

    Returns
    -------
    str
        ``'fp32'``, ``'tf32'`` or ``'bf16'``. ``tf32`` becomes ``fp32`` on CPU.

    Raises
    ------
    ConfigError
        If ``precision`` is unknown.
    """
    if precision not in ("auto", "fp32", "tf32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32, tf32 or bf16, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "tf32" if training else "bf16"
        else:
            precision = "bf16" if not training and cpu_has_native_bf16() else "fp32"
    if precision == "tf32" and device.type != "cuda":
        precision = "fp32"
    return precision


#: Default patches per forward pass: float32 on a CPU at 32 (the activations of a batch stay in
#: cache: on 2 AVX2 cores the bundled width scored about 800 patches/s at 32, 700 at 64 and 570
#: at 128, the paper's width 2.5x the naive run at 32 and 2.3x at 64), otherwise 256 (bfloat16
#: kernels and GPUs gain from larger batches). ``benchmarks/results/fanogan.json``.
CPU_FP32_BATCH, DEFAULT_BATCH = 32, 256


def resolve_batch_size(batch_size: int | None, device: torch.device, precision: str) -> int:
    """Patches per forward pass: ``batch_size`` itself, or the default for the device and precision.

    Parameters
    ----------
    batch_size : int or None
        None for the default: :data:`CPU_FP32_BATCH` for resolved float32 on a CPU, else
        :data:`DEFAULT_BATCH`.
    device : torch.device
        Where the networks run.
    precision : str
        The resolved precision (:func:`resolve_precision`).

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If ``batch_size`` is below 1.

    Examples
    --------
    >>> resolve_batch_size(None, torch.device("cpu"), "fp32"), resolve_batch_size(None, torch.device("cpu"), "bf16")
    (32, 256)
    >>> resolve_batch_size(32, torch.device("cpu"), "fp32")
    32
    """
    if batch_size is None:
        return CPU_FP32_BATCH if device.type == "cpu" and precision == "fp32" else DEFAULT_BATCH
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


@contextmanager
def _cuda_fp32_mode(mode: str) -> Iterator[None]:
    """Set cuBLAS/cuDNN float32 precision to ``'tf32'`` or ``'ieee'`` inside the block."""
    try:
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        old = (matmul.fp32_precision, conv.fp32_precision)
    except AttributeError:  # pragma: no cover - older torch without the fp32_precision API
        yield
        return
    matmul.fp32_precision, conv.fp32_precision = mode, mode
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = old


@contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast / TF32 settings for a block of forward passes.

    Parameters
    ----------
    precision : {'fp32', 'tf32', 'bf16'}
        A resolved precision (see :func:`resolve_precision`).
    device : torch.device
        The device the tensors live on.

    Yields
    ------
    None
    """
    with ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(_cuda_fp32_mode("ieee" if precision == "fp32" else "tf32"))
        if precision == "bf16":
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        yield


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def _as_images(x: ArrayOrTensor, channels: int) -> torch.Tensor:
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x
    if t.ndim == 3 and channels == 1:
        t = t[:, None]
    if t.ndim != 4:
        raise ValueError(f"patches must have shape (N, C, H, W) or (N, H, W), got {tuple(t.shape)}")
    return t


def _rebatch(x: ArrayOrTensor | Iterable[ArrayOrTensor], batch_size: int, channels: int) -> Iterator[torch.Tensor]:
    """Yield batches of exactly ``batch_size`` patches, then the remainder (never dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts: Iterable[ArrayOrTensor] = [x] if isinstance(x, np.ndarray | torch.Tensor) else x
    pending: list[torch.Tensor] = []
    n_pending = 0
    for part in parts:
        t = _as_images(part, channels)
        while len(t):
            take = min(batch_size - n_pending, len(t))
            pending.append(t[:take])
            n_pending += take
            t = t[take:]
            if n_pending == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, n_pending = [], 0
    if n_pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


def _require_encoder(model: FAnoGANModel) -> None:
    if model.encoder is None:
        raise OctpipeError("the model has no trained encoder; run octpipe train --stage encoder first",
                           model.run_dir)


def _setup(model: FAnoGANModel, device: str | torch.device | None, precision: str,
           channels_last: bool | str, fast: bool = True
           ) -> tuple[FAnoGANModel, torch.device, str, torch.memory_format]:
    """The model to run, its device, the resolved precision and the memory format.

    ``fast``: an inference copy (:func:`~octpipe.models.fanogan.inference.prepare_model`) on the
    device; ``model`` is not modified. Otherwise ``model`` itself, moved to the device, in eval
    mode and in the memory format.
    """
    _require_encoder(model)
    dev = resolve_device(device) if device is not None else next(model.generator.parameters()).device
    prec = resolve_precision(precision, dev, training=False)
    if channels_last == "auto":
        channels_last = True  # faster on CPU as well (benchmarks/results/fanogan.json)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if fast:
        return prepare_model(model, device=dev, memory_format=fmt), dev, prec, fmt
    model.to(dev).eval()
    for net in (model.generator, model.discriminator, model.encoder):
        net.to(memory_format=fmt)  # type: ignore[union-attr]
    return model, dev, prec, fmt


def _to_device(batch: torch.Tensor, dev: torch.device, fmt: torch.memory_format) -> torch.Tensor:
    return batch.to(dev, dtype=torch.float32, non_blocking=True).contiguous(memory_format=fmt)


def _score_batch(model: FAnoGANModel, x: torch.Tensor, prec: str, dev: torch.device, latent: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of one batch as a ``(4, N)`` float32 tensor (A_R, A_D, A, z_distance), and G(E(x)).

    ``latent=False`` skips the second encoder pass; z_distance is then NaN.
    """
    g, d, e = model.generator, model.discriminator, model.encoder
    n = x.shape[0]
    with precision_context(prec, dev):
        z = e(x)  # type: ignore[misc]
        x_rec = g(z)
        feats = d.features(torch.cat([x, x_rec.to(x.dtype)]))
        z_rec = e(x_rec.to(x.dtype)) if latent else None  # type: ignore[misc]
    feats = feats.float()
    x_rec = x_rec.float()
    scores = anomaly_scores(x, x_rec, feats[:n], feats[n:], kappa=model.kappa)
    zd = latent_distances(z.float(), z_rec.float()) if z_rec is not None else torch.full_like(scores.total,
                                                                                               float("nan"))
    return torch.stack([scores.residual, scores.feature, scores.total, zd]), x_rec


# --------------------------------------------------------------------------------------------
# Public scoring functions
# --------------------------------------------------------------------------------------------
def score_patches(
    model: FAnoGANModel,
    x: ArrayOrTensor | Iterable[ArrayOrTensor],
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    fast: bool = True,
) -> dict[str, npt.NDArray[np.float32]]:
    """Anomaly scores of patches: A_R, A_D, A = A_R + κ·A_D and z_distance.

    Parameters
    ----------
    model : FAnoGANModel
        A trained model with an encoder (:func:`~octpipe.models.fanogan.checkpoint.load_run`).
        With ``fast`` it is not modified; without, it is moved to ``device``, put in eval mode
        and into the memory format.
    x : array, tensor or iterable of them
        Patches, shape ``(N, C, H, W)`` (or ``(N, H, W)`` for one channel), values in [-1, 1];
        an iterable of such blocks is streamed and re-batched.
    batch_size : int or None
        Patches per forward pass; None (default) = :func:`resolve_batch_size` (32 for float32 on
        a CPU, else 256). The last, partial batch is scored too.
    device : str, torch.device or None
        ``'auto'``, ``'cpu'``, ``'cuda'``; None keeps the model's current device.
    precision : {'auto', 'fp32', 'tf32', 'bf16'}, default 'auto'
        ``auto``: bfloat16 autocast on CUDA and on CPUs with native bfloat16, else float32
        (:func:`resolve_precision`).
    channels_last : bool or 'auto', default 'auto'
        ``auto`` = channels_last (faster on CPU and CUDA); False = NCHW.
    fast : bool, default True
        Score with inference copies of the networks (module docstring): the same scores up to
        float32 rounding (< 1e-5 relative seen), fewer multiply-adds. False runs the trained
        networks themselves.

    Returns
    -------
    dict of str to ndarray
        ``'A_R'``, ``'A_D'``, ``'A'`` and ``'z_distance'``, each float32 of shape ``(N,)``.

    Raises
    ------
    OctpipeError
        If the model has no encoder.
    ValueError
        If the patches have the wrong shape or ``batch_size < 1``.

    Examples
    --------
    >>> from octpipe.models.fanogan.checkpoint import build_networks, FAnoGANModel
    >>> from octpipe.models.fanogan.config import FAnoGANConfig
    >>> cfg = FAnoGANConfig.from_dict({"model": {"image_size": 32, "dim": 8, "latent_dim": 16}})
    >>> g, d, e = build_networks(cfg)
    >>> s = score_patches(FAnoGANModel(g, d, e, cfg), torch.zeros(10, 1, 32, 32), batch_size=4)
    >>> s["A"].shape
    (10,)
    """
    run, dev, prec, fmt = _setup(model, device, precision, channels_last, fast)
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for batch in _rebatch(x, resolve_batch_size(batch_size, dev, prec), model.config.model.channels):
            out.append(_score_batch(run, _to_device(batch, dev, fmt), prec, dev)[0].cpu())
    return _score_dict(out)


def _score_dict(parts: list[torch.Tensor]) -> dict[str, npt.NDArray[np.float32]]:
    table = torch.cat(parts, dim=1).numpy() if parts else np.zeros((4, 0), np.float32)
    return {name: np.ascontiguousarray(table[i], dtype=np.float32) for i, name in enumerate(SCORE_NAMES)}


def score_and_reconstruct(
    model: FAnoGANModel,
    x: ArrayOrTensor | Iterable[ArrayOrTensor],
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    latent: bool = True,
    fast: bool = True,
) -> tuple[dict[str, npt.NDArray[np.float32]], npt.NDArray[np.float32]]:
    """:func:`score_patches` and the reconstructions ``G(E(x))`` from the same forward pass.

    Used for anomaly maps, where each window needs both its scores and its pixel residual.
    ``latent=False`` skips the encoder pass on the reconstruction that only the z distance
    needs (about a fifth of the work); ``z_distance`` is then NaN.
    The other parameters are those of :func:`score_patches`.

    Returns
    -------
    scores : dict of str to ndarray
        As :func:`score_patches`.
    reconstruction : ndarray
        float32, shape ``(N, C, H, W)``.
    """
    run, dev, prec, fmt = _setup(model, device, precision, channels_last, fast)
    out: list[torch.Tensor] = []
    recs: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in _rebatch(x, resolve_batch_size(batch_size, dev, prec), model.config.model.channels):
            table, x_rec = _score_batch(run, _to_device(batch, dev, fmt), prec, dev, latent)
            out.append(table.cpu())
            recs.append(x_rec.contiguous().cpu().numpy())
    size, channels = model.image_size, model.config.model.channels
    return _score_dict(out), (np.concatenate(recs) if recs else np.zeros((0, channels, size, size), np.float32))


def pixel_residual(
    model: FAnoGANModel,
    x: ArrayOrTensor | Iterable[ArrayOrTensor],
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    fast: bool = True,
) -> npt.NDArray[np.float32]:
    """The pixel residual ``|x − G(E(x))|`` of patches (paper Fig. 1; not in the official code).

    Parameters
    ----------
    model, x, batch_size, device, precision, channels_last, fast
        As for :func:`score_patches`.

    Returns
    -------
    ndarray
        float32, shape ``(N, C, H, W)``, values in [0, 2].

    Raises
    ------
    OctpipeError
        If the model has no encoder.
    ValueError
        If the patches have the wrong shape.
    """
    run, dev, prec, fmt = _setup(model, device, precision, channels_last, fast)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in _rebatch(x, resolve_batch_size(batch_size, dev, prec), model.config.model.channels):
            xb = _to_device(batch, dev, fmt)
            with precision_context(prec, dev):
                x_rec = run.generator(run.encoder(xb))  # type: ignore[misc]
            out.append((xb - x_rec.float()).abs().contiguous().cpu().numpy())
    size = model.image_size
    channels = model.config.model.channels
    return np.concatenate(out) if out else np.zeros((0, channels, size, size), np.float32)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
#: Percentiles stored in ``calibration.json`` besides the sorted values.
CALIBRATION_PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9)


def calibrate(scores: dict[str, npt.ArrayLike], *, max_values: int = 20000, source: str = "") -> dict[str, Any]:
    """Summarise held-out normal scores for calibration (``RUN/calibration.json``).

    Parameters
    ----------
    scores : dict of str to array
        Output of :func:`score_patches` on held-out normal patches.
    max_values : int, default 20000
        Keep at most this many sorted values per score (evenly spaced quantiles beyond that).
    source : str
        Where the patches came from (for the record).

    Returns
    -------
    dict
        ``{"n", "source", "scores": {name: {"sorted", "percentiles", "mean", "std"}}}``.

    Raises
    ------
    ValueError
        If there are no scores.
    """
    out: dict[str, Any] = {"n": 0, "source": source, "percentile_levels": list(CALIBRATION_PERCENTILES),
                           "scores": {}}
    for name in SCORE_NAMES:
        values = np.sort(np.asarray(scores[name], dtype=np.float64).ravel())
        if values.size == 0:
            raise ValueError("calibration needs at least one held-out score")
        out["n"] = int(values.size)
        kept = values if values.size <= max_values else np.quantile(values, np.linspace(0, 1, max_values))
        out["scores"][name] = {
            "sorted": [float(v) for v in kept],
            "percentiles": [float(v) for v in np.percentile(values, CALIBRATION_PERCENTILES)],
            "mean": float(values.mean()),
            "std": float(values.std()),
        }
    return out


def calibration_percentile(values: npt.ArrayLike, calibration: dict[str, Any], score: str = "A"
                           ) -> npt.NDArray[np.float64]:
    """Express scores as percentiles (0-100) of the held-out normal scores.

    Parameters
    ----------
    values : array_like
        Scores of kind ``score``.
    calibration : dict
        Output of :func:`calibrate` (``RUN/calibration.json``; ``FAnoGANModel.calibration``).
    score : str, default 'A'
        One of ``A_R``, ``A_D``, ``A``, ``z_distance``.

    Returns
    -------
    ndarray
        Percentage of held-out normal scores less than or equal to each value.

    Examples
    --------
    >>> cal = calibrate({k: np.arange(1.0, 101.0) for k in SCORE_NAMES})
    >>> calibration_percentile([0.5, 50, 1000], cal).tolist()
    [0.0, 50.0, 100.0]
    """
    ref = np.asarray(calibration["scores"][score]["sorted"], dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    return 100.0 * np.searchsorted(ref, v, side="right") / ref.size
