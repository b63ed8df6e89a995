"""neuralmaps.geo."""
