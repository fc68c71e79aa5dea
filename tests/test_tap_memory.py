"""The headroom taps must not hold every tapped activation at once (issue 18).

Taps appended after a model's outputs made the CPU plugin run every ReduceMax at the end, so
each tapped tensor stayed alive through the whole graph: the full-size VAE decoder at
1024x1024 asked for 27.5 GB and a batch-2 UNet at a 128x128 latent for 36 GB. The tiny
overflow VAE decoder at a 64x64 latent (512x512) is big enough to show the growth: its taps
laid out that way cost ~6x the untapped decode's memory. Each run is its own process
(tests/tap_memory.py), because a process's peak RSS never goes down.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("tap_memory.py")
SIDE = 64  # latent side: a 512x512 decode


@pytest.fixture(scope="module")
def decoder_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import openvino as ov
    import torch

    from convert.testing.sdxl import build_overflow_vae

    vae = build_overflow_vae("tiny", 0).float().eval()

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(z).sample

    with torch.no_grad():
        model = ov.convert_model(Decode().eval(), example_input=torch.zeros(1, 4, 8, 8),
                                 input=[ov.PartialShape([-1, 4, -1, -1])])
    xml = tmp_path_factory.mktemp("tap_memory") / "vae_decoder.xml"
    ov.save_model(model, xml)
    return xml


def _growth(xml: Path, mode: str) -> float:
    done = subprocess.run([sys.executable, str(CHILD), str(xml), str(SIDE), mode],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    return float(json.loads(done.stdout.strip().splitlines()[-1])["growth_mib"])


def test_tapped_decodes_stay_near_the_untapped_one(decoder_ir: Path) -> None:
    plain = _growth(decoder_ir, "plain")
    for mode in ("maxima", "blocks"):  # the VAE checks' taps, the UNet/text-encoder gate's taps
        tapped = _growth(decoder_ir, mode)
        assert tapped <= 1.6 * plain, f"{mode}: peak grew {tapped:.0f} MiB, untapped {plain:.0f} MiB"


def test_the_size_shows_the_growth_of_taps_run_last(decoder_ir: Path) -> None:
    """The bound above is not vacuous here: the old layout goes far past it at this size."""
    plain = _growth(decoder_ir, "plain")
    assert _growth(decoder_ir, "appended") > 3 * plain
