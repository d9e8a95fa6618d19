"""The command line. Importing it sets OpenMP's idle threads to sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``,
unless the user set a policy), before torch loads OpenMP: on a machine whose cores are busy, spinning threads made a
float64 SVD 30x slower at the default thread count, and passive waiting cost nothing measurable on an idle machine
(``bench/results/scan_threads_cpu.json``)."""
import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
