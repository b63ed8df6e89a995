"""neuralmaps.models."""
