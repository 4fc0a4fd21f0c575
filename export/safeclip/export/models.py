"""Loading a CLIP checkpoint, or building the seeded tiny one used by tests and smoke runs."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.utils import cached_file

# The checks that need no torch live in preflight (the CLI runs them before importing this module); the
# names are re-exported here, where callers of the Python API have always found them.
from safeclip.export.preflight import (
    DEFAULT_MODEL,
    HUB_PROBE_SECONDS,
    TINY_RANDOM,
    ModelLoadError,
    check_model,
    hub_unreachable,
    looks_like_path,
    offline_message,
)

__all__ = ["DEFAULT_MODEL", "HUB_PROBE_SECONDS", "TINY_RANDOM", "ModelLoadError", "hub_unreachable", "load_clip"]

RGB = tuple[float, float, float]
# CLIP's training statistics; a checkpoint's preprocessor_config.json overrides them.
OPENAI_CLIP_MEAN: RGB = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: RGB = (0.26862954, 0.26130258, 0.27577711)

TINY_RANDOM_SEED = 1234

_TINY_WARNING = """\
**************************************************************************
* WARNING: --model tiny-random has RANDOM weights: its verdicts are      *
* meaningless. It exists for smoke tests and CI. Use a real CLIP         *
* checkpoint for screening (default: openai/clip-vit-large-patch14-336). *
**************************************************************************"""


@dataclass(frozen=True)
class LoadedClip:
    model: CLIPModel
    tokenizer: CLIPTokenizer
    model_id: str
    model_hash: str
    mean: RGB = OPENAI_CLIP_MEAN
    std: RGB = OPENAI_CLIP_STD


def load_clip(model: str) -> LoadedClip:
    if model == TINY_RANDOM:
        print(_TINY_WARNING, file=sys.stderr)
        return tiny_random_clip()
    # A folder that does not exist, or a hub id neither cached nor downloadable: said before any download try.
    check_model(model)
    if looks_like_path(model):
        return _from_pretrained(str(Path(model).expanduser()), local_files_only=True)
    try:
        return _from_pretrained(model, local_files_only=True)
    except OSError:
        pass
    try:
        return _from_pretrained(model, local_files_only=False)
    except OSError as e:
        raise ModelLoadError(offline_message(model, f"the hub could not be reached ({e.__class__.__name__})")) from e


def _from_pretrained(model: str, local_files_only: bool) -> LoadedClip:
    # Eager attention exports to plain MatMul/Softmax, which every ONNX runtime and TensorRT parses.
    clip = CLIPModel.from_pretrained(model, local_files_only=local_files_only, attn_implementation="eager")
    tokenizer = CLIPTokenizer.from_pretrained(model, local_files_only=local_files_only)
    revision = getattr(clip.config, "_commit_hash", None)
    model_hash = f"revision:{revision}" if revision else _weights_hash(clip)
    mean, std = _normalization(model, local_files_only)
    return LoadedClip(clip.eval(), tokenizer, model, model_hash, mean, std)


def _normalization(model: str, local_files_only: bool) -> tuple[RGB, RGB]:
    config_file = cached_file(
        model,
        "preprocessor_config.json",
        local_files_only=local_files_only,
        _raise_exceptions_for_missing_entries=False,
    )
    if config_file is None:
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    config = json.loads(Path(config_file).read_text())
    return (
        _rgb(config.get("image_mean", OPENAI_CLIP_MEAN), f"{config_file}: image_mean"),
        _rgb(config.get("image_std", OPENAI_CLIP_STD), f"{config_file}: image_std"),
    )


def _rgb(values: object, where: str) -> RGB:
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ModelLoadError(f"{where}: expected 3 numbers (R, G, B), got {values!r}")
    r, g, b = (float(v) for v in values)
    return r, g, b


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def tiny_random_clip() -> LoadedClip:
    """A 4-layer CLIP with 56 px images and 14 px patches (ViT-L/14's patch size), seeded."""
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=14
    )
    return random_clip(vision, projection_dim=32, seed=TINY_RANDOM_SEED, model_id=TINY_RANDOM)


def random_clip(
    vision: dict, projection_dim: int, seed: int, model_id: str, attn_implementation: str = "eager"
) -> LoadedClip:
    """A seeded random-weight CLIP with the given vision tower (transformers CLIPVisionConfig fields)
    and a small text tower: only the descriptor matrix comes from the text side."""
    tokenizer = _byte_level_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=vision,
        projection_dim=projection_dim,
        # Trained CLIPs end near exp(4.6) = 100; start there so the head sees realistic logits.
        logit_scale_init_value=math.log(100.0),
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    return LoadedClip(model, tokenizer, model_id, _weights_hash(model))


def _byte_level_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with no merges: every word is spelled out, which works offline."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=[])
