"""Checkpoints shipped with the package (`SNAP.from_pretrained`); see MODEL_CARD.md."""
