"""The paper's rule written directly on transformers' CLIP modules: the reference engines are held to.

Deliberately shares no code with safeclip.export: a bug there must not be mirrored here.
"""

from __future__ import annotations

import numpy as np
import torch


def normalize_uint8(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [N, S, S, 3] RGB -> CLIP pixel_values [N, 3, S, S], as CLIPImageProcessor rescales and normalizes."""
    pixels = torch.from_numpy(images).float().div(255.0)
    pixels = (pixels - torch.tensor(mean)) / torch.tensor(std)
    return pixels.permute(0, 3, 1, 2)


@torch.no_grad()
def reference_probs(clip, tokenizer, categories, images: np.ndarray, mean, std, cls: str = "final"):
    """images: uint8 [N, S, S, 3] RGB -> (category probs [N, C], embeds [N, P], hidden_states)."""
    return reference_from_pixels(clip, tokenizer, categories, normalize_uint8(images, mean, std), cls)


@torch.no_grad()
def reference_from_pixels(clip, tokenizer, categories, pixel_values: torch.Tensor, cls: str = "final"):
    out = clip.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    if cls == "final":
        embeds = clip.visual_projection(out.pooler_output)
    else:
        embeds = clip.visual_projection(out.hidden_states[-2][:, 0])
    embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)

    phrases = [p for c in categories for p in c.phrases]
    tokens = tokenizer(phrases, padding=True, return_tensors="pt")
    text = clip.get_text_features(**tokens).pooler_output
    text = text / text.norm(p=2, dim=-1, keepdim=True)
    phrase_probs = torch.softmax(clip.logit_scale.exp() * embeds @ text.T, dim=-1)

    probs, start = [], 0
    for c in categories:
        probs.append(phrase_probs[:, start : start + len(c.phrases)].sum(dim=-1))
        start += len(c.phrases)
    return torch.stack(probs, dim=-1).numpy(), embeds.numpy(), out.hidden_states
