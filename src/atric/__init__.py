"""atric: audio-text retrieval in context."""

import os

# OpenMP threads that finish a parallel region spin-wait for the next one by default. On a
# shared machine (CI runners, tune workers, laptops) they then burn the cores the other
# processes need and wait on descheduled peers at every barrier: a 25 ms training step took
# 0.5-1.1 s beside a 2-core load. Waking a passive thread is not free either (on one 2-vCPU VM
# it doubled an idle step), which is why training leaves a core free and runs one thread
# fewer (atric.device.default_threads). It must be set before torch loads its OpenMP runtime,
# so before ``import torch``; a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
