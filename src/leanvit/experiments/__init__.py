"""Experiment runners built on the library: the side-by-side comparison of methods (``leanvit compare``)."""
