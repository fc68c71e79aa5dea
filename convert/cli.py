"""Command line: pick a recipe, call the library, render the result, set the exit code.

The only module that prints, parses arguments or configures logging. Heavy libraries
(torch, OpenVINO, optimum) are imported by the stages only when a build really runs,
so `--help`, `--plan` and recipe errors answer in about a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from convert.errors import ConvertError, InternalError, PackageError, UsageError, ValidationFailed

if TYPE_CHECKING:
    from validate.headline import Headline

EXIT_OK = 0
EXIT_USAGE = 64  # argparse-level mistakes (UsageError); errors use ConvertError.exit_code (1..8, 75)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it; SIGTERM and SIGHUP exit 128 + their number
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away

log = logging.getLogger("convert")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json, verbose = _wants_json(argv), _wants_verbose(argv)
    previous = _handle_signals()
    try:
        args = _parser().parse_args(argv)
        as_json, verbose = args.json, args.verbose
        _configure_logging(verbose, as_json)
        _check_hub_folders(os.environ)
        return int(args.func(args))
    except SystemExit as e:  # --help / --version: argparse's own exit, status 0
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    except ConvertError as e:
        return _fail(e, verbose, as_json)
    except KeyboardInterrupt as e:
        name, code = ("Terminated", 128 + e.signum) if isinstance(e, _Terminated) else ("Interrupted", EXIT_INTERRUPTED)
        message = f"{name.lower()}; nothing was published and no bundle was half-written"
        if as_json:
            print(json.dumps({"status": "error", "error": name, "message": message, "exit_code": code}))
        _console(stderr=True).print(message, highlight=False)
        return code
    except BrokenPipeError:  # `... --json | head`: whatever was done is done; say so once, on stderr
        _silence_stdout()
        _console(stderr=True).print("stdout was closed before the output was written (broken pipe)", highlight=False)
        return EXIT_BROKEN_PIPE
    except Exception as e:  # a bug (ours or a library's) still ends in one line and, with --json, a document
        if verbose:
            log.error("unexpected error", exc_info=e)
        return _fail(InternalError.of(e), False, as_json)
    finally:
        _restore_signals(previous)


def _check_hub_folders(environ: Mapping[str, str]) -> None:
    """HF_HOME / HF_HUB_CACHE naming a file made every Hub call fail as "the Hub is unreachable"."""
    for name in ("HF_HOME", "HF_HUB_CACHE"):
        value = environ.get(name)
        if value and os.path.lexists(value) and not os.path.isdir(value):
            raise UsageError(f"{name}={value!r} is not a folder", hint=f"point {name} at a folder (or unset it)")
    endpoint = environ.get("HF_ENDPOINT")
    if endpoint and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", endpoint):  # else "UnsupportedProtocol"
        raise UsageError(f"HF_ENDPOINT={endpoint[:200]!r} is not an http(s) URL",
                         hint="unset it for huggingface.co, or give e.g. http://127.0.0.1:8080")


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (tests capture it): nothing to flush there
        pass
    finally:
        os.close(devnull)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so every `finally` (staging removal, lock release) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Terminated(signum)


_CLEAN_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a closed terminal must not strand a staging folder either


def _handle_signals() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _on_signal) for sig in _CLEAN_EXIT_SIGNALS}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _global_flags(argv: list[str]) -> list[str]:
    return argv[: argv.index("--")] if "--" in argv else argv


def _wants_json(argv: list[str]) -> bool:
    """Before parsing succeeds (a usage error), --json anywhere still asks for a JSON document."""
    return "--json" in _global_flags(argv)


def _wants_verbose(argv: list[str]) -> bool:
    return any(a in ("-v", "--verbose") for a in _global_flags(argv))


def _fail(error: ConvertError, verbose: bool, as_json: bool) -> int:
    if verbose and not isinstance(error, (UsageError, InternalError)):
        log.error("failed", exc_info=error)
    if as_json:
        payload = {"status": "error", "error": type(error).__name__, "message": str(error), "exit_code": error.exit_code}
        if isinstance(error, ValidationFailed):
            payload |= {"failures": error.failures, "moved_to": str(error.path)}
        print(json.dumps(payload))
    _print_error(error)
    return error.exit_code


def _print_error(error: ConvertError) -> None:
    """One line per problem: a failed gate lists each failing check on its own line."""
    console = _console(stderr=True)
    if isinstance(error, ValidationFailed):
        console.print(f"[bold red]error:[/] validation failed; build kept for inspection in {error.path} "
                      "(never publishable)", highlight=False, soft_wrap=True)
        for failure in error.failures:
            console.print(f"  {failure}", highlight=False, soft_wrap=True, markup=False)
        return
    from rich.markup import escape  # messages quote recipe values: '[/x]' must print, not parse as markup

    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as UsageError (exit 64) instead of exiting 2, the recipe-error code."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: {message}", hint=f"see {self.prog} --help")


def _add_global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """The same flags before and after the subcommand; after it, absent flags must not reset them."""
    flag = {"action": "store_true"} if default is None else {"action": "store_true", "default": default}
    parser.add_argument("-v", "--verbose", help="debug logging and tracebacks", **flag)
    parser.add_argument("--json", help="machine-readable output on stdout (for CI)", **flag)
    parser.add_argument("--artifacts", type=Path, default=default,
                        help="output folder (default: artifacts/ of the project)")
    parser.add_argument("--cache", type=Path, default=default,
                        help="component cache folder (default: $SDXL_CONVERT_CACHE, else <artifacts>/cache)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdxl-convert", description="Convert diffusion pipelines to validated OpenVINO IR bundles from YAML recipes."
    )
    _add_global_flags(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    _add_global_flags(common, argparse.SUPPRESS)

    conv = sub.add_parser("convert", parents=[common], help="run a recipe: resolve, fetch, patch, export, validate, package")
    conv.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or path to a .yaml file")
    conv.add_argument("--plan", action="store_true", help="print the resolved plan and stop (no downloads)")
    conv.add_argument("--force", action="store_true", help="rebuild even if a bundle with this build id verifies")
    conv.add_argument("--publish", action="store_true", help="publish the bundle to the recipe's publish.repo")
    conv.add_argument("--locked", action="store_true",
                      help="build exactly what recipes/<name>.lock.json pins; fail (exit 3) if upstream differs")
    conv.set_defaults(func=_cmd_convert)

    lock = sub.add_parser("lock", parents=[common], help="pin a recipe's sources, files and tools in <recipe>.lock.json")
    lock.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or path to a .yaml file")
    lock.set_defaults(func=_cmd_lock)

    rebuild = sub.add_parser("rebuild", parents=[common],
                             help="per recipe: skip if its publish.repo holds this build, else build, publish and tag")
    rebuild.add_argument("recipes", nargs="*", metavar="RECIPE", help="recipe names or paths")
    rebuild.add_argument("--all", action="store_true", help="every recipe with a publish: section")
    rebuild.set_defaults(func=_cmd_rebuild)

    keys = sub.add_parser("cache-key", parents=[common], help="print the component cache keys of a recipe (no download)")
    keys.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or path to a .yaml file")
    keys.add_argument("--combined", action="store_true", help="print only one hash of all keys (a CI cache key)")
    keys.set_defaults(func=_cmd_cache_key)

    verify = sub.add_parser("verify", parents=[common], help="check a bundle's files against its manifest")
    verify.add_argument("bundle", type=Path)
    verify.set_defaults(func=_cmd_verify)

    schema = sub.add_parser("schema", parents=[common], help="write the recipe JSON Schema (for editor completion)")
    schema.add_argument("--output", type=Path, default=None, help="default: recipe.schema.json in the project")
    schema.set_defaults(func=_cmd_schema)

    publish = sub.add_parser("publish", parents=[common], help="upload a validated bundle to the Hub in one commit")
    publish.add_argument("bundle", type=Path)
    publish.add_argument("--repo", default=None, help="target repo id (default: the bundle recipe's publish.repo)")
    publish.add_argument("--dry-run", action="store_true", help="print what would be uploaded and stop")
    publish.set_defaults(func=_cmd_publish)
    return parser


def _configure_logging(verbose: bool, as_json: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    # our own warnings stay visible while a build sends the libraries' output to its log file
    stream = os.fdopen(os.dup(2), "w", buffering=1)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=stream, force=True)
    if not verbose:
        for noisy in ("nncf", "optimum", "transformers", "diffusers", "torch", "openvino"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, log_path=False)


def _progress_console() -> Any:
    """A console on a duplicate of the terminal's stderr: builds redirect fd 2 to their log."""
    from rich.console import Console

    return Console(file=os.fdopen(os.dup(2), "w", buffering=1), log_path=False, stderr=True)


def _workspace(args: argparse.Namespace) -> Any:
    from convert.workspace import Workspace

    artifacts = args.artifacts.resolve() if args.artifacts else Workspace.default().artifacts
    return Workspace(artifacts=artifacts, cache=args.cache.resolve() if args.cache else None)


def _recipe_path(name: str) -> Path:
    from convert.recipe import find_recipe
    from convert.workspace import recipe_search_dirs

    return find_recipe(name, recipe_search_dirs())


def _cmd_convert(args: argparse.Namespace) -> int:
    from convert import build as build_mod

    workspace = _workspace(args)
    path = _recipe_path(args.recipe)
    if args.plan:
        plan = build_mod.plan(path, workspace, locked=args.locked)
        if args.json:
            print(json.dumps(plan.to_json(), indent=2))
        else:
            _render_plan(plan)
        return EXIT_OK
    console = _progress_console()
    with console.status("starting", spinner="dots") as status:
        def progress(message: str) -> None:
            console.log(message, highlight=False)
            status.update(message)

        result = build_mod.build(path, workspace, force=args.force, progress=progress, locked=args.locked)
    published = None
    if args.publish:
        published = _publish(result.bundle, None, dry_run=False)
    if args.json:
        print(json.dumps(result.to_json() | ({"published": published} if published else {}), indent=2))
    else:
        _render_result(result, published)
    return EXIT_OK


def _cmd_lock(args: argparse.Namespace) -> int:
    from convert import build as build_mod

    path, document, changes = build_mod.lock(_recipe_path(args.recipe), _workspace(args))
    if args.json:
        print(json.dumps({"status": "ok", "lock": str(path), "changes": changes, "build_id": document["build_id"]}, indent=2))
        return EXIT_OK
    print(f"wrote {path} (build {document['build_id']})")
    for line in changes or ["unchanged"]:
        print(f"  {line}")
    return EXIT_OK


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from convert.rebuild import publishable_recipes, rebuild_one
    from convert.workspace import recipe_search_dirs

    if bool(args.recipes) == bool(args.all):
        raise UsageError("rebuild: name recipes or give --all (not both)", hint="see sdxl-convert rebuild --help")
    named = publishable_recipes(recipe_search_dirs()) if args.all else [_recipe_path(r) for r in args.recipes]
    once: dict[Path, Path] = {}
    for path in named:  # each recipe once, in the order first named
        once.setdefault(_same_file_key(path), path)
    paths = list(once.values())
    workspace = _workspace(args)
    console = _progress_console()
    outcomes = []
    for path in paths:
        console.log(f"rebuild: {path.stem}", highlight=False)
        outcomes.append(rebuild_one(path, workspace, lambda m: console.log(f"  {m}", highlight=False)))
    failed = [o for o in outcomes if o.status == "failed"]
    code = failed[0].exit_code if failed else EXIT_OK
    if args.json:
        print(json.dumps({"status": "error" if failed else "ok", "exit_code": code,
                          "recipes": [o.to_json() for o in outcomes]}, indent=2))
    else:
        _render_rebuild(outcomes)
    return code


def _same_file_key(path: Path) -> Path:
    """`recipes/x.yaml` named twice (or by name and by path) is one rebuild, not a second one that finds it up to date."""
    try:
        return path.resolve()
    except OSError:
        return path


def _render_rebuild(outcomes: list[Any]) -> None:
    from rich.markup import escape

    table = _table("recipe", "result", "what changed", "time")
    for o in outcomes:
        what = "; ".join(o.changed) if o.status == "rebuilt" else o.message
        if o.status == "rebuilt" and o.reused_components:
            what += f" (cache: {', '.join(o.reused_components)})"
        table.add_row(o.recipe, o.status, escape(what), f"{o.seconds:.1f}s")
    _console().print(table)
    for o in outcomes:
        if o.report:
            _console(stderr=True).print(f"{o.recipe}: validation report {o.report}", highlight=False, soft_wrap=True)


def _cmd_cache_key(args: argparse.Namespace) -> int:
    import hashlib

    from convert.capture import redirect_output
    from convert.component_cache import component_keys
    from convert.recipe import load_recipe
    from convert.resolve import resolve

    path = _recipe_path(args.recipe)
    workspace = _workspace(args)
    recipe = load_recipe(path)
    with redirect_output(workspace.log_file(recipe.name, "resolve")):
        keys = component_keys(resolve(recipe, path, workspace))
    combined = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:32]
    if args.json:
        print(json.dumps({"recipe": recipe.name, "key": combined, "components": keys}, indent=2))
    elif args.combined:
        print(combined)
    else:
        print("\n".join(f"{name} {key}" for name, key in keys.items()))
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from convert.package import load_bundle

    bundle = load_bundle(args.bundle)
    message = f"{bundle.path}: {len(bundle.files)} files verify (build {bundle.build_id})"
    print(json.dumps({"status": "ok", "files": len(bundle.files), "build_id": bundle.build_id}) if args.json else message)
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from convert.recipe import json_schema
    from convert.workspace import PROJECT_ROOT

    output = args.output or PROJECT_ROOT / "recipe.schema.json"
    try:
        output.write_text(json.dumps(json_schema(), indent=2) + "\n")
    except OSError as e:
        raise PackageError(f"cannot write {output}: {e.strerror}", hint="give a writable --output path") from e
    print(f"wrote {output}")
    return EXIT_OK


def _cmd_publish(args: argparse.Namespace) -> int:
    result = _publish(args.bundle, args.repo, dry_run=args.dry_run)
    print(json.dumps(result, indent=2) if args.json else _publish_line(result))
    return EXIT_OK


def _publish(bundle: Path, repo: str | None, dry_run: bool) -> dict[str, Any]:
    from convert.publish import publish

    return publish(bundle, repo=repo, dry_run=dry_run).to_json()


def _publish_line(result: dict[str, Any]) -> str:
    if result.get("dry_run"):
        lines = [f"would upload {len(result['files'])} files to {result['repo']} "
                 f"({result.get('unchanged', 0)} unchanged, {len(result.get('deleted', []))} to delete):"]
        lines += [f"  + {path}" for path in result["files"]] + [f"  - {path}" for path in result.get("deleted", [])]
        return "\n".join(lines)
    if not result.get("committed"):
        return f"{result['repo']} already holds this bundle at {result['commit']} (no new commit)"
    return f"published to {result['repo']} at {result['commit']} (tag {result['tag']})"


def _table(*headers: str, title: str | None = None) -> Any:
    """A rich table whose cells fold on a narrow terminal instead of ending in an ellipsis
    (COLUMNS=20 cut text_encoder and text_encoder_2 both to 'te…')."""
    from rich.table import Column, Table

    return Table(*(Column(h, overflow="fold") for h in headers), title=title)


def _render_plan(plan: Any) -> None:
    console = _console()
    console.print(f"[bold]Plan for {plan.recipe.name}[/] ({plan.recipe_path})")
    console.print("[bold]Sources[/]")
    from rich.markup import escape

    for s in plan.sources:
        pinned = s.commit or f"[yellow]{escape(s.note)}[/]"
        console.print(f"  {s.role}: {escape(s.source)}\n      -> {pinned}", highlight=False, soft_wrap=True)
    comps = _table("component", "weights", "runs at", "runtime options", title=f"Components (target {plan.recipe.target.device})")
    for c in plan.components:
        comps.add_row(c.name, c.weights, ", ".join(c.inference_precision) or "-",
                      ", ".join(f"{k}={v}" for k, v in c.runtime_options.items()) or "-")
    console.print(comps)
    console.print("[bold]Validation checks[/]")
    for line in plan.checks:
        console.print(f"  - {line}", highlight=False)
    console.print(f"[bold]Output[/] {plan.output}", highlight=False)
    if plan.needs is None:
        console.print("[bold]Resources[/] estimated once every source is resolved (generated sources: on the first build)")
    else:
        console.print(f"[bold]Resources[/] {plan.needs.describe()}", highlight=False)
        m = plan.machine
        free = "; ".join(f"{v / 1000**3:.1f} GB for {', '.join(u for u in m.shares if m.shares[u] == use)}"
                         for use, v in m.free.items() if m.shares[use] == use)
        console.print(f"  this machine: {m.memory / 1024**3:.1f} GiB of memory ({m.memory_source}); free disk: {free}",
                      highlight=False)
        for line in plan.needs.assumed:
            console.print(f"  assumed: {line}", highlight=False)
        for problem in plan.shortfalls:
            console.print(f"  [red]does not fit:[/] {problem}", highlight=False)


def _render_headline(console: Any, headline: Headline) -> None:
    for precision in ("f16", "bf16", "f32"):
        if precision in headline.vae:
            h, orig = headline.vae[precision], headline.original_vae.get(precision)
            extra = f"; original VAE: {orig.non_finite}/{orig.values} non-finite" if orig else ""
            console.print(f"validation {precision}: {h.non_finite}/{h.values} non-finite, "
                          f"min PSNR {h.min_psnr_db} dB{extra}", highlight=False)
    for precision, s in headline.submodels.items():
        console.print(f"submodels {precision}: {s.non_finite}/{s.values} non-finite, min cosine {s.min_cosine} "
                      f"(text encoders, denoiser on captured inputs)", highlight=False)
    for precision, e in headline.end_to_end.items():
        console.print(f"end to end {precision}: {e.non_finite}/{e.values} non-finite, min PSNR {e.min_psnr_db} "
                      f"dB, min SSIM {e.min_ssim} vs f32", highlight=False)
    for line in headline.not_checked:
        console.print(f"[yellow]not checked:[/] {line}", highlight=False)
    if headline.cpu:
        console.print(f"gate ran on: {headline.cpu}; half precision {', '.join(headline.execution) or '-'}",
                      highlight=False)


def _render_result(result: Any, published: dict[str, Any] | None) -> None:
    console = _console()
    headline = result.headline
    console.print(f"[bold]{'Reused' if result.reused else 'Built'}[/] {result.bundle}", highlight=False, soft_wrap=True)
    table = _table("component", "weights", "runs at")
    for c in result.components:
        table.add_row(c.name, c.weights, ", ".join(c.inference_precision) or "-")
    console.print(table)
    if headline is not None:
        _render_headline(console, headline)
    console.print(f"report: {result.bundle / 'validation' / 'report.md'}", highlight=False, soft_wrap=True)
    if result.reused_components:
        console.print(f"from the component cache: {', '.join(result.reused_components)}; "
                      f"exported: {', '.join(result.exported_components) or '-'}", highlight=False)
    if result.timings:
        console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()), highlight=False)
    if result.peak_rss_gib:
        console.print(f"peak memory (RSS): export {result.peak_rss_gib.get('export', 0):.2f} GiB, "
                      f"whole build {max(result.peak_rss_gib.values()):.2f} GiB"
                      + (f" (estimated {result.needs.memory / 1024**3:.1f} GiB)" if result.needs else ""), highlight=False)
    if published:
        console.print(_publish_line(published), highlight=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
