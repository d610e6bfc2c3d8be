"""What every stage shares: the preprocessed ``Case`` the members receive and the device choice.

Kept apart from ``members`` and ``api`` so that preprocessing, training and the members can use them without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepisles.errors import DeepIslesError
from deepisles.io.image import Image

MODALITY_NAMES = ("dwi", "adc", "flair")


@dataclass
class Case:
    """One preprocessed case, everything on the native DWI grid.

    ``adc`` is in the canonical unit (10^-3 mm^2/s); ``flair`` is registered to the DWI (or None);
    ``brain`` is the boolean brain mask. A Case holds images only; it never refers to files.
    """

    dwi: Image
    adc: Image
    brain: np.ndarray
    flair: Image | None = None

    def modality(self, name: str) -> Image | None:
        return {"dwi": self.dwi, "adc": self.adc, "flair": self.flair}[name]


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' are checked."""
    device = (device or "auto").strip().lower()
    if device == "cpu":
        return "cpu"
    if device == "auto" or device.startswith("cuda"):
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:  # pragma: no cover - torch is a dependency
            has_cuda = False
        if device == "auto":
            return "cuda" if has_cuda else "cpu"
        if not has_cuda:
            raise DeepIslesError(f"--device {device}: no CUDA GPU is available (use --device cpu or auto)")
        return device
    raise DeepIslesError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
