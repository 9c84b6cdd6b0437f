"""Tiny hand-written models for exercising the model plug-ins without trained weights.

They are not for scoring real slides: each is a fixed rule written as a
torch module, so that the loading, batching, device placement and output
handling of ``nuclei.model`` and ``segmentation.model`` can be tested (and
timed on CPU or CUDA by ``bench/models.py``) with files made on the spot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch


class HaematoxylinNuclei(torch.nn.Module):
    """Nucleus logits from an ``hdab`` input: positive where haematoxylin OD exceeds 0.15."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] - 0.15) * 40.0


class DarknessCompartments(torch.nn.Module):
    """Logits of tumour / stroma / fat-background / other from an ``rgb`` input:
    tumour where the mean darkness exceeds 0.25, background below 0.08."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = 1.0 - x.mean(1, keepdim=True)
        tumour = (dark - 0.25) * 50
        background = (0.08 - dark) * 50
        stroma = torch.zeros_like(dark)
        other = torch.full_like(dark, -100.0)
        return torch.cat([tumour, stroma, background, other], 1)


def save_torchscript(module: torch.nn.Module, path: Path) -> Path:
    """``module`` scripted and saved at ``path``."""
    torch.jit.script(module).save(str(path))
    return path


def save_exported(module: torch.nn.Module, path: Path, free: Literal["none", "batch", "all"] = "all") -> Path:
    """``module`` as a ``torch.export`` program at ``path`` (``.pt2``), traced on a
    ``(2, 3, 64, 64)`` input with the batch, or batch, height and width, left free."""
    n, h, w = torch.export.Dim("n"), torch.export.Dim("h"), torch.export.Dim("w")
    shapes = {"none": None, "batch": {"x": {0: n}}, "all": {"x": {0: n, 2: h, 3: w}}}[free]
    program = torch.export.export(module, (torch.rand(2, 3, 64, 64),), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path
