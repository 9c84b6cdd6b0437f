"""Image analysis and scoring. Depends only on :mod:`config` and the slide interface."""
