"""Presets, training and evaluation loops, run directories, plots."""
