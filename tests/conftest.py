"""Session wiring for all tests: a local Hub, an isolated HF cache and a network guard.

Why at import time: huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET, ...
once, when it is first imported (URL templates are built then), and diffusers/transformers
import it. So the server starts and the environment is set here, before any test module
can import those libraries.

Markers: ``hub`` (talks to the local Hub) and ``slow`` (full-size shapes, benchmarks). Slow
tests are skipped unless selected explicitly with ``-m slow`` (or any -m expression naming
it) or ``RUN_SLOW=1``.

Network guard: pytest-socket restricts ``socket.connect`` to 127.0.0.1/localhost (and Unix
sockets, which cannot leave the machine) for every test, unless ``--allow-hosts`` is given
or a test opts out with pytest-socket's ``enable_socket`` marker. The server thread only
binds and accepts, which the guard does not touch.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if "huggingface_hub" in sys.modules:
    raise RuntimeError(
        "huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT; its endpoint is frozen "
        "to the real Hub. Import it lazily in plugins and root conftest files."
    )

try:  # tests/ may or may not become a package; support both import modes
    from .hub_server import DEFAULT_USER, HubServer
    from .tiny_recipes import FAMILY_BUILD_FILES
except ImportError:
    from hub_server import DEFAULT_USER, HubServer
    from tiny_recipes import FAMILY_BUILD_FILES

HF_TEST_TOKEN = "hf_dummy_test_token"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "::1"]

SESSION_DIR = Path(tempfile.mkdtemp(prefix="sdxl-ov-tests-"))
HUB_SERVER = HubServer(root=SESSION_DIR / "hub")
HUB_SERVER.start()
os.environ.pop("SDXL_CONVERT_CACHE", None)  # a developer's component cache must not leak into (or from) tests

# A home of the session's own, holding OpenVINO's telemetry opt-out (the file `opt_in_out --opt_out` writes;
# NNCF and ov.convert_model read it from $HOME): by default they send usage events, each from a freshly
# forked copy of the test process (~270 forks in one tiny build, all refused by the network guard below).
# Measured on 3 gate test files: 140 s -> 97 s (sys 52 s -> 15 s). It also keeps the client id and stats
# files they write out of the developer's home.
SESSION_HOME = SESSION_DIR / "home"
(SESSION_HOME / "intel").mkdir(parents=True)
(SESSION_HOME / "intel" / "openvino_telemetry").write_text("0")
os.environ["HOME"] = str(SESSION_HOME)
# torch's OpenMP threads spin for a while after each parallel region (libgomp's default); with one xdist worker
# per core that spinning takes the core from the other worker (libgomp was ~10 % of all samples). Set before
# torch is imported (libgomp reads it once). Same 3 gate files: 97 s -> 90 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _shutdown() -> None:
    HUB_SERVER.stop()
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


atexit.register(_shutdown)

for _name in ("HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE", "HUGGINGFACE_CO_STAGING",
              "HF_HUB_ENABLE_HF_TRANSFER", "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH"):
    os.environ.pop(_name, None)  # legacy or overriding variables from a developer's shell
os.environ.update(
    {
        "HF_ENDPOINT": HUB_SERVER.url,
        "HF_HOME": str(SESSION_DIR / "hf-home"),
        "HF_HUB_CACHE": str(SESSION_DIR / "hf-home" / "hub"),
        "HF_TOKEN": HF_TEST_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "0",
    }
)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Register markers; default pytest-socket's allow-list before pytest-socket reads its options."""
    config.addinivalue_line("markers", "hub: talks to the local Hub-compatible test server")
    config.addinivalue_line("markers", "slow: full-size or long-running; opt in with -m slow or RUN_SLOW=1")
    config.addinivalue_line("markers", "signals: sends a real signal to the test process (run first)")
    if hasattr(config.option, "allow_hosts") and not config.option.allow_hosts:
        config.option.allow_hosts = ",".join(ALLOWED_HOSTS)
        config.option.allow_unix_socket = True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the ``signals`` tests first; skip ``slow`` tests unless asked for by marker expression or RUN_SLOW=1.

    The signals tests send a real SIGTERM/SIGHUP to this process. Run after ~180 other tests (the family
    contract's builds among them) the process died of SIGSEGV at that moment, reproducibly (3 full runs on
    2026-12-07, not diagnosed); first, they pass. Under pytest-xdist (`--dist loadfile`, the default in
    pyproject.toml) files are handed out in this order, so their file goes first to a fresh worker.
    """
    items.sort(key=lambda item: item.get_closest_marker("signals") is None)  # stable: the rest keep their order
    if os.environ.get("RUN_SLOW") == "1" or re.search(r"\bslow\b", config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow test: run with -m slow or RUN_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Exempt what every test process holds for its whole life from the cyclic garbage collector.

    The build calls `gc.collect()` between heavy steps (convert/memory.py) and Python runs full
    collections on its own; each walks every tracked object, ~0.25 s per walk once torch, diffusers,
    OpenVINO and NNCF are imported (500k objects), ~20 walks per tiny build. The test modules, the
    libraries a build imports lazily and the collected items live as long as the process, so they are
    collected once and frozen here (`gc.freeze`): later walks see only what the tests create, which is
    still collected as before. Importing the build's libraries here costs a run of cheap tests alone
    (recipes, CLI) ~2-3 s; every worker of the full suite imports them anyway. Importing them only where
    collection brought torch in would miss the build-heavy files (test_gate.py collects without torch).
    """
    import gc

    import diffusers  # noqa: F401  (imported by every build; the pipelines' modules load lazily)
    import nncf  # noqa: F401
    import openvino  # noqa: F401
    import optimum.intel  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import StableDiffusionXLPipeline  # noqa: F401

    gc.collect()
    gc.freeze()


def pytest_xdist_make_scheduler(config: pytest.Config, log):  # type: ignore[no-untyped-def]
    """`--dist loadfile` (pyproject.toml's default), except that the files reading a family's session build are one
    scope (`FAMILY_BUILD_FILES`), so each family is built once per run, not in both workers (the SDXL and SD3 tiny
    builds were made twice, ~50 and ~30 s). `--dist loadgroup` with marks would say this, but with pytest 9.2 and
    pytest-xdist 3.8 it hands out single tests (xdist tags `item._nodeid`, which pytest 9.2 no longer reads)."""
    if config.getvalue("dist") != "loadfile":
        return None  # another --dist asked for: xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling

    class SharedFamilyBuilds(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "family builds" if Path(file).name in FAMILY_BUILD_FILES else file

    return SharedFamilyBuilds(config, log)


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The session's Hub; repo names are shared, so create repos with unique ids (see ``new_repo_id``)."""
    return HUB_SERVER


@pytest.fixture
def hf_api(hub_server: HubServer):  # -> huggingface_hub.HfApi (imported lazily, see module docstring)
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_server.url, token=HF_TEST_TOKEN)


@pytest.fixture
def new_repo_id(request: pytest.FixtureRequest) -> str:
    """A repo id no other test uses (not created): ``test-user/<test name>-<random>``."""
    stem = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name).strip("-")[:60]
    return f"{DEFAULT_USER}/{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh HF hub cache per test, so no test sees another's downloads or a user's cache.

    huggingface_hub reads ``constants.HF_HUB_CACHE`` at call time (transformers and diffusers go
    through it), so patching the constant works after import; the env var covers subprocesses.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    yield cache


# ----------------------------------------------------------------------------- shared builds
# A tiny convert costs about a minute and a half here: build the embedded default once per
# session and share it. Generated sources live in the session's artifacts/sources and are
# reused by every test that builds from a `generated:` source.


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def family_build(artifacts_root: Path):  # -> Callable[[str], convert.build.BuildResult]
    """`family_build(name)`: the family's tiny recipe built once per session (a dozen full tiny builds
    made the suite 15 minutes long); tests that only read the bundle share it."""
    from convert.build import build
    from convert.workspace import PROJECT_ROOT, Workspace

    try:
        from .tiny_recipes import TINY_RECIPES
    except ImportError:
        from tiny_recipes import TINY_RECIPES  # type: ignore[no-redef]
    built: dict[str, object] = {}

    def get(family: str):  # type: ignore[no-untyped-def]
        if family not in built:
            built[family] = build(PROJECT_ROOT / "recipes" / f"{TINY_RECIPES[family]}.yaml",
                                  Workspace(artifacts=artifacts_root))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_build(family_build):  # -> convert.build.BuildResult
    return family_build("stable-diffusion-xl")


@pytest.fixture(scope="session")
def tiny_sources(artifacts_root: Path) -> dict[str, Path]:
    """The generated tiny pipeline and its FP16-fixed VAE as folders (diffusers layout)."""
    from convert.recipe import GeneratedSource, Source
    from convert.resolve import materialize_generated
    from convert.workspace import Workspace

    workspace = Workspace(artifacts=artifacts_root)
    return {
        name: materialize_generated(Source(generated=GeneratedSource(generator=name, seed=0)), workspace)
        for name in ("tiny-sdxl-base", "tiny-sdxl-vae-fp16-fix")
    }
