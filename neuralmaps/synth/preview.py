"""Moved to `neuralmaps.data.preview` (previews read stores, so they live with them); this alias
keeps `neuralmaps.synth.preview` imports working."""

from ..data.preview import *  # noqa: F401,F403
from ..data.preview import __all__  # noqa: F401
