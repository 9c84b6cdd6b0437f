"""Synthetic bright-field H-DAB slides with exact ground truth."""

from pipeline.synth.model import (
    CLASS_CUTS,
    COMPARTMENT_NAMES,
    FAT,
    STROMA,
    TUMOUR,
    SlideModel,
    SynthSpec,
)
from pipeline.synth.render import RenderedTile, render_tile

__all__ = [
    "CLASS_CUTS",
    "COMPARTMENT_NAMES",
    "FAT",
    "STROMA",
    "TUMOUR",
    "RenderedTile",
    "SlideModel",
    "SynthSpec",
    "render_tile",
]
