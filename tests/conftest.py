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


@pytest.fixture(scope="session", autouse=True)
def native_library():
    """The native library compiled (or found in the kernel cache) once, before any test runs: on a
    fresh machine the first load compiles for several seconds, which must not land inside a test
    that bounds its own time (tests/fuzz). Tests of the kernel cache clear and rebuild it themselves."""
    from llmc.kernels.cpu import native
    return native.library()


# Golden artifacts built once per session and shared read-only: a test that alters one copies it.


@pytest.fixture(scope="session")
def stories_engine(tmp_path_factory):
    """golden/stories260K compiled for the cpu target."""
    from llmc.compiler import compile
    out = tmp_path_factory.mktemp("stories-engine") / "stories.engine"
    compile(STORIES, out)
    return out


@pytest.fixture(scope="session")
def quantized_stories(tmp_path_factory):
    """golden/stories260K quantized with a recipe, once per recipe in the session:
    `quantized_stories(recipe) -> (path, QuantizeResult)`. Read-only: a test that alters one copies it."""
    from llmc.quantizer import quantize_checkpoint
    done: dict = {}

    def get(recipe):
        key = repr(recipe)
        if key not in done:
            out = tmp_path_factory.mktemp("stories-quantized") / recipe.scheme.name
            done[key] = (out, quantize_checkpoint(STORIES, out, recipe))
        return done[key]
    return get


def rtn(scheme: str, **overrides):
    """The RTN recipe of a scheme, with resolve_scheme's overrides (group_size, symmetric)."""
    from llmc.quantized.scheme import QuantRecipe, resolve_scheme
    return QuantRecipe(scheme=resolve_scheme(scheme, **overrides))


@pytest.fixture(scope="session")
def stories_w4a16(quantized_stories):
    """golden/stories260K quantized w4a16 RTN in groups of 32."""
    return quantized_stories(rtn("w4a16", group_size=32))[0]


@pytest.fixture(scope="session")
def stories_w8a16(quantized_stories):
    """golden/stories260K quantized w8a16 RTN."""
    return quantized_stories(rtn("w8a16"))[0]
