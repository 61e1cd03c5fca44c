"""Test-wide settings and shared fixtures. Hypothesis runs a bounded number of examples by default (CI); the long
fuzz run is `pytest tests/fuzz --hypothesis-profile=long`."""
import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import STORIES

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


# Golden artifacts built once per session and shared read-only: a test that alters one copies it.


@pytest.fixture(scope="session")
def stories_engine(tmp_path_factory):
    """golden/stories260K compiled for the cpu target."""
    from llmc.compiler import compile
    out = tmp_path_factory.mktemp("stories-engine") / "stories.engine"
    compile(STORIES, out)
    return out


@pytest.fixture(scope="session")
def stories_w4a16(tmp_path_factory):
    """golden/stories260K quantized w4a16 RTN in groups of 32."""
    from llmc.quantizer import quantize_checkpoint
    from llmc.quantized.scheme import QuantRecipe, resolve_scheme
    out = tmp_path_factory.mktemp("stories-w4a16") / "w4a16"
    quantize_checkpoint(STORIES, out, QuantRecipe(scheme=resolve_scheme("w4a16", group_size=32)))
    return out
