"""neuralmaps.data."""
