"""The fused SafeCLIP graph: uint8 pixels in, per-category probabilities out."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPModel

from safeclip.export.descriptors import DescriptorSet


@torch.no_grad()
def descriptor_matrix(clip: CLIPModel, tokenizer, descriptors: DescriptorSet) -> torch.Tensor:
    """Text embeddings of every phrase, L2-normalised and pre-multiplied by the logit scale: [P, D]."""
    tokens = tokenizer(list(descriptors.phrases), padding=True, return_tensors="pt")
    text = clip.get_text_features(**tokens)
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    text = text / text.norm(dim=-1, keepdim=True)
    return text * clip.logit_scale.exp()


class FusedSafeClip(nn.Module):
    """Normalize -> vision tower -> CLS -> projection -> L2 norm -> phrase logits -> category probs.

    Only the layers the chosen CLS source needs are kept: `penultimate` drops the last encoder layer
    unless patch features (also layer -2) are asked for, in which case it is still not run.
    """

    # Buffers (register_buffer below), declared for the type checker: nn.Module's __getattr__ is untyped.
    pixel_mean: torch.Tensor
    pixel_inv_std: torch.Tensor
    text: torch.Tensor
    phrase_to_category: torch.Tensor

    def __init__(
        self,
        clip: CLIPModel,
        text: torch.Tensor,
        descriptors: DescriptorSet,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        cls_source: str,
        patch_features: bool,
    ):
        super().__init__()
        vision = clip.vision_model
        depth = len(vision.encoder.layers) if cls_source == "final" else len(vision.encoder.layers) - 1
        self.embeddings = vision.embeddings
        self.pre_layrnorm = vision.pre_layrnorm
        self.layers = nn.ModuleList(vision.encoder.layers[:depth])
        self.post_layernorm = vision.post_layernorm if cls_source == "final" else None
        self.visual_projection = clip.visual_projection
        self.patch_layer = len(vision.encoder.layers) - 2 if patch_features else None
        # Folding /255 into mean and std keeps the in-graph normalization at one Sub and one Mul.
        self.register_buffer("pixel_mean", torch.tensor(mean).mul(255.0).view(1, 1, 1, 3))
        self.register_buffer("pixel_inv_std", torch.tensor(std).mul(255.0).reciprocal().view(1, 1, 1, 3))
        self.register_buffer("text", text.detach().clone())
        index = torch.tensor(descriptors.phrase_category_index())
        self.register_buffer("phrase_to_category", nn.functional.one_hot(index, len(descriptors.categories)).float())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pixels = (image.float() - self.pixel_mean) * self.pixel_inv_std
        hidden = self.pre_layrnorm(self.embeddings(pixels.permute(0, 3, 1, 2)))
        patches = None
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, None)
            if i == self.patch_layer:
                patches = hidden[:, 1:]
        cls_token = hidden[:, 0]
        if self.post_layernorm is not None:
            cls_token = self.post_layernorm(cls_token)
        embeds = self.visual_projection(cls_token)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        phrase_probs = torch.softmax(embeds @ self.text.T, dim=-1)
        probs = phrase_probs @ self.phrase_to_category
        return (probs, embeds) if patches is None else (probs, embeds, patches)
