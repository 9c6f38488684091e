"""Benchmarks. ``serving.py`` compares servers side by side; the other modules are its parts."""
