"""``python -m leanvit.ops``: this host and its host-aware constants (:mod:`leanvit.ops.host`); ``--calibrate`` times
them here, ``--clear`` forgets this host's calibration."""
from .host import main

main()
