"""The one exception type for bad geo input."""

from __future__ import annotations


class GeoInputError(ValueError):
    """Bad input to the geo layer: the message names the file (when there is one) and what is wrong."""
