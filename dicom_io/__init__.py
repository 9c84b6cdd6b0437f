"""Reading slides and writing DICOM / OME results.

Modules are named after the standard they implement: ``sm_image`` (VL Whole
Slide Microscopy Image IOD), ``wsi_reader`` (reading such series),
``tiff_reader`` / ``tiff_writer`` (OME-TIFF, SVS, pyramidal TIFF).
"""

from dicom_io.open import open_slide

__all__ = ["open_slide"]
