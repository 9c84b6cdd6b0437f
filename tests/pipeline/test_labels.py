"""One meaning per label value, shared by the pipeline, the writers and the generator."""

from __future__ import annotations

import numpy as np

from dicom_io.ann import CLASS_NAMES
from pipeline.labels import INTENSITY_LABELS, Compartment, IntensityClass
from pipeline.segmentation import CLASS_NAMES as MAP_NAMES
from pipeline.synth import SlideModel, SynthSpec


def test_compartment_and_intensity_labels() -> None:
    assert [int(c) for c in Compartment] == [0, 1, 2, 3, 4]
    assert {int(k): v for k, v in MAP_NAMES.items()} == {0: "fat_background", 1: "tumour", 2: "stroma", 3: "other"}
    assert INTENSITY_LABELS == ("negative", "1+", "2+", "3+") == CLASS_NAMES
    assert IntensityClass(3).label == "3+" and IntensityClass.NEGATIVE.label == "negative"


def test_the_generator_truth_uses_the_shared_labels() -> None:
    """Fat in the truth is FAT (4), never OTHER (3), which means something else in the pipeline."""
    labels = SlideModel(SynthSpec(width=1024, height=1024, seed=3, fat_fraction=0.3)).truth_labels()
    found = set(np.unique(labels).tolist())
    assert Compartment.FAT in found and Compartment.OTHER not in found
    assert found <= {Compartment.BACKGROUND, Compartment.TUMOUR, Compartment.STROMA, Compartment.FAT}
