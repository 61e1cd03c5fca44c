"""Test-wide settings. Hypothesis runs a bounded number of examples by default (CI); the long
fuzz run is `pytest tests/fuzz --hypothesis-profile=long`."""
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
