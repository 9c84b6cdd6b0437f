"""Loading user-supplied models (tumour–stroma or nuclei) from files.

A model file is TorchScript (``torch.jit.save``, any suffix but ``.pt2``) or
a ``torch.export`` program (``torch.export.save``, suffix ``.pt2``; export it
with dynamic batch, height and width, since tiles at a slide's edge are
smaller and the last batch may be short). Nothing is downloaded: the file
named in the settings is loaded, on CUDA when the settings allow it and a
GPU is present, else on the CPU (:func:`load_model_on` moves it there). Every refusal is a
:class:`~config.errors.ConfigError` naming the setting and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from config.errors import ConfigError
from pipeline.stains import Background, StainMatrix, deconvolve


def load_model(path: Path | None, device: Literal["auto", "cpu", "cuda"], section: str) -> tuple[Any, Any]:
    """The model in ``path`` and the torch device it runs on; ``section`` names the settings (for errors)."""
    import torch

    if path is None:
        raise ConfigError(f"{section}.model", None, "a model file (TorchScript or .pt2) is required")
    if not Path(path).is_file():
        raise ConfigError(f"{section}.model", str(path), "file not found")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{section}.device", "cuda", "CUDA is not available on this machine")
    target = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    return load_model_on(Path(path), target, section), target


def load_model_on(path: Path, target: Any, section: str) -> Any:
    """The model in ``path``, ready to run on the torch device ``target``.

    An exported program records the device of every tensor it creates (a
    ``torch.ones(..., device=x.device)`` in ``forward`` becomes ``cpu`` when
    exported on the CPU), so it is moved with torch's ``move_to_device_pass``,
    which rewrites those too, not only its weights. A *scripted* TorchScript
    model reads devices at run time; a *traced* one keeps the device it was
    traced on, and fails elsewhere (:func:`run_model` says so).
    """
    import torch
    from torch.export.passes import move_to_device_pass

    exported = path.suffix == ".pt2"
    try:
        if exported:
            # An exported program is already in inference form (it has no eval()).
            return move_to_device_pass(torch.export.load(str(path)), target).module()
        return torch.jit.load(str(path), map_location=target).eval()
    except Exception as exc:  # torch raises RuntimeError with a long C++ trace
        kind = "torch.export program (.pt2)" if exported else "TorchScript model"
        raise ConfigError(f"{section}.model", str(path), f"not a loadable {kind}: {exc}") from exc


def run_model(model: Any, inp: Any, section: str, path: Path | None) -> Any:
    """``model(inp)`` without gradients; a model that fails on the input (an
    exported program with fixed sizes, a wrong channel count, a traced model
    on another device than it was traced on) is refused with the setting,
    the file, the input's shape and the error."""
    import torch

    try:
        with torch.inference_mode():
            return model(inp)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        # TorchScript's interpreter puts its own heading and the code first.
        errors = [line for line in lines if "Error:" in line]
        reason = errors[-1] if errors else lines[0] if lines else type(exc).__name__
        if "device" in reason:
            reason += (
                f" (the model runs on {inp.device.type}; a traced model keeps the device it was traced on:"
                " script it, or export it with torch.export as .pt2)"
            )
        raise ConfigError(
            f"{section}.model", str(path), f"failed on an input of shape {tuple(inp.shape)}: {reason}"
        ) from exc


def model_input(
    rgb: np.ndarray, channels: Literal["rgb", "hdab"], stains: StainMatrix, background: Background
) -> np.ndarray:
    """``(H, W, 3)`` float32 input: RGB in [0, 1], or H / DAB / residual optical density."""
    if channels == "rgb":
        return rgb.astype(np.float32) / 255.0
    return deconvolve(rgb, stains, background).astype(np.float32)
