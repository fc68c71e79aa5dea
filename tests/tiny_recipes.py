"""Each registered family's tiny recipe (offline generator, the whole gate), built once per pytest session.

Its own module: importing `tests.conftest` from a test module would run conftest a second time under
another name and start a second Hub server that the environment then points at.
"""

TINY_RECIPES = {
    "stable-diffusion-xl": "tiny-sdxl-fp16fix",
    "stable-diffusion-xl-refiner": "tiny-sdxl-refiner",
    "stable-diffusion-3": "tiny-sd35-medium",
    "stable-diffusion-v1": "tiny-sd15",
    "latent-consistency-model": "tiny-sd15-lcm",
}

#: The test files that read a session build (`family_build`, `tiny_build`). tests/conftest.py schedules them as one
#: pytest-xdist scope, so each family is built once per run, not once in each worker that meets it;
#: test_family_contract.py fails if a file reads a session build without being listed here.
FAMILY_BUILD_FILES = frozenset({
    "test_build_info.py", "test_build_tiny.py", "test_family_contract.py", "test_gate_guidance.py", "test_headline.py",
    "test_hostile_recipe.py", "test_sd15.py", "test_sd3.py", "test_sdxl_refiner.py",
})
