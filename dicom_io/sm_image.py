"""VL Whole Slide Microscopy Image IOD: write a pyramid as a DICOM WSI series.

The encoded JPEG tiles of a :class:`~dicom_io.pyramid.EncodedLevel` pyramid
are handed to wsidicom's writer through a small ``ImageData``/``Source``
adapter, so wsidicom builds the datasets (patient, study, specimen, optical
path with ICC profile, functional groups, offset tables) and streams the
frames; nothing here assembles DICOM by hand.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np
from pydicom.uid import UID, JPEGBaseline8Bit, generate_uid
from wsidicom import WsiDicom
from wsidicom.codec import Encoder, LossyCompressionIsoStandard
from wsidicom.geometry import Point, PointMm, Size, SizeMm
from wsidicom.instance import WsiDataset, WsiInstance
from wsidicom.instance.image_data import ImageData
from wsidicom.metadata import (
    Equipment,
    Image,
    ImageCoordinateSystem,
    ImageType,
    Label,
    LossyCompression,
    OpticalPath,
    Patient,
    PatientSex,
    Pyramid,
    Series,
    Slide,
    SlideSample,
    Staining,
    Study,
    WsiMetadata,
)
from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema
from wsidicom.source import Source

from config.product import SOFTWARE_NAME, software_version
from dicom_io.pyramid import EncodedLevel

log = logging.getLogger(__name__)

#: The image's top-left corner at the slide coordinate origin, unrotated.
_SLIDE_ORIGIN = ImageCoordinateSystem(origin=PointMm(0.0, 0.0), rotation=0.0)


#: Software name written as the equipment and used in SR device observers.
@dataclass(frozen=True)
class SlideIdentity:
    """Patient, study, series and specimen identifiers written into a WSI."""

    patient_name: str = "Synthetic^Slide"
    patient_id: str = "SYNTH-0001"
    patient_birth_date: dt.date | None = None
    patient_sex: str = "O"
    study_instance_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_instance_uid: str = field(default_factory=lambda: str(generate_uid()))
    frame_of_reference_uid: str = field(default_factory=lambda: str(generate_uid()))
    study_id: str = "SYNTH"
    accession_number: str = "SYNTH0001"
    study_description: str = "Synthetic IHC slide"
    series_description: str = "Synthetic H-DAB whole slide image"
    series_number: int = 1
    container_identifier: str = "SYNTH-SLIDE-1"
    specimen_identifier: str = "SYNTH-SPECIMEN-1"
    specimen_description: str | None = "Synthetic tumour tissue"
    stains: tuple[str, ...] = ("hematoxylin stain", "DAB")
    manufacturer: str = SOFTWARE_NAME
    model_name: str = "synthetic slide generator"
    device_serial_number: str = "0"
    acquisition_datetime: dt.datetime | None = field(default_factory=lambda: dt.datetime(2026, 1, 1, 12, 0, 0))
    #: Description of the image pyramid (None: left out).
    pyramid_description: str | None = "Synthetic IHC pyramid"
    #: The source's ICC profile, carried into the optical path (None: wsidicom's sRGB).
    icc_profile: bytes | None = None

    def to_metadata(self, mpp: float) -> WsiMetadata:
        spacing = SizeMm(mpp / 1000.0, mpp / 1000.0)
        sex = {"M": PatientSex.M, "F": PatientSex.F}.get(self.patient_sex, PatientSex.O)
        return WsiMetadata(
            study=Study(
                uid=UID(self.study_instance_uid),
                identifier=self.study_id,
                date=self.acquisition_datetime.date() if self.acquisition_datetime else None,
                time=self.acquisition_datetime.time() if self.acquisition_datetime else None,
                accession_number=self.accession_number,
                description=self.study_description,
            ),
            series=Series(
                uid=UID(self.series_instance_uid),
                number=self.series_number,
                description=self.series_description,
            ),
            patient=Patient(
                name=self.patient_name,
                identifier=self.patient_id,
                birth_date=self.patient_birth_date,
                sex=sex,
            ),
            equipment=Equipment(
                manufacturer=self.manufacturer,
                model_name=self.model_name,
                device_serial_number=self.device_serial_number,
                software_versions=[software_version()],
            ),
            slide=Slide(
                identifier=self.container_identifier,
                stainings=[Staining(substances=", ".join(self.stains))] if self.stains else None,
                samples=[
                    SlideSample(
                        identifier=self.specimen_identifier,
                        uid=generate_uid(),
                        short_description=self.specimen_description,
                    )
                ],
            ),
            pyramid=Pyramid(
                image=Image(
                    acquisition_datetime=self.acquisition_datetime,
                    pixel_spacing=spacing,
                    image_coordinate_system=_SLIDE_ORIGIN,
                ),
                optical_paths=[OpticalPath(identifier="0", description="Bright-field", icc_profile=self.icc_profile)],
                uid=generate_uid(),
                description=self.pyramid_description,
            ),
            label=Label(contains_phi=False),
            overview=None,
            frame_of_reference_uid=UID(self.frame_of_reference_uid),
            dimension_organization_uids=[generate_uid()],
        )


class EncodedLevelImageData(ImageData):
    """wsidicom image data served from a level's pre-encoded JPEG tile file."""

    def __init__(self, level: EncodedLevel, quality_ratio: float):
        self._level = level
        self._ratio = quality_ratio
        super().__init__(Encoder.create(JPEGBaseline8Bit, 8, level.photometric))

    @property
    def transfer_syntax(self) -> UID:
        return JPEGBaseline8Bit

    @property
    def image_size(self) -> Size:
        return Size(self._level.width, self._level.height)

    @property
    def tile_size(self) -> Size:
        return Size(self._level.tile_size, self._level.tile_size)

    @property
    def pixel_spacing(self) -> SizeMm:
        return SizeMm(self._level.mpp / 1000.0, self._level.mpp / 1000.0)

    @property
    def imaged_size(self) -> SizeMm:
        return SizeMm(
            self._level.width * self._level.mpp / 1000.0,
            self._level.height * self._level.mpp / 1000.0,
        )

    @property
    def samples_per_pixel(self) -> int:
        return 3

    @property
    def photometric_interpretation(self) -> str:
        return self._level.photometric

    @property
    def bits(self) -> int:
        return 8

    @property
    def image_coordinate_system(self) -> ImageCoordinateSystem:
        return _SLIDE_ORIGIN

    @property
    def thread_safe(self) -> bool:
        return True

    @property
    def lossy_compression(self) -> list[LossyCompression]:
        return [LossyCompression(LossyCompressionIsoStandard.JPEG_LOSSY, self._ratio)]

    @property
    def transcoder(self) -> None:
        return None

    def get_encoded_tile(self, tile: Point, z: float, path: str) -> bytes:
        return self._level.read_tile(tile.x, tile.y)

    def get_decoded_tile(self, tile_point: Point, z: float, path: str, cache: bool = True) -> np.ndarray:
        return np.asarray(imagecodecs.jpeg8_decode(self.get_encoded_tile(tile_point, z, path)))


class _PyramidSource(Source):
    def __init__(self, levels: Sequence[EncodedLevel], metadata: WsiMetadata):
        super().__init__()
        dataset = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME, require_icc_profile=True)
        self._base = WsiDataset(dataset)
        # A level's pyramid index > 0 makes wsidicom write it DERIVED\\PRIMARY\\VOLUME\\RESAMPLED:
        # one original image per slide, as viewers (Slim) expect.
        self._instances = [
            WsiInstance.create_instance(
                EncodedLevelImageData(lv, _compression_ratio(lv)),
                copy.deepcopy(dataset),
                ImageType.VOLUME,
                pyramid_index=i,
            )
            for i, lv in enumerate(levels)
        ]

    @property
    def base_dataset(self) -> WsiDataset:
        return self._base

    @property
    def level_instances(self) -> Iterable[WsiInstance]:
        return self._instances

    @property
    def label_instances(self) -> Iterable[WsiInstance]:
        return []

    @property
    def overview_instances(self) -> Iterable[WsiInstance]:
        return []

    @property
    def thumbnail_instances(self) -> Iterable[WsiInstance]:
        return []

    @property
    def annotation_instances(self) -> list:
        return []

    def close(self) -> None:
        return None


def _compression_ratio(level: EncodedLevel) -> float:
    raw = level.columns * level.rows * level.tile_size * level.tile_size * 3
    return round(raw / max(1, level.nbytes), 2)


def write_sm_series(levels: Sequence[EncodedLevel], out_dir: Path, identity: SlideIdentity) -> list[Path]:
    """Write one VL WSI instance per pyramid level into ``out_dir``.

    The JPEG tiles are copied, not re-encoded. Returns the written files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = identity.to_metadata(levels[0].mpp)
    source = _PyramidSource(levels, metadata)
    with WsiDicom(source, source_owned=True) as wsi:
        written = wsi.save(out_dir, offset_table="bot", workers=1)
    paths = [Path(str(p)) for p in written]
    log.info("wrote %d DICOM WSI instances to %s", len(paths), out_dir)
    return paths
