"""Key Object Selection: a "For Physician Review" flag when any alert fired.

It points at the measurement SR and the slide, so a worklist that indexes
KOS documents can surface slides whose automated result needs a pathologist.
"""

from __future__ import annotations

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from config.product import SOFTWARE_NAME, device_uid, software_version
from pipeline.analysis import SlideResult


def build_review_flag(
    result: SlideResult, report: pydicom.Dataset, slide: pydicom.Dataset, series_number: int = 400
) -> hd.ko.KeyObjectSelectionDocument | None:
    """The review KOS, or None when no alert fired."""
    if not result.alerts:
        return None
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(result.settings.outputs.device_uid), name=f"{SOFTWARE_NAME} {software_version()}"
        ),
    )
    description = "; ".join(f"{a['code']}: {a['message']}" for a in result.alerts)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.cid7010.ForPhysicianReview,
        referenced_objects=[report, slide],
        observer_device_context=device,
        description=description[:1024],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[report, slide],
        content=content,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE_NAME,
    )
    kos.SeriesDescription = "IHC result needs review"
    return kos
