"""Quality measures shared by calibration, training and the benchmarks: one PSNR, one VMAF.

``psnr`` is the one definition (numpy planes of any bit depth; the error is
floored at ``MSE_FLOOR``, so identical 8-bit planes read 148 dB, not
infinity); ``psnr_batch`` is the same on a torch batch; ``Vmaf`` scores luma
sequences with vmaf-torch (v0.6.1) where the ``bench`` extra is installed, and
says why not where it is not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MSE_FLOOR", "Vmaf", "psnr", "psnr_batch"]

# Mean squared error (in sample units) below this reads as this, so that an identical frame
# does not make a mean infinite.
MSE_FLOOR = 1e-10


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two planes (or stacks of planes) of the same shape."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * math.log10(peak * peak / max(mse, MSE_FLOOR))


def psnr_batch(a: Any, b: Any, peak: float = 255.0) -> Any:
    """``psnr`` of each image of two torch batches (B, ...) -> (B,)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * ((peak * peak) / mse.clamp_min(MSE_FLOOR)).log10()


class Vmaf:
    """VMAF v0.6.1 of a luma sequence against the clean one (vmaf-torch, the bench extra).

    ``Vmaf()`` is falsy without vmaf-torch; ``reason`` then says why.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.model: Any = None
        self.reason = "turned off"
        if not enabled:
            return
        try:
            import vmaf_torch  # type: ignore[import-not-found]

            self.model = vmaf_torch.VMAF().eval()
        except Exception as exc:  # noqa: BLE001 - any failure means no VMAF column
            self.reason = f"vmaf-torch unavailable ({type(exc).__name__}: {exc})"

    def __bool__(self) -> bool:
        return self.model is not None

    def __call__(self, clean: list[np.ndarray], dist: list[np.ndarray]) -> float | None:
        if self.model is None:
            return None
        import torch

        ref = torch.from_numpy(np.stack(clean).astype(np.float32))[:, None]
        out = torch.from_numpy(np.stack(dist).astype(np.float32))[:, None]
        with torch.no_grad():
            return float(self.model(ref, out).mean())
