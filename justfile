# Every recipe sets up (or reuses) the project's virtualenv first, so the README's
# one-liners work on a fresh machine. Install order matters; see `setup`.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
bin := venv / "bin"

# list recipes
default:
    @just --list

# create/reuse .venv and install pinned dependencies (CPU torch first, no torchvision)
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    cd "{{justfile_directory()}}"
    key=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
    stamp="{{venv}}/.installed-$key"
    if [ -f "$stamp" ]; then exit 0; fi
    echo "setting up {{venv}} (first run: a few minutes)" >&2
    [ -x "{{bin}}/python" ] || python3 -m venv "{{venv}}"
    "{{bin}}/python" -m pip install -q --upgrade pip
    # 1. the CPU torch wheel, alone: any open torch requirement would pull a multi-GB CUDA build
    "{{bin}}/python" -m pip install -q torch==2.13.0
    # 2. everything else pinned, except optimum-intel (it pulls an unpinned torchvision that
    #    swaps torch for a CUDA build or fails to import beside the CPU one)
    deps=$("{{bin}}/python" scripts/deps.py --exclude optimum-intel --extra test)
    "{{bin}}/python" -m pip install -q -c constraints.txt $deps
    # 3. optimum-intel without its dependencies (all of them except torchvision are installed above)
    "{{bin}}/python" -m pip install -q -c constraints.txt --no-deps optimum-intel
    PYTHONWARNINGS=ignore "{{bin}}/python" -m pip install -q --no-deps --no-build-isolation -e .  # quiet setuptools editable-install notices
    "{{bin}}/python" scripts/deps.py --check
    rm -f "{{venv}}"/.installed-*
    touch "$stamp"

# run a recipe by name (recipes/NAME.yaml) or path; extra flags: --plan, --json, --force, --publish
convert recipe *flags: setup
    "{{bin}}/sdxl-convert" convert {{recipe}} {{flags}}

# print what a recipe would do, without downloading anything
plan recipe: setup
    "{{bin}}/sdxl-convert" convert {{recipe}} --plan

# upload a validated bundle to the Hub (flags: --repo, --dry-run)
publish bundle *flags: setup
    "{{bin}}/sdxl-convert" publish {{bundle}} {{flags}}

# check a bundle against its manifest
verify bundle: setup
    "{{bin}}/sdxl-convert" verify {{bundle}}

# the test suite (fast; full-size work is only in `just bench`)
test *args: setup
    "{{bin}}/python" -m pytest {{args}}

# regenerate recipe.schema.json from the pydantic schema
schema: setup
    "{{bin}}/sdxl-convert" schema

# full-size benchmarks into BENCHMARKS.json/.md (--steps: see --help; every step ~1.5 h, up to ~23 GiB RAM (optimum-cli);
# --steps source,convert,gate,single-file,rebuild --runs ours-fp16,ours-int8: measured 29 min after the source, up to 19 GiB RAM, ~45 GiB disk);
# --input tiny: smoke run of the same steps (~6 min), --render-only: re-render BENCHMARKS.md
bench *args: setup
    "{{bin}}/python" scripts/bench.py {{args}}

# issue 21 at full size: calibrate, quantize (weights/hybrid/full) and time a UNet step and the VAE decode per
# precision on BUNDLE (an SDXL bundle with an fp16 UNet, e.g. bench-sdxl-fp16fix-fp16unet-shapes); --store writes
# the section into BENCHMARKS.json/.md
bench-quant bundle out="artifacts/bench/quant" *args: setup
    "{{bin}}/python" scripts/bench_quant.py {{bundle}} {{out}} {{args}}

# pin a recipe's sources, files and tool versions in recipes/NAME.lock.json (prints what changed)
lock recipe *flags: setup
    "{{bin}}/sdxl-convert" lock {{recipe}} {{flags}}

# rebuild recipes whose upstream, recipe or tools changed, publish and tag them (RECIPE... or --all)
rebuild *args: setup
    "{{bin}}/sdxl-convert" rebuild {{args}}

# print a recipe's component cache keys (no download); --combined for one CI cache key
cache-key recipe *flags: setup
    "{{bin}}/sdxl-convert" cache-key {{recipe}} {{flags}}
