"""Hypothesis profiles: ``ci`` (default, small and fast on a 2-core CPU), ``large`` (on demand:
``HYPOTHESIS_PROFILE=large`` or ``make test-large``).

Threads: the tests run tiny tensors, for which torch's intra-op thread pool only adds a hand-off per
op; where the pool's threads do not each have a free core (pytest-xdist runs one worker per core;
anything else running on the machine) every small op waits for a descheduled thread, and a test
takes several times as long (up to 10x on a 2-core machine). So each test process, and the examples
and scripts the tests start, uses one intra-op thread unless ``OMP_NUM_THREADS`` says otherwise."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")        # before torch is imported; inherited by subprocesses

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

try:                                                  # in case torch was imported first
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
except ValueError:                                    # a per-level list ("4,2"): OpenMP's own reading
    pass

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("large", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
