"""How long OpenMP's idle threads spin before they sleep, set before torch loads libgomp (which reads it once).

A server's engine step is hundreds of short parallel regions (oneDNN matmuls, the C kernels) with Python
between them. libgomp's default spin (GOMP_SPINCOUNT 300,000, a few milliseconds) lets its threads fall
asleep in those gaps once the HTTP thread and the clients also want the CPU, and every wake-up delays the
next region: SmolLM2 in bf16 over HTTP (16 streaming clients, 2 vCPU AMD EPYC) made 280 tokens/s, and 398
with 10,000,000 spins (about 0.15 s of spinning after the engine goes idle; 3M: 334, 30M: 401, 100M: 342).
The entry points import this module first; a GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
torchrun's ranks run one OpenMP thread each (its OMP_NUM_THREADS=1), which never spins.
"""

import os

SPINCOUNT = "10000000"

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
