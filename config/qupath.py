"""Carry a QuPath *Positive cell detection* protocol over: its parameters as settings overrides.

A lab that scores in QuPath has its protocol as a script line::

    runPlugin('qupath.imagej.detect.cells.PositiveCellDetection', '{"detectionImageBrightfield":
    "Optical density sum", "requestedPixelSizeMicrons": 0.5, ... "singleThreshold": true}')

:func:`qupath_overrides` turns that line, or the JSON object in it, into ``key=value`` overrides
(the form ``--set`` takes, values in JSON) for the QuPath-compatible detector (``nuclei.method = "qupath"``), each
parameter meaning what it means in QuPath; the slide-adaptive threshold is turned off (QuPath has
none). A Groovy map (``runPlugin('…', ['threshold': 0.1, …])``) is read too. The stain vectors and
the white level are not plug-in parameters in QuPath (they belong to the image): set
``stain.hematoxylin``, ``stain.dab`` and ``stain.background`` to QuPath's for the same numbers.
Parameters in pixel units (``sigma``, ``backgroundRadius`` … without ``Microns``) and unknown
parameters are refused by name.
"""

from __future__ import annotations

import json
import re
from typing import Any

from config.errors import ConfigError

#: QuPath's detection image choices → ``nuclei.detection_image``.
_DETECTION_IMAGES = {"Hematoxylin OD": "hematoxylin", "Optical density sum": "od_sum"}

#: QuPath's µm and plain parameters → settings keys.
_DIRECT = {
    "requestedPixelSizeMicrons": "nuclei.requested_pixel_size_um",
    "backgroundRadiusMicrons": "nuclei.background_radius_um",
    "backgroundByReconstruction": "nuclei.background_by_reconstruction",
    "medianRadiusMicrons": "nuclei.median_radius_um",
    "sigmaMicrons": "nuclei.sigma_um",
    "minAreaMicrons": "nuclei.min_area_um2",
    "maxAreaMicrons": "nuclei.max_area_um2",
    "threshold": "nuclei.threshold",
    "maxBackground": "nuclei.max_background",
    "watershedPostProcess": "nuclei.split_by_shape",
    "excludeDAB": "nuclei.exclude_dab",
    "cellExpansionMicrons": "nuclei.cell_expansion_um",
    "includeNuclei": "nuclei.include_nuclei",
    "smoothBoundaries": "nuclei.smooth_boundaries",
}

#: Parameters with no effect on the numbers.
_IGNORED = {"makeMeasurements"}

#: Parameters QuPath gives in pixels when an image has no pixel size.
_PIXEL_UNITS = {"backgroundRadius", "medianRadius", "sigma", "minArea", "maxArea", "cellExpansion"}

_COMPARTMENT = re.compile(r"^(Nucleus|Cytoplasm|Cell): DAB OD (mean|max)$")


def _parameters(text: str) -> dict[str, Any]:
    """The parameter object of a ``runPlugin`` line, a JSON object or a Groovy map."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        raise ConfigError("qupath", text[:80], "no parameter object ({...} or [...]) found")
    body = text[start : max(text.rfind("}"), text.rfind("]")) + 1]
    if body.startswith("["):  # a Groovy map: ['key': value, ...]
        body = "{" + body[1:-1].replace("'", '"').strip().rstrip(",") + "}"
    try:
        params = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ConfigError("qupath", body[:80], f"not a JSON object or Groovy map: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError("qupath", body[:80], "not a parameter object")
    return params


def _value(value: Any) -> str:
    """``value`` as the JSON an override holds."""
    return json.dumps(value)


def qupath_overrides(text: str) -> list[str]:
    """``key=value`` settings overrides that run QuPath's protocol in ``text`` (see the module)."""
    params = _parameters(text)
    out = ['nuclei.method="qupath"', "nuclei.adaptive_threshold=false"]
    thresholds: dict[int, float] = {}
    single: bool | None = None
    for key, value in params.items():
        if key in _DIRECT:
            out.append(f"{_DIRECT[key]}={_value(value)}")
        elif key in ("detectionImageBrightfield", "detectionImage"):
            if value not in _DETECTION_IMAGES:
                raise ConfigError(f"qupath.{key}", value, f"choose from {', '.join(_DETECTION_IMAGES)}")
            out.append(f'nuclei.detection_image="{_DETECTION_IMAGES[value]}"')
        elif key == "thresholdCompartment":
            match = _COMPARTMENT.match(str(value))
            if not match:
                raise ConfigError(f"qupath.{key}", value, "expected 'Nucleus|Cytoplasm|Cell: DAB OD mean|max'")
            out.append(f'intensity.compartment="{match.group(1).lower()}"')
            out.append(f'intensity.statistic="{match.group(2)}"')
        elif key in ("thresholdPositive1", "thresholdPositive2", "thresholdPositive3"):
            thresholds[int(key[-1])] = float(value)
        elif key == "singleThreshold":
            single = bool(value)
        elif key in _PIXEL_UNITS:
            raise ConfigError(f"qupath.{key}", value, f"in pixels; give {key}Microns (the image's µm/px is needed)")
        elif key not in _IGNORED:
            raise ConfigError(f"qupath.{key}", value, "not a Positive cell detection parameter")
    if single and 1 in thresholds:
        out.append(f"intensity.single_threshold={thresholds[1]!r}")
    elif thresholds:
        if single is None and len(thresholds) == 1:
            out.append(f"intensity.single_threshold={thresholds[1]!r}")
        elif len(thresholds) == 3:
            out.append(f"intensity.thresholds=[{thresholds[1]!r}, {thresholds[2]!r}, {thresholds[3]!r}]")
            out.append("intensity.single_threshold=null")
        else:
            raise ConfigError("qupath.thresholdPositive", thresholds, "give all three thresholds, or singleThreshold")
    return out
