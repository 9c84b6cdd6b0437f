"""One frozen, validated settings model for scoring, and stain profiles.

Profiles are TOML files in ``config/profiles/`` (``hscore``, ``ki67``, ``er``,
``pr``, ``her2``, ``pdl1``); any value can be overridden with dotted
``key=value`` pairs (``nuclei.threshold=0.2``), validated with errors that
name the parameter and the bad value.

Nucleus detection parameters mirror QuPath's *Positive cell detection* so a
lab can carry a protocol over; their QuPath names are given per field.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from config.errors import ConfigError

PROFILE_DIR = Path(__file__).with_name("profiles")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Vector3 = tuple[float, float, float]


class StainSettings(_Frozen):
    """Colour deconvolution (Ruifrok–Johnston)."""

    hematoxylin: Vector3 = Field((0.65111, 0.70119, 0.29049), description="H OD vector (QuPath H-DAB default)")
    dab: Vector3 = Field((0.26917, 0.56824, 0.77759), description="DAB OD vector (QuPath H-DAB default)")
    background: Literal["auto"] | float = Field(
        "auto", description="white level I0 (QuPath 'background'): a value, or 'auto' = median glass colour"
    )
    icc_profile: bool = Field(
        False,
        description="convert pixels from the slide's ICC profile (where it has one) to sRGB before deconvolution; "
        "off by default: the default stain vectors were measured on unmanaged scanner RGB",
    )
    estimate: bool = Field(False, description="estimate vectors per slide (estimate_method), with fallback to defaults")
    estimate_method: Literal["dominant", "macenko"] = Field(
        "dominant",
        description="'dominant': each vector from the pixels its stain dominates, refined from the defaults; "
        "'macenko': Macenko's angle percentiles (lies beyond the true vectors: biased on the slides tried)",
    )
    estimate_tiles: int = Field(16, ge=1, le=512, description="tissue tiles sampled for estimation")
    estimate_max_angle_deg: float = Field(
        25.0, gt=0, le=90, description="estimated vectors further than this from the defaults are rejected"
    )

    @field_validator("background")
    @classmethod
    def _background(cls, v: str | float) -> str | float:
        if v != "auto" and not (isinstance(v, (int, float)) and 0 < v <= 255):
            raise ValueError(f"background {v!r} must be 'auto' or a value in (0, 255]")
        return v

    @field_validator("hematoxylin", "dab")
    @classmethod
    def _positive(cls, v: Vector3) -> Vector3:
        if any(c < 0 for c in v) or sum(c * c for c in v) == 0:
            raise ValueError(f"stain vector {v} must be non-negative and not zero")
        return v


class TissueSettings(_Frozen):
    """Tissue detection on a low-resolution image."""

    mpp: float = Field(8.0, gt=0, description="resolution of the tissue mask (µm/px)")
    min_od: float = Field(0.03, ge=0, description="lower bound of the tissue threshold (OD sum above glass)")
    max_od: float = Field(0.05, gt=0, description="upper bound of the tissue threshold (OD sum above glass)")
    min_region_um2: float = Field(20_000.0, ge=0, description="tissue pieces smaller than this are dropped")
    close_um: float = Field(16.0, ge=0, description="closing radius that fills gaps between cells")
    min_tile_tissue: float = Field(0.01, ge=0, le=1, description="keep tiles with at least this tissue fraction")


class TilingSettings(_Frozen):
    tile_size: int = Field(512, ge=64, le=4096, description="analysis tile size in pixels at the requested pixel size")
    margin_um: float = Field(16.0, ge=0, description="context read around each tile; cells are owned by centre")
    workers: int = Field(0, ge=0, le=64, description="processes; 0 = number of CPU cores")
    group_tiles: int = Field(
        2,
        ge=1,
        le=4,
        description="find cells on groups of up to N×N neighbouring tissue tiles at once, so they share one "
        "margin (2: 13 % of the pixels read are margin instead of 27 %); 1 = every tile on its own",
    )


class NucleiSettings(_Frozen):
    """Classical nucleus detection (QuPath 'Positive cell detection' terms)."""

    method: Literal["qupath", "fast"] = Field(
        "fast",
        description="'qupath': QuPath's watershed cell detection, every parameter meaning what it means there "
        "(the threshold applies to each candidate region's mean; use it to carry a QuPath protocol over; about "
        "5x slower); 'fast': a per-pixel threshold where the smoothed image is curved down (QuPath's LoG > 0) "
        "and a distance-map split at necks, compiled for throughput",
    )
    detection_image: Literal["hematoxylin", "od_sum", "stain_max", "stain_sum"] = Field(
        "hematoxylin",
        description="QuPath 'Detection image': 'hematoxylin' (Hematoxylin OD) or 'od_sum' (Optical density sum); "
        "'stain_max': the stronger of haematoxylin and DAB OD at each pixel, which sees brown nuclei whose "
        "haematoxylin the DAB hides as well as blue ones (the nuclear-stain profiles use it; a membrane or "
        "cytoplasm stain would be taken for nuclei); 'stain_sum': haematoxylin + DAB OD",
    )
    requested_pixel_size_um: float = Field(
        0.5, gt=0.05, le=4.0, description="QuPath 'Requested pixel size': the analysis µm/px (the paper used 0.46)"
    )
    background_radius_um: float = Field(8.0, ge=0, description="QuPath 'Background radius' (0 = off)")
    background_by_reconstruction: bool = Field(
        True,
        description="QuPath 'Use opening by reconstruction' (v0.4+; method 'qupath' only): off, the background is a "
        "plain opening (min then max filter), which keeps a fold or background stain from carrying across a tile",
    )
    median_radius_um: float = Field(0.0, ge=0, description="QuPath 'Median filter radius'")
    sigma_um: float = Field(1.5, gt=0, description="QuPath 'Sigma' of the Gaussian smoothing")
    min_area_um2: float = Field(10.0, ge=0, description="QuPath 'Minimum area'")
    max_area_um2: float = Field(400.0, gt=0, description="QuPath 'Maximum area'")
    threshold: float = Field(0.1, gt=0, description="QuPath 'Threshold' on the detection image (OD)")
    adaptive_threshold: bool = Field(
        True,
        description="lower the threshold on a slide with a paler counterstain: at most adaptive_fraction of the "
        "slide's nuclear haematoxylin level (the 99th percentile of haematoxylin OD smoothed by sigma over sampled "
        "tissue tiles), never below min_threshold; a slide with a normal counterstain keeps the threshold",
    )
    adaptive_fraction: float = Field(
        0.32,
        gt=0,
        le=1,
        description="see adaptive_threshold; 0.32 keeps the threshold of the real Ki-67 crop OS-2 (nuclear level "
        "0.317 OD) and lowers it with the level on any paler slide, so a scanner whose tone curve makes all optical "
        "densities lower finds the same nuclei (bench/drift.py)",
    )
    min_threshold: float = Field(0.03, gt=0, description="the lowest threshold adaptive_threshold may choose (OD)")
    max_background: float = Field(2.0, gt=0, description="QuPath 'Max background intensity'")
    split_by_shape: bool = Field(True, description="QuPath 'Split by shape'")
    exclude_dab: bool = Field(
        False, description="QuPath 'Exclude DAB (membrane staining)': detect only where haematoxylin OD ≥ DAB OD"
    )
    smooth_boundaries: bool = Field(
        True, description="QuPath 'Smooth boundaries': smooths drawn outlines only; no effect on counts or intensities"
    )
    cell_expansion_um: float = Field(5.0, ge=0, description="QuPath 'Cell expansion' (the paper used 4)")
    include_nuclei: bool = Field(True, description="QuPath 'Include cell nucleus'")
    model: Path | None = Field(
        None,
        description="nucleus model (TorchScript, or torch.export .pt2) instead of the detection image: "
        "input (N, 3, H, W) tile at the "
        "requested pixel size (model_channels), output (N, 1, H, W) nucleus logits or (N, 2, H, W) "
        "background/nucleus logits; its probability is thresholded, split by shape and area-filtered",
    )
    model_channels: Literal["rgb", "hdab"] = Field("rgb", description="model input: RGB in [0,1] or H/DAB/residual OD")
    model_threshold: float = Field(0.5, gt=0, lt=1, description="nucleus probability threshold for the model")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the nucleus model runs (auto: CUDA if present)"
    )

    @model_validator(mode="after")
    def _areas(self) -> NucleiSettings:
        if self.max_area_um2 <= self.min_area_um2:
            raise ValueError(f"max_area_um2 {self.max_area_um2} must exceed min_area_um2 {self.min_area_um2}")
        return self


class IntensitySettings(_Frozen):
    """How a cell's DAB is measured and classed (QuPath 'Intensity parameters')."""

    compartment: Literal["nucleus", "cytoplasm", "membrane", "cell"] = Field(
        "cell", description="QuPath 'Score compartment'"
    )
    statistic: Literal["mean", "max"] = Field("mean", description="DAB OD mean or max")
    thresholds: tuple[float, float, float] = Field((0.2, 0.4, 0.6), description="1+, 2+, 3+ thresholds (OD)")
    single_threshold: float | None = Field(None, gt=0, description="use one positive threshold instead")
    membrane_width_um: float = Field(1.0, gt=0, description="width of the membrane band inside the cell edge")
    membrane_method: Literal["ring", "sectors", "none"] = Field(
        "sectors",
        description="membrane DAB: 'ring' = the brightest ring (membrane_width_um wide) around the nucleus; "
        "'sectors' = the peak DAB along each of membrane_sectors directions from the nucleus' centre, averaged, "
        "completeness = the fraction of directions at or above the 1+ threshold; "
        "'none' = not measured (nuclear stains: saves about a tenth of the cell detection time)",
    )
    membrane_sectors: int = Field(16, ge=4, le=64, description="directions for membrane_method = 'sectors'")

    @field_validator("thresholds")
    @classmethod
    def _increasing(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not (0 < v[0] < v[1] < v[2]):
            raise ValueError(f"thresholds {v} must be positive and increasing")
        return v


class SegmentationSettings(_Frozen):
    """Tumour–stroma segmentation into tumour / stroma / fat-background / other."""

    method: Literal["builtin", "model"] = Field(
        "builtin", description="'builtin': the nuclear-crowding rule; 'model': the model file in segmentation.model"
    )
    grid_um: float = Field(16.0, gt=0, description="builtin: feature grid cell size")
    smooth_um: float = Field(24.0, ge=0, description="builtin: Gaussian smoothing of features")
    tumour_nuclear_fraction: float = Field(
        0.12,
        gt=0,
        lt=1,
        description="builtin: fraction of tissue area covered by nuclei above which it is tumour"
        " (carcinoma ~0.2-0.35, stroma ~0.03-0.05)",
    )
    tumour_min_nucleus_um2: float = Field(
        25.0, ge=0, description="builtin: mean nuclear area (µm²) a tumour region must reach"
    )
    refine_to_nuclei: bool = Field(True, description="builtin: pull region edges in to the cells that make them up")
    refine_reach_um: float = Field(
        16.0,
        gt=0,
        description="builtin: nuclei up to twice this apart are one region (a gap of one undetected cell stays filled)",
    )
    refine_margin_um: float = Field(
        10.0,
        ge=0,
        description="builtin: the region's edge lies this far beyond its outermost nuclei's centres (a carcinoma"
        " nucleus' radius, ~5 µm, plus QuPath's cell expansion, 5 µm); at most refine_reach_um",
    )
    map_um: float = Field(
        2.0, gt=0, description="builtin: compartment map resolution (µm/px; a whole fraction of tissue.mpp)"
    )
    map_max_mpx: float = Field(
        40.0, gt=0, description="builtin: the map is made coarser (up to tissue.mpp) to stay within this many MP"
    )
    model: Path | None = Field(
        None, description="model file, TorchScript or torch.export .pt2 (required for method='model')"
    )
    model_mpp: float = Field(2.0, gt=0, description="model input resolution (µm/px)")
    model_tile_size: int = Field(256, ge=16, le=4096, description="model input tile size in pixels at model_mpp")
    model_channels: Literal["rgb", "hdab"] = Field("rgb", description="rgb in [0,1] or H/DAB/residual OD")
    model_classes: tuple[str, ...] = Field(
        ("tumour", "stroma", "fat_background", "other"), description="meaning of the model's output channels"
    )
    batch_size: int = Field(8, ge=1, le=256, description="model tiles per batch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs (auto: CUDA if present)")

    @model_validator(mode="after")
    def _model_needs_file(self) -> SegmentationSettings:
        if self.method == "model" and self.model is None:
            raise ValueError("method 'model' needs segmentation.model = path to a model file")
        if self.refine_margin_um > self.refine_reach_um:
            raise ValueError(
                f"refine_margin_um {self.refine_margin_um} must not exceed refine_reach_um {self.refine_reach_um}"
            )
        return self


#: Score kinds read from the membrane (HER2 category, PD-L1 tumour proportion score).
MEMBRANE_SCORES = ("her2", "pdl1")


class ScoreSettings(_Frozen):
    """Profile-specific clinical scores and alert limits."""

    kind: Literal["hscore", "ki67", "er", "pr", "her2", "pdl1"] = Field(
        "hscore", description="which clinical score the profile reports besides the per-compartment H-scores"
    )
    low_tumour_fraction: float = Field(0.10, ge=0, le=1, description="alert below this tumour/tissue area")
    min_tumour_cells: int = Field(100, ge=0, description="alert when fewer tumour cells were scored")
    min_tissue_mm2: float = Field(0.5, ge=0, description="alert when less tissue was found")
    ki67_cutoff_percent: float = Field(20.0, ge=0, le=100, description="Ki-67 clinical cut-off")
    near_cutoff_percent: float = Field(2.5, ge=0, description="alert when within this of a cut-off")
    her2_noise_floor_percent: float = Field(
        1.0,
        ge=0,
        le=10,
        description="HER2: tumour cells with complete intense staining (for 2+) or any staining (for ultralow) "
        "count only when they are at least this share of tumour cells; 0 = a single cell counts",
    )
    her2_complete_fraction: float = Field(
        0.6, gt=0, le=1, description="membrane fraction above DAB threshold that counts as complete"
    )


class QcSettings(_Frozen):
    """Tissue quality control before scoring (:mod:`pipeline.qc`)."""

    enabled: bool = Field(
        True, description="detect marker ink, saturated areas, folds and blur and leave them out of the scores"
    )
    ink_saturation: float = Field(
        0.25, gt=0, le=1, description="green/cyan pixels more saturated than this (white-balanced HSV) are ink"
    )
    fold_od: float = Field(
        0.5, gt=0, description="tissue with haematoxylin and DAB OD both above this at 8 µm/px is a fold"
    )
    fold_floor_ratio: float = Field(
        0.0,
        ge=0,
        description="opt-in (0 = off): a block (fold_block_um) whose haematoxylin floor is at least this many times "
        "that of the slide's blocks as crowded with nuclei (where that is at least fold_min_floor_od) and whose DAB "
        "floor rose less is a fold (tissue lying twice); 1.6 finds the generator's pale folds, but squamous "
        "epithelium trips it too",
    )
    fold_min_floor_od: float = Field(
        0.03,
        ge=0,
        description="folds are judged only among blocks whose expected haematoxylin floor is at least this: a "
        "doubling of next to nothing cannot be told from noise or another chromogen's bleed",
    )
    fold_block_um: float = Field(16.0, gt=0, description="side of the blocks whose haematoxylin floor is judged")
    fold_floor_window_um: float = Field(
        15.0, gt=0, description="the floor is an opening over this window: it clears nuclei, keeps what lies between"
    )
    dark_value: float = Field(
        0.08,
        ge=0,
        lt=1,
        description="tissue darker than this (HSV value, share of white) at 8 µm/px is saturated (black ink, dirt, "
        "a dark fold): nothing can be measured there",
    )
    edge_um: float = Field(
        0.0,
        ge=0,
        description="leave out this rim of each tissue piece's cut edge (edge artefact; 0 = off: biopsies would "
        "lose much of their tissue)",
    )
    min_counterstain_od: float = Field(
        0.08,
        ge=0,
        description="QC_FAILED when the slide's nuclear haematoxylin level (99th percentile of smoothed "
        "haematoxylin OD over sampled tissue tiles) is under this: too little counterstain to find nuclei by "
        "(the real Ki-67 crop OS-2 is at 0.32; with its haematoxylin cut to a quarter, 0.075, a third of its "
        "nuclei are lost and its index doubles)",
    )
    pale_counterstain_od: float = Field(
        0.15,
        ge=0,
        description="PALE_COUNTERSTAIN alert when the nuclear haematoxylin level is under this: pale negative "
        "nuclei may be missed (OS-2 with its haematoxylin cut to 0.4, level 0.12: 90 % of its nuclei found, the "
        "index 6 points high)",
    )
    min_area_um2: float = Field(2000.0, ge=0, description="artefact pieces smaller than this are ignored")
    blur_ratio: float = Field(
        0.2, ge=0, lt=1, description="a region whose sharpness is under this share of the slide's median is blurred"
    )
    blur_floor: float = Field(0.02, ge=0, description="a region whose sharpness is under this is blurred (any slide)")
    blur_block_um: float = Field(48.0, gt=0, description="side of the blocks whose sharpness is judged")
    overexposed_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a block (blur_block_um) with at least this share of pixels within 3 µm of one clipped at white "
        "is over-exposed, unless the slide's glass is clipped too",
    )
    grey_residual_od: float = Field(
        0.12,
        ge=0,
        description="a pixel (at half the analysis resolution) whose colour-deconvolution residual is over this OD "
        "in an unsaturated colour is grey, as a bubble's rim or dust; areas grey pixels enclose are bubbles, solid "
        "grey pieces debris; 0 turns both checks off",
    )
    debris_grey_share: float = Field(
        0.5, gt=0, le=1, description="a tissue-grid pixel at least this share of whose pixels are grey is debris"
    )
    debris_min_area_um2: float = Field(
        400.0, ge=0, description="debris pieces smaller than this are ignored (a dark nucleus or two is not debris)"
    )
    bubble_min_area_um2: float = Field(
        5000.0, ge=0, description="a bubble encloses at least this area (smaller grey rings are ignored)"
    )
    min_usable_fraction: float = Field(
        0.5, ge=0, le=1, description="QC_FAILED (result not valid) when less of the tissue than this is usable"
    )


class UncertaintySettings(_Frozen):
    """Intervals of the slide-level scores (:mod:`pipeline.uncertainty`)."""

    enabled: bool = Field(True, description="compute 95 % intervals and the UNCERTAIN_CATEGORY alert")
    block_um: float = Field(
        512.0,
        gt=0,
        description="side of the spatial blocks resampled by the bootstrap (cells in one block move together)",
    )
    resamples: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="coverage of the intervals")
    margin_od: float = Field(
        0.05, gt=0, description="cells whose DAB lies this close to a class threshold are reported as near it"
    )
    seed: int = Field(0, ge=0, description="random seed of the bootstrap (results are reproducible)")


class ExplainSettings(_Frozen):
    """Attributions of model plug-ins by integrated gradients (:mod:`pipeline.explain`)."""

    integrated_gradients: bool = Field(
        False,
        description="explain each configured model (segmentation.model, nuclei.model) by integrated gradients on "
        "a sample of tissue tiles: attribution maps next to the JSON and their correlation with DAB and "
        "haematoxylin OD (opt-in: each tile costs 2 x steps model passes)",
    )
    steps: int = Field(32, ge=4, le=512, description="points on the path from the unstained baseline to the input")
    tiles: int = Field(8, ge=1, le=256, description="tissue tiles explained per model, spread over the slide")


class OutputSettings(_Frozen):
    """Optional result objects."""

    heatmap: bool = Field(
        False,
        description="also write the block scores (local H-score, % positive, % positive tumour cells, tumour "
        "share, share left out by QC) as DICOM Parametric Maps, one series each (the PNG heat maps are always "
        "written)",
    )
    heatmap_seg: bool = Field(
        False,
        description="also write the block scores as one banded SEG series (four bands per score) for viewers "
        "that draw SEG but not Parametric Maps",
    )
    heatmap_um: float = Field(128.0, gt=0, description="block size of the heat maps (µm)")
    device_uid: str | None = Field(
        None,
        description="Device Observer UID of this installation in every SR and KOS (set it once per "
        "installation, e.g. from a UID root your organisation owns); unset: a UID derived from the host "
        "name, stable on one machine but not across containers",
    )
    content_qualification: Literal["PRODUCT", "RESEARCH", "SERVICE"] = Field(
        "PRODUCT",
        description="Content Qualification of the Parametric Map: PRODUCT for clinical use (the SR stays "
        "UNVERIFIED until a pathologist signs it), RESEARCH where results serve research only",
    )

    @field_validator("device_uid")
    @classmethod
    def _uid(cls, v: str | None) -> str | None:
        if v is not None and not _UID.fullmatch(v):
            raise ValueError(f"device_uid {v!r} is not a DICOM UID (digits and dots, at most 64 characters)")
        return v


#: A DICOM UID: components of digits without leading zeros, separated by dots, at most 64 characters.
_UID = re.compile(r"(?=.{1,64}$)(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


class Settings(_Frozen):
    """Everything the scoring pipeline reads; build with :func:`load_settings`."""

    profile: str = Field("hscore", description="the profile's name (set by the profile file)")
    description: str = Field("", description="one line on what the profile scores")
    stain: StainSettings = StainSettings()
    tissue: TissueSettings = TissueSettings()
    tiling: TilingSettings = TilingSettings()
    nuclei: NucleiSettings = NucleiSettings()
    intensity: IntensitySettings = IntensitySettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    scores: ScoreSettings = ScoreSettings()
    qc: QcSettings = QcSettings()
    uncertainty: UncertaintySettings = UncertaintySettings()
    explain: ExplainSettings = ExplainSettings()
    outputs: OutputSettings = OutputSettings()

    @model_validator(mode="after")
    def _membrane_measured_where_scored(self) -> Settings:
        needs = self.intensity.compartment == "membrane" or self.scores.kind in MEMBRANE_SCORES
        if needs and self.intensity.membrane_method == "none":
            why = (
                "the score compartment is the membrane"
                if self.intensity.compartment == "membrane"
                else f"scores.kind {self.scores.kind!r} is scored from the membrane"
            )
            # Not a ValueError: pydantic lets it through, so the message names the setting.
            raise ConfigError("intensity.membrane_method", "none", f"{why}; choose 'sectors' or 'ring'")
        return self


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value); values are JSON when they parse, else text."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", item, "expected key=value, e.g. nuclei.threshold=0.2")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def _merge(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(path), value, f"{part} is not a section")
        node = child
    node[path[-1]] = value


def load_settings(profile: str | Path = "hscore", overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """A profile (name or TOML path) with ``key=value`` overrides, validated."""
    path = Path(profile) if str(profile).endswith(".toml") else PROFILE_DIR / f"{profile}.toml"
    if not path.is_file():
        raise ConfigError("profile", str(profile), f"unknown profile; choose from {', '.join(available_profiles())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("profile", str(path), f"invalid TOML: {exc}") from exc
    for item in overrides:
        keys, value = parse_override(item)
        _merge(data, keys, value)
    try:
        return Settings(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(where, err.get("input"), err["msg"]) from exc
