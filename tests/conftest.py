"""Hypothesis profiles: ``ci`` (default, small and fast on a 2-core CPU), ``large`` (on demand:
``HYPOTHESIS_PROFILE=large`` or ``make test-large``)."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("large", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The files that take longest, collected first: `make test` hands whole files to its processes in collection
# order (`--dist loadfile --no-loadscope-reorder`), so the run does not end waiting on a long file started last.
SLOW_FIRST = ("test_sound_lifting.py", "test_state_machine.py", "test_hf.py", "test_moba_lift.py", "test_compile.py",
              "test_backward.py", "test_hf_block_experts.py", "test_compiled_moe.py", "test_hf_sweep.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: each file's order kept
