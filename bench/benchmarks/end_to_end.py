"""4. End to end: screen JPEGs with safeclip's Gate vs the zero-shot code a transformers user writes."""

from __future__ import annotations

import functools
import io
import time

import numpy as np

from bench.benchmarks.preprocessing import clip_processor, expand2square
from bench.core import Result, time_once
from bench.fixtures import arch, descriptors, jpegs, log, random_clip

GOAL_X = 3.0
CONTENDERS = ("safeclip", "safeclip_b1", "safeclip_int8_b1", "transformers_b1", "transformers_batched")
RATIOS = ("speedup_vs_b1", "speedup_vs_batched", "speedup_b1_vs_b1", "speedup_int8_b1_vs_b1")


def expected(s):
    keys = []
    for name in s.e2e_archs:
        keys += [f"{name}.{c}.images_per_s" for c in CONTENDERS]
        keys += [f"{name}.transformers_b1.ms_per_image", *(f"{name}.{r}" for r in RATIOS)]
    return keys


def needs(s):
    return [(name, False, False) for name in s.e2e_archs]  # and their INT8 models: ctx.int8


class TransformersZeroShot:
    """CLIPModel + CLIPProcessor zero-shot over the same descriptor phrases and the same rule (flag when a
    non-neutral category's probability exceeds the threshold). The text side is encoded once, up front
    and untimed, as a careful user would; images go through LLaVA's expand2square, as safeclip's pad mode."""

    def __init__(self, clip, desc, threshold: float):
        import torch
        from transformers import CLIPProcessor

        self.torch = torch
        self.model = clip.model
        self.processor = CLIPProcessor(
            image_processor=clip_processor(self.model.config.vision_config.image_size, clip.mean, clip.std),
            tokenizer=clip.tokenizer,
        )
        self.pad = tuple(int(m * 255) for m in clip.mean)
        self.threshold = threshold
        with torch.inference_mode():
            tokens = self.processor(text=list(desc.phrases), padding=True, return_tensors="pt")
            text = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            text = text if isinstance(text, torch.Tensor) else text.pooler_output
            self.text = text / text.norm(dim=-1, keepdim=True)
        self.scale = self.model.logit_scale.exp().detach()
        index = torch.tensor(desc.phrase_category_index())
        self.to_category = torch.nn.functional.one_hot(index, len(desc.categories)).float()
        self.flaggable = [i for i, c in enumerate(desc.categories) if not c.neutral]

    def screen(self, images: list[bytes]) -> np.ndarray:
        from PIL import Image

        torch = self.torch
        pil = [expand2square(Image.open(io.BytesIO(b)).convert("RGB"), self.pad) for b in images]
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            image = self.model.get_image_features(pixel_values=pixels)
            image = image if isinstance(image, torch.Tensor) else image.pooler_output
            image = image / image.norm(dim=-1, keepdim=True)
            probs = (self.scale * image @ self.text.T).softmax(dim=-1) @ self.to_category
        return (probs[:, self.flaggable] > self.threshold).any(dim=1).numpy()


def run(ctx, result: Result) -> None:
    s = ctx.settings
    width, height = s.e2e_source
    result.params.update(
        archs=[arch(n).label for n in s.e2e_archs],
        images=s.e2e_images,
        source=f"{width}x{height} JPEG",
        batch=s.e2e_batch,
        safeclip=f"Gate.from_engine(backend='cpu', precision='fp32', max_batch={s.e2e_batch} (the default) or 1)"
        ".check(jpeg bytes); and precision='int8' (dynamic, as `safeclip quantize` makes it), max_batch=1",
        transformers="CLIPModel (default sdpa attention) + CLIPProcessor(CLIPImageProcessorPil) after expand2square; "
        "text features computed once, untimed",
    )
    result.notes.append(
        f"{s.e2e_images} images in rounds of {s.e2e_batch} (one batch); in each round the five pipelines run "
        "back to back in rotating order. images/s samples are per round."
    )
    for name in s.e2e_archs:
        _run_arch(ctx, result, name)


def _run_arch(ctx, result: Result, name: str) -> None:
    from safeclip.runtime import contract
    from safeclip.runtime.gate import Gate

    s = ctx.settings
    a = arch(name)
    built = ctx.int8(name)
    gate = Gate.from_engine(built.path, backend="cpu", precision="fp32", max_batch=s.e2e_batch)
    gate_b1 = Gate.from_engine(built.path, backend="cpu", precision="fp32", max_batch=1)
    gate_int8_b1 = Gate.from_engine(built.path, backend="cpu", precision="int8", max_batch=1)
    user = TransformersZeroShot(random_clip(a, attn="sdpa"), descriptors(), contract.DEFAULT_THRESHOLD)
    width, height = s.e2e_source
    images = jpegs(s.e2e_images, height, width, seed=100)
    result.params["torch_threads"] = user.torch.get_num_threads()

    def settle():
        time.sleep(0.05)  # let the previous library's worker threads go idle before the next one runs

    # Warm every path (first-call allocations, thread pools), on images not screened below.
    warm = jpegs(2, height, width, seed=9000)
    gate.check(warm)
    gate_b1.check(warm)
    gate_int8_b1.check(warm)
    user.screen(warm[:1])
    user.screen(warm)

    per_round: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    b1_images: list[float] = []
    chunks = [images[i : i + s.e2e_batch] for i in range(0, len(images), s.e2e_batch)]
    for r, chunk in enumerate(chunks):

        def run_gate(chunk=chunk):
            return gate.check(chunk)

        def run_gate_b1(chunk=chunk):
            return gate_b1.check(chunk)

        def run_gate_int8_b1(chunk=chunk):
            return gate_int8_b1.check(chunk)

        def run_b1(chunk=chunk):
            for one in chunk:
                b1_images.append(time_once(functools.partial(user.screen, [one])))

        def run_batched(chunk=chunk):
            return user.screen(chunk)

        fns = dict(zip(CONTENDERS, (run_gate, run_gate_b1, run_gate_int8_b1, run_b1, run_batched), strict=True))
        order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
        for contender in order:
            settle()
            seconds = time_once(fns[contender])
            per_round[contender].append(len(chunk) / seconds)
            log(f"end_to_end {a.label} round {r + 1}/{len(chunks)}: {contender} {len(chunk)} images in {seconds:.1f} s")

    labels = {
        "safeclip": f"safeclip Gate, {a.label}, batch {s.e2e_batch}",
        "safeclip_b1": f"safeclip Gate, {a.label}, batch 1",
        "safeclip_int8_b1": f"safeclip Gate, {a.label} INT8 dynamic, batch 1",
        "transformers_b1": f"transformers zero-shot, {a.label}, batch 1",
        "transformers_batched": f"transformers zero-shot, {a.label}, batch {s.e2e_batch}",
    }
    for contender in CONTENDERS:
        result.add(
            f"{name}.{contender}.images_per_s",
            labels[contender],
            "images/s",
            per_round[contender],
            higher_is_better=True,
            detail=f"{s.e2e_images} {width}x{height} JPEGs",
        )
    result.add(
        f"{name}.transformers_b1.ms_per_image",
        f"transformers zero-shot, {a.label}, batch 1, per image",
        "ms",
        [v * 1e3 for v in b1_images],
    )
    result.ratio(
        f"{name}.speedup_vs_b1",
        f"{a.label}: safeclip (batch {s.e2e_batch}) vs transformers batch 1",
        f"{name}.safeclip.images_per_s",
        f"{name}.transformers_b1.images_per_s",
        goal=(">=", GOAL_X),
    )
    result.ratio(
        f"{name}.speedup_vs_batched",
        f"{a.label}: safeclip vs transformers, both batch {s.e2e_batch}",
        f"{name}.safeclip.images_per_s",
        f"{name}.transformers_batched.images_per_s",
        goal=(">=", GOAL_X),
    )
    result.ratio(
        f"{name}.speedup_b1_vs_b1",
        f"{a.label}: safeclip vs transformers, both batch 1",
        f"{name}.safeclip_b1.images_per_s",
        f"{name}.transformers_b1.images_per_s",
        goal=(">=", GOAL_X),
    )
    result.ratio(
        f"{name}.speedup_int8_b1_vs_b1",
        f"{a.label}: safeclip INT8 dynamic vs transformers FP32, both batch 1",
        f"{name}.safeclip_int8_b1.images_per_s",
        f"{name}.transformers_b1.images_per_s",
        goal=(">=", GOAL_X),
    )
