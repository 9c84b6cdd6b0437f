"""Model files moved to the device they run on.

No GPU here: the ``meta`` device (shapes without data) stands in for CUDA.
A model that makes a tensor on its input's device must follow the input
there, whether exported (``.pt2``) or scripted; a traced one cannot, and
is refused with a reason that says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config.errors import ConfigError
from pipeline.torchscript import load_model, load_model_on, run_model


class AddsOnes(torch.nn.Module):
    """Creates a tensor in forward, on the input's device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device)


def _exported(path: Path) -> Path:
    n, h, w = torch.export.Dim("n"), torch.export.Dim("h"), torch.export.Dim("w")
    program = torch.export.export(AddsOnes(), (torch.rand(2, 3, 16, 16),), dynamic_shapes={"x": {0: n, 2: h, 3: w}})
    torch.export.save(program, str(path))
    return path


def test_an_exported_model_runs_on_the_device_it_is_loaded_for(tmp_path: Path) -> None:
    path = _exported(tmp_path / "ones.pt2")
    on_cpu, device = load_model(path, "cpu", "nuclei")
    assert device == torch.device("cpu")
    assert torch.equal(run_model(on_cpu, torch.zeros(1, 3, 8, 8), "nuclei", path), torch.ones(1, 3, 8, 8))
    # Moving only the weights (``.module().to(...)``) leaves the recorded cpu device behind.
    with pytest.raises(RuntimeError, match="device"):
        torch.export.load(str(path)).module().to("meta")(torch.zeros(1, 3, 8, 8, device="meta"))
    moved = load_model_on(path, torch.device("meta"), "nuclei")
    out = run_model(moved, torch.zeros(2, 3, 12, 10, device="meta"), "nuclei", path)
    assert out.device.type == "meta" and tuple(out.shape) == (2, 3, 12, 10)


def test_a_scripted_model_follows_its_input_and_a_traced_one_is_refused_by_name(tmp_path: Path) -> None:
    scripted, traced = tmp_path / "scripted.pt", tmp_path / "traced.pt"
    torch.jit.script(AddsOnes()).save(str(scripted))
    torch.jit.trace(AddsOnes(), torch.zeros(1, 3, 8, 8)).save(str(traced))
    x = torch.zeros(1, 3, 8, 8, device="meta")
    assert run_model(load_model_on(scripted, torch.device("meta"), "segmentation"), x, "segmentation", scripted).is_meta
    model = load_model_on(traced, torch.device("meta"), "segmentation")
    with pytest.raises(ConfigError, match=r"segmentation\.model.*traced\.pt.*device.*script it, or export it"):
        run_model(model, x, "segmentation", traced)
