"""The labels every part of the product shares: compartments and intensity classes.

One meaning per value, for the pipeline's compartment map, the result writers (SEG, annotations,
OME label image) and the synthetic generator's truth.
"""

from __future__ import annotations

from enum import IntEnum


class Compartment(IntEnum):
    """A compartment map's labels."""

    #: Not tissue: glass and, in the pipeline's map, fat (the generator's truth tells fat apart).
    BACKGROUND = 0
    TUMOUR = 1
    STROMA = 2
    #: Tissue a segmentation model classes as neither tumour nor stroma (necrosis, …).
    OTHER = 3
    #: Fat: only in the generator's truth; the pipeline maps fat as BACKGROUND.
    FAT = 4

    @property
    def label(self) -> str:
        """The name used in results, model class lists and file legends."""
        return "fat_background" if self is Compartment.BACKGROUND else self.name.lower()


class IntensityClass(IntEnum):
    """A cell's (or pixel's) DAB class, by the profile's thresholds."""

    NEGATIVE = 0
    WEAK = 1
    MODERATE = 2
    STRONG = 3

    @property
    def label(self) -> str:
        """``negative``, ``1+``, ``2+`` or ``3+``: the names in results and reports."""
        return "negative" if self is IntensityClass.NEGATIVE else f"{int(self)}+"


#: The class names in order: negative, 1+, 2+, 3+.
INTENSITY_LABELS = tuple(c.label for c in IntensityClass)
