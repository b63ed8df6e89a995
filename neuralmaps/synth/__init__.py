"""neuralmaps.synth."""
