"""Command-line front ends outside the package: `python -m training.train`, `python -m training.evaluate`,
`python training/plot.py`."""
