"""Hostile input, round 3 (issue 19's "cases nobody listed"): each case runs the CLI in a fresh folder.

Usage: python scripts/hostile_cases.py [--root DIR] [CASE ...]   (default root: /tmp/hostile-cases)

Prints one JSON line per case (exit code, the last stderr lines, anything changed in the case's folder
outside its artifacts and HF cache, seconds) and appends it to <root>/results.jsonl. Offline
(HF_HUB_OFFLINE=1); the tiny sources are generated into <root>/src on first use. A few cases build the
tiny VAE decoder (~20 s each); the rest stop at load or plan. The CLI tests that keep each misbehaving
class fixed are tests/test_hostile_round3.py; this script is how the classes were found.
"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path

MAIN = Path(__file__).resolve().parent.parent
_args = sys.argv[1:]
ROOT = Path(_args[_args.index("--root") + 1]) if "--root" in _args else Path("/tmp/hostile-cases")
if "--root" in _args:
    del _args[_args.index("--root"):_args.index("--root") + 2]
PY = sys.executable
SRC = ROOT / "src"
if not (SRC / "tiny-sdxl-base").exists():
    sys.path.insert(0, str(MAIN))
    from convert.testing import generate
    for g in ("tiny-sdxl-base", "tiny-sdxl-vae-fp16-fix", "tiny-sdxl-single-file", "tiny-sdxl-lora"):
        generate(g, SRC / g)
BASE = SRC / "tiny-sdxl-base"
OFF = "{export: false}"
CHEAP = ("components:\n" + "".join(f"  {c}: {OFF}\n" for c in ("text_encoder", "text_encoder_2", "unet", "tokenizer", "tokenizer_2", "vae_encoder"))
         + "  vae_decoder: {weights: fp16}\ntarget: {device: CPU, inference_precision: [f32]}\n"
         "validation: {resolution: 64, small_resolution: 32, denoise_steps: 0, components: [vae_decoder], end_to_end: {prompts: []}}\n")

def tree(root, skip):
    out = {}
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        st = p.lstat(); out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out

def case(name, body=None, args=("convert", "{recipe}"), env=None, prep=None, files=None, timeout=600):
    d = ROOT / "cases" / name
    shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
    recipe = d / "r.yaml"
    if body is not None:
        recipe.write_text(body if body.startswith("schema_version") or body.startswith("\ufeff") or body.startswith("-") else f"schema_version: 1\nname: r\n{body}")
    if prep: prep(d)
    art = d / "art"
    argv = [a.format(recipe=recipe, d=d, art=art) for a in args]
    skip = (art, d / "hf")
    before = tree(d, skip)
    t = time.monotonic()
    e = {**os.environ, "HF_HOME": str(d / "hf"), "HF_HUB_OFFLINE": "1", **(env or {})}
    try:
        p = subprocess.run([PY, "-m", "convert", "--artifacts", str(art), *argv], capture_output=True, text=True, timeout=timeout, cwd=MAIN, env=e)
        rc, err = p.returncode, [l for l in p.stderr.splitlines() if l.strip() and "Processor" not in l and "Multiple distributions" not in l]
    except subprocess.TimeoutExpired:
        rc, err = "TIMEOUT", []
    after = tree(d, skip)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    res = {"case": name, "rc": rc, "lines": len(err), "err": err[-3:], "outside_changed": changed[:3], "s": round(time.monotonic() - t, 1)}
    print(json.dumps(res), flush=True)
    with open(ROOT / "results.jsonl", "a") as f: f.write(json.dumps(res) + "\n")

B = f"base: {{local: {{path: {BASE}}}}}\n"
which = _args or None
CASES = {}
def c(name, *a, **k): CASES[name] = (a, k)

c("lora-scale-zero", B + "lora: [{source: {local: {path: " + str(SRC/"tiny-sdxl-lora") + "}, file: tiny-sdxl-lora-kohya.safetensors}, scale: 0, targets: [unet]}]\n" + CHEAP, args=("convert", "{recipe}", "--plan"))
c("lora-targets-empty", B + "lora: [{source: {local: {path: " + str(SRC/"tiny-sdxl-lora") + "}, file: tiny-sdxl-lora-kohya.safetensors}, scale: 1, targets: []}]\n", args=("convert", "{recipe}", "--plan"))
c("lora-same-twice", B + "lora:\n" + "".join("  - {source: {local: {path: " + str(SRC/"tiny-sdxl-lora") + "}, file: tiny-sdxl-lora-kohya.safetensors}, scale: 1, targets: [unet]}\n" for _ in range(2)), args=("convert", "{recipe}", "--plan"))
c("images-empty", B + "validation: {images: []}\n", args=("convert", "{recipe}", "--plan"))
c("small-res-above-res", B + "validation: {resolution: 64, small_resolution: 128}\n", args=("convert", "{recipe}", "--plan"))
c("precision-empty", B + "target: {device: CPU, inference_precision: []}\n", args=("convert", "{recipe}", "--plan"))
c("device-lowercase", B + "target: {device: gpu}\n", args=("convert", "{recipe}", "--plan"))
c("device-npu", B + "target: {device: NPU}\n", args=("convert", "{recipe}", "--plan"))
c("device-gpu1", B + "target: {device: GPU.1}\n", args=("convert", "{recipe}", "--plan"))
c("all-export-off", B + "components:\n" + "".join(f"  {x}: {OFF}\n" for x in ("text_encoder", "text_encoder_2", "unet", "tokenizer", "tokenizer_2", "vae_encoder", "vae_decoder")))
c("int4-with-int8-mode", B + "components: {unet: {weights: int4, nncf: {mode: int8_asym}}}\n", args=("convert", "{recipe}", "--plan"))
c("top-level-list", "- a\n- b\n", args=("convert", "{recipe}", "--plan"))
c("bom", "\ufeffschema_version: 1\nname: r\n" + B, args=("convert", "{recipe}", "--plan"))
c("schema-version-string", "schema_version: '1'\nname: r\n" + B, args=("convert", "{recipe}", "--plan"))
c("name-mismatch-file", "schema_version: 1\nname: other\n" + B, args=("convert", "{recipe}", "--plan"))
c("local-path-dev", "base: {local: {path: /dev}}\n", args=("convert", "{recipe}", "--plan"))
c("local-path-proc", "base: {local: {path: /proc/self}}\n", args=("convert", "{recipe}", "--plan"))
def evil_index(d):
    shutil.copytree(BASE, d / "base", symlinks=True)
    mi = json.loads((d / "base/model_index.json").read_text()); mi["unet"] = ["subprocess", "Popen"]
    (d / "base/model_index.json").write_text(json.dumps(mi))
c("model-index-foreign-library", "base: {local: {path: ./base}}\n" + CHEAP, prep=evil_index)
def huge_config(d):
    shutil.copytree(BASE, d / "base", symlinks=True)
    cfg = json.loads((d / "base/unet/config.json").read_text()); cfg["block_out_channels"] = [1000000000, 1000000000, 1000000000]
    (d / "base/unet/config.json").write_text(json.dumps(cfg))
c("unet-config-giant", "base: {local: {path: ./base}}\n" + "target: {device: CPU, inference_precision: [f32]}\nvalidation: {resolution: 64, small_resolution: 32, denoise_steps: 0}\n", prep=huge_config)
def no_sched(d):
    shutil.copytree(BASE, d / "base", symlinks=True); shutil.rmtree(d / "base/scheduler")
c("no-scheduler-folder", "base: {local: {path: ./base}}\n" + CHEAP, prep=no_sched)
def no_vocab(d):
    shutil.copytree(BASE, d / "base", symlinks=True); (d / "base/tokenizer/tokenizer.json").unlink()
c("tokenizer-vocab-missing", "base: {local: {path: ./base}}\ntarget: {device: CPU, inference_precision: [f32]}\nvalidation: {resolution: 64, small_resolution: 32, denoise_steps: 0}\n", prep=no_vocab)
c("lora-is-full-checkpoint", B + "lora: [{source: {local: {path: " + str(SRC/"tiny-sdxl-single-file") + "}, file: tiny-sdxl.safetensors}, scale: 1, targets: [unet]}]\n" + CHEAP)
def pickle_named_st(d):
    import torch; (d / "sf").mkdir(); torch.save({"a": torch.zeros(1)}, d / "sf/x.safetensors")
c("pickle-named-safetensors", "base: {local: {path: ./sf}, file: x.safetensors, config: {local: {path: " + str(BASE) + "}}}\n", prep=pickle_named_st)
c("file-traversal", "base: {local: {path: ./}, file: ../x.safetensors}\n", args=("convert", "{recipe}", "--plan"))
def art_in_source(d):
    shutil.copytree(BASE, d / "base", symlinks=True)
c("artifacts-inside-source", "base: {local: {path: ./base}}\n" + CHEAP, args=("--artifacts", "{d}/base/out", "convert", "{recipe}"), prep=art_in_source)
c("cache-equals-artifacts", B + CHEAP, args=("--cache", "{art}", "convert", "{recipe}"))
c("memory-gib-tiny", B, args=("convert", "{recipe}"), env={"SDXL_CONVERT_MEMORY_GIB": "0.5"})
c("memory-gib-negative", B, args=("convert", "{recipe}", "--plan"), env={"SDXL_CONVERT_MEMORY_GIB": "-1"})
c("hf-endpoint-garbage", "base: {hub: {repo: a/b, revision: main}}\n", args=("convert", "{recipe}", "--plan"), env={"HF_ENDPOINT": "not a url", "HF_HUB_OFFLINE": "0"})
c("max-non-finite-negative", B + "validation: {max_non_finite: -1}\n", args=("convert", "{recipe}", "--plan"))
c("int4-ratio-1.5", B + "components: {unet: {weights: int4, nncf: {ratio: 1.5}}}\n", args=("convert", "{recipe}", "--plan"))
c("int4-ratio-0", B + "components: {unet: {weights: int4, nncf: {ratio: 0}}}\n", args=("convert", "{recipe}", "--plan"))
c("nul-in-path-arg", None, args=("convert", "r\x01.yaml", "--plan"))
c("very-long-path", None, args=("convert", "/" + "a" * 5000 + ".yaml", "--plan"))
c("plan-and-force", B, args=("convert", "{recipe}", "--plan", "--force"))
c("rebuild-same-path-twice", B + "publish: {repo: me/x}\n", args=("rebuild", "{recipe}", "{recipe}"))
c("lock-generated-only", "base: {generated: {generator: tiny-sdxl-base}}\n", args=("lock", "{recipe}"))
def ro_folder(d):
    (d / "ro").mkdir(); (d / "ro/r.yaml").write_text(f"schema_version: 1\nname: r\n{B}"); os.chmod(d / "ro", 0o555)
c("lock-in-read-only-folder", None, args=("lock", "{d}/ro/r.yaml"), prep=ro_folder)
def foreign_lock(d):
    (d / "r.lock.json").write_text(json.dumps({"recipe": "someone-else", "sources": [], "tools": {}}))
c("lock-of-another-recipe", B, args=("convert", "{recipe}", "--locked", "--plan"), prep=foreign_lock)
c("min-psnr-huge", B + CHEAP.replace("denoise_steps: 0,", "denoise_steps: 0, min_psnr_db: 1000,"))
c("verify-not-a-bundle", None, args=("verify", "{d}"))
c("publish-dry-run-not-a-bundle", None, args=("publish", "{d}", "--dry-run"))
c("recipe-is-yaml-bomb-of-anchors-in-keys", "schema_version: 1\nname: r\n? &a [x]\n: 1\n", args=("convert", "{recipe}", "--plan"))
c("scheduler-class-not-a-scheduler", B + "scheduler: {class_name: UNet2DConditionModel}\n", args=("convert", "{recipe}", "--plan"))
c("scheduler-class-dunder", B + "scheduler: {class_name: __class__}\n", args=("convert", "{recipe}", "--plan"))
c("generator-seed-negative", "base: {generated: {generator: tiny-sdxl-base, seed: -1}}\n", args=("convert", "{recipe}", "--plan"))
c("substitution-of-unknown", B + "substitutions: {vae_decoder: {source: {local: {path: " + str(SRC/"tiny-sdxl-vae-fp16-fix") + "}}, reason: x}}\n", args=("convert", "{recipe}", "--plan"))
c("substitution-vae-is-base-folder", B + "substitutions: {vae: {source: {local: {path: " + str(BASE) + "}}, reason: x}}\n" + CHEAP)

c("local-path-dev-convert", "base: {local: {path: /dev}}\n")
c("small-res-above-res-convert", B + CHEAP.replace("resolution: 64, small_resolution: 32", "resolution: 64, small_resolution: 128"))
c("hf-endpoint-garbage-convert", "base: {hub: {repo: a/b, revision: main}}\n", env={"HF_ENDPOINT": "not a url", "HF_HUB_OFFLINE": "0"})
c("rebuild-same-path-twice-json", B + "publish: {repo: me/x}\n", args=("--json", "rebuild", "{recipe}", "{recipe}"))
c("lock-of-another-recipe-convert", B, args=("convert", "{recipe}", "--locked"), prep=foreign_lock)
def _bundle() -> Path:
    found = list((ROOT / "cases/model-index-foreign-library/art/r").glob("*/manifest.json"))
    if not found:  # the case that builds one
        case("model-index-foreign-library", *CASES["model-index-foreign-library"][0], **CASES["model-index-foreign-library"][1])
        found = list((ROOT / "cases/model-index-foreign-library/art/r").glob("*/manifest.json"))
    return found[0].parent
def bundle_copy(d, tamper):
    BUNDLE = _bundle()
    shutil.copytree(BUNDLE, d / "b", symlinks=True); tamper(d / "b")
def extra_file(b): (b / "vae_decoder" / "stray.bin").write_bytes(b"x")
def symlinked(b):
    f = b / "vae_decoder" / "openvino_model.bin"; t = b.parent / "elsewhere.bin"; shutil.copyfile(f, t); f.unlink(); f.symlink_to(t)
def dup_manifest(b):
    m = json.loads((b / "manifest.json").read_text()); files = m["files"]
    if isinstance(files, list): files.append(dict(files[0]))
    (b / "manifest.json").write_text(json.dumps(m))
def broken_copy(d):
    if not (ROOT / "cases/min-psnr-huge/art/broken").is_dir():
        case("min-psnr-huge", *CASES["min-psnr-huge"][0], **CASES["min-psnr-huge"][1])
    src = next((ROOT / "cases/min-psnr-huge/art/broken").iterdir()); shutil.copytree(src, d / "b", symlinks=True)
c("verify-extra-file", None, args=("verify", "{d}/b"), prep=lambda d: bundle_copy(d, extra_file))
c("verify-symlinked-file", None, args=("verify", "{d}/b"), prep=lambda d: bundle_copy(d, symlinked))
c("verify-duplicate-manifest-entry", None, args=("verify", "{d}/b"), prep=lambda d: bundle_copy(d, dup_manifest))
c("publish-dry-run-broken-bundle", None, args=("publish", "{d}/b", "--dry-run"), prep=broken_copy)
c("cache-env-is-file", B, args=("convert", "{recipe}"), env={"SDXL_CONVERT_CACHE": "/etc/hostname"})
def unicode_name(d): (d / "récipe ü.yaml").write_text(f"schema_version: 1\nname: r\n{B}")
c("unicode-recipe-path", None, args=("convert", "{d}/récipe ü.yaml", "--plan"), prep=unicode_name)
c("crlf-recipe", ("schema_version: 1\nname: r\n" + B).replace("\n", "\r\n"), args=("convert", "{recipe}", "--plan"))
c("tab-indented-recipe", "schema_version: 1\nname: r\nbase:\n\tlocal: {path: x}\n", args=("convert", "{recipe}", "--plan"))
c("images-duplicate", B + "validation: {images: [astronaut, astronaut]}\n", args=("convert", "{recipe}", "--plan"))
c("bf16-on-gpu", B + "target: {device: GPU, inference_precision: [bf16]}\n", args=("convert", "{recipe}", "--plan"))
c("precision-hint-conflict", B + "target: {device: CPU, inference_precision: [f32]}\ncomponents: {unet: {runtime_options: {INFERENCE_PRECISION_HINT: f16}}}\n", args=("convert", "{recipe}", "--plan"))
c("tokenizer-weights-int8", B + "components: {tokenizer: {weights: int8}}\n", args=("convert", "{recipe}", "--plan"))
c("lora-target-twice", B + "lora: [{source: {local: {path: " + str(SRC/"tiny-sdxl-lora") + "}, file: tiny-sdxl-lora-kohya.safetensors}, targets: [unet, unet]}]\n", args=("convert", "{recipe}", "--plan"))
c("publish-private-string", B + "publish: {repo: me/x, private: 'yes please'}\n", args=("convert", "{recipe}", "--plan"))
c("prompt-empty", B + "validation: {end_to_end: {prompts: ['']}}\n", args=("convert", "{recipe}", "--plan"))

for name, (a, k) in CASES.items():
    if which is None or name in which:
        case(name, *a, **k)
