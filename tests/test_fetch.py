"""The allow-list: what is fetched from a source, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from convert.errors import FetchError
from convert.families.sdxl import SDXL
from convert.fetch import parse_weight_name, select_files
from convert.resolve import SourceFile
from convert.roles import SourceRole

SDXL_REPO = [
    "model_index.json", "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors", "README.md", "01.png",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/flax_model.msgpack", "text_encoder/model.onnx", "text_encoder/openvino_model.xml",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_flax_model.msgpack", "unet/model.onnx", "unet/model.onnx_data",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_decoder/model.onnx", "vae_encoder/model.onnx",
]
VAE_REPO = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "sdxl_vae.safetensors", "sdxl.vae.safetensors", "README.md", "images/fp16_fix.png"]


def files(paths: list[str]) -> list[SourceFile]:
    return [SourceFile(p, 10, None) for p in paths]


def select(paths: list[str], **kw: object) -> list[str]:
    args = {"role": SourceRole.base(), "folders": list(SDXL.folders), "subfolder": None, "variant": None, "allow_pickle": False,
            "family": SDXL}
    args.update(kw)
    return [f.path for f in select_files(files(paths), **args)]  # type: ignore[arg-type]


def test_fp16_variant_of_the_sdxl_repo_selects_only_the_pipeline() -> None:
    chosen = select(SDXL_REPO, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in chosen
    assert "text_encoder_2/model.fp16.safetensors" in chosen
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in chosen
    assert not [p for p in chosen if p.endswith((".onnx", ".onnx_data", ".msgpack", ".xml", ".png", ".md"))]
    assert not [p for p in chosen if p.startswith(("sd_xl", "vae_1_0", "vae_decoder"))]  # single-file, other variants
    assert not [p for p in chosen if p.endswith(".safetensors") and ".fp16." not in p]
    assert "tokenizer_2/vocab.json" in chosen and "scheduler/scheduler_config.json" in chosen


def test_default_weights_when_no_variant_asked() -> None:
    chosen = select(SDXL_REPO)
    assert "unet/diffusion_pytorch_model.safetensors" in chosen
    assert not [p for p in chosen if ".fp16." in p]


def test_standalone_vae_repo_takes_the_diffusers_weights_only() -> None:
    chosen = select(VAE_REPO, role=SourceRole.substitution("vae"), folders=None)
    assert chosen == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_pickle_only_component_is_refused() -> None:
    repo = [p for p in SDXL_REPO if not p.startswith("unet/")] + ["unet/config.json", "unet/diffusion_pytorch_model.bin"]
    with pytest.raises(FetchError) as info:
        select(repo)
    assert "unet/ has only pickle weights (unet/diffusion_pytorch_model.bin); refusing to unpickle" in str(info.value)
    assert "allow_pickle: true" in str(info.value)


def test_pickle_allowed_only_by_opt_in() -> None:
    repo = ["config.json", "diffusion_pytorch_model.ckpt"]
    with pytest.raises(FetchError, match="only pickle weights"):
        select(repo, role=SourceRole.substitution("vae"), folders=None)
    assert select(repo, role=SourceRole.substitution("vae"), folders=None, allow_pickle=True)[-1] == "diffusion_pytorch_model.ckpt"


def test_single_file_checkpoint_is_not_a_pipeline() -> None:
    with pytest.raises(FetchError, match="no model_index.json"):
        select(["sd_xl_base_1.0.safetensors"])


def test_sharded_weights_and_index_are_kept_together() -> None:
    repo = ["config.json", "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.fp16.json",
            "diffusion_pytorch_model.safetensors"]
    chosen = select(repo, role=SourceRole.substitution("unet"), folders=None, variant="fp16")
    assert chosen == ["config.json", *sorted(repo[1:4])]


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("diffusion_pytorch_model.safetensors", ("safetensors", None)),
        ("model.fp16.safetensors", ("safetensors", "fp16")),
        ("diffusion_pytorch_model-00001-of-00002.fp16.safetensors", ("safetensors", "fp16")),
        ("model.safetensors.index.json", ("safetensors", None)),
        ("sdxl_vae.safetensors", None),
        ("model.onnx", None),
    ],
)
def test_weight_names(name: str, parsed: tuple[str, str | None] | None) -> None:
    assert parse_weight_name(name) == parsed


SD3_REPO = [
    "model_index.json", "sd3.5_medium.safetensors", "LICENSE.md", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors", "text_encoder_3/config.json",
    "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
    "text_encoder_3/model.safetensors.index.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json",
    "tokenizer_3/tokenizer_config.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]


def test_sd3_repo_selects_t5_shards_and_its_sentencepiece_model() -> None:
    from convert.families.sd3 import SD3

    chosen = select(SD3_REPO, folders=list(SD3.folders), family=SD3)
    assert "tokenizer_3/spiece.model" in chosen and "text_encoder_3/model-00002-of-00002.safetensors" in chosen
    assert "text_encoder_3/model.safetensors.index.json" in chosen
    assert "sd3.5_medium.safetensors" not in chosen and "LICENSE.md" not in chosen


def test_sd3_repo_without_t5_fetches_without_it() -> None:
    from convert.families.sd3 import SD3

    without = [p for p in SD3_REPO if not p.startswith(("text_encoder_3/", "tokenizer_3/"))]
    chosen = select(without, folders=list(SD3.folders), family=SD3)
    assert "transformer/diffusion_pytorch_model.safetensors" in chosen
    assert not any(p.startswith("text_encoder_3/") for p in chosen)
    with pytest.raises(FetchError, match="no .safetensors weights in transformer/"):
        select([p for p in SD3_REPO if not p.startswith("transformer/d")], folders=list(SD3.folders), family=SD3)


def test_a_local_config_source_is_a_pipeline_folder_without_weights(tmp_path: Path) -> None:
    """`base.config` is a pipeline (model_index.json), not a component (config.json): the bench's single file uses one."""
    from convert.recipe import LocalSource, Source
    from convert.resolve import resolve_source
    from convert.workspace import Workspace

    config = tmp_path / "config"
    (config / "unet").mkdir(parents=True)
    (config / "unet" / "config.json").write_text("{}")
    workspace = Workspace(artifacts=tmp_path / "artifacts", hf_cache=tmp_path / "hf-cache")
    source = Source(local=LocalSource(path=Path("config")))
    with pytest.raises(FetchError) as error:
        resolve_source(SourceRole.config(), source, workspace, tmp_path)
    assert str(error.value).startswith(f"base.config: no model_index.json in {config}; a local source is a folder in diffusers layout")
    (config / "model_index.json").write_text("{}")
    resolved = resolve_source(SourceRole.config(), source, workspace, tmp_path)
    assert resolved.local_path == config and {f.path for f in resolved.files} == {"model_index.json", "unet/config.json"}
