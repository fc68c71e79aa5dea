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
