"""Imported by the tile workers' fork server, once (see :func:`pipeline.analysis.analyse`).

Importing this module scores a small synthetic region
(:func:`pipeline.analysis.warm_up`), which loads every compiled kernel into
the fork server; each worker forked from it starts with them instead of
loading them itself. OpenCV is held to one thread first: a process is only
safe to fork while it has no thread pool running (torch is not loaded here
at all). A failed warm-up is logged, not raised: the fork server must come
up, and workers then load the kernels themselves. Nothing else imports
this module.
"""

import logging

import cv2

from pipeline.analysis import warm_up

log = logging.getLogger(__name__)

cv2.setNumThreads(1)
try:
    CELLS_FOUND = warm_up()
except Exception:  # see the module docstring
    log.exception("warm-up of the compiled kernels failed; each tile worker loads them itself")
    CELLS_FOUND = 0
