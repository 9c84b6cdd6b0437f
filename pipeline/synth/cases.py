"""The hard cases of real slides as generator specs, shared by ``bench/accuracy.py --hard`` and the
tests (``tests/pipeline/test_hard_cases.py``), so both measure the same slides."""

from __future__ import annotations

from typing import Literal

from pipeline.synth.model import SynthSpec

#: A scanner colour cast: the blue channel dimmed most, as a warm lamp or an old filter does.
COLOUR_CAST = (1.0, 0.94, 0.86)


def hard_cases(
    size: int, localisation: Literal["nuclear", "cytoplasmic", "membranous"] = "nuclear"
) -> dict[str, SynthSpec]:
    """A pale and a very pale counterstain, brown nuclei whose haematoxylin strong DAB hides, a
    colour cast, and stain vectors rotated up to 8° (with and without the cast); 40 % tumour, DAB
    drawn continuously across the class cut-offs."""
    common = {
        "width": size,
        "height": size,
        "tumour_fraction": 0.4,
        "localisation": localisation,
        "continuous_dab": True,
    }
    return {
        "pale_counterstain": SynthSpec(seed=41, counterstain_scale=0.35, **common),
        "very_pale_counterstain": SynthSpec(seed=46, counterstain_scale=0.2, **common),
        "dab_dominant": SynthSpec(
            seed=42, dab_masks_hematoxylin=0.85, strong_dab_od=1.5, tumour_classes=(0.3, 0.1, 0.2, 0.4), **common
        ),
        "colour_cast": SynthSpec(seed=44, colour_cast=COLOUR_CAST, **common),
        "off_vector": SynthSpec(seed=43, stain_jitter_deg=8, colour_cast=COLOUR_CAST, **common),
        "off_vector_2": SynthSpec(seed=45, stain_jitter_deg=8, **common),
    }
