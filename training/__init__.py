"""Command-line front ends for training and evaluation (`python -m training.train`, `python -m training.evaluate`)."""
