"""Hypothesis settings for the property suite.

No per-example deadline and no "too slow" health check: the machines running the suite
are shared and busy, and some strategies build realistic 10-300 KB payloads on purpose.
Each test bounds its own ``max_examples`` so the whole suite stays under 20 s.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "shardgate",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("shardgate")
