"""How long and on what each benchmark runs: one frozen preset per mode, nothing else decides it.

Budgets are seconds of timed work per contender; the number of samples adapts to the machine
within [min, max] (see core.plan_repeats), so a slow machine runs fewer samples, not longer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    mode: str  # "full", "quick", or "smoke" (the test suite)
    # 1. head overhead
    head_archs: tuple[str, ...]
    head_budget_s: float
    head_min_pairs: int
    head_max_pairs: int
    # 2. decision path
    decision_budget_s: float
    decision_batches: tuple[int, ...]
    # 3. preprocessing
    preprocess_sizes: tuple[tuple[int, int], ...]  # (width, height) of the source JPEGs
    preprocess_target: int
    preprocess_budget_s: float
    preprocess_min: int
    preprocess_max: int
    # 4. end to end
    e2e_archs: tuple[str, ...]
    e2e_images: int
    e2e_batch: int
    e2e_source: tuple[int, int]  # (width, height) of the screened JPEGs
    # 5. precision (FP32, FP16, INT8 dynamic) on each of these
    precision_archs: tuple[str, ...]
    precision_batch: int
    precision_budget_s: float
    precision_min: int
    precision_max: int
    precision_agreement_images: int
    # 6. the gate
    gate_arch: str
    gate_image_px: int
    gate_images_per_request: tuple[int, ...]
    gate_requests_cold: int
    gate_requests_warm: int
    gate_clients: int
    gate_concurrent_requests: int  # cache warm, over 3 rounds
    gate_cold_rounds: int  # cache cold: rounds of one fresh request per client
    # photos: real photographs through the gate, at a hosted upstream's forward budget
    photos_arch: str
    photos_cold_sizes: tuple[tuple[int, int], ...]  # (width, height) of the new camera JPEGs
    photos_cold_requests: int
    photos_warm_large: tuple[int, int]  # (width, height) of the warm camera photo (12 MP)
    photos_warm_requests: int
    # 7. scaling
    scaling_arch: str
    scaling_batches: tuple[int, ...]
    scaling_budget_s: float
    scaling_min: int
    scaling_max: int
    # 8. dataset scan (the pipeline on scan_arch; the engine ceiling on each of scan_ceiling_archs)
    scan_arch: str
    scan_ceiling_archs: tuple[str, ...]
    scan_images: int
    scan_per_shard: int
    scan_batch: int
    scan_budget_s: float
    scan_min: int
    scan_max: int
    scan_ray_cpus: int
    scan_ray_rounds: int
    plot: bool = True


FULL = Settings(
    mode="full",
    head_archs=("vit-b-32", "vit-l-14-336"),
    head_budget_s=30.0,
    head_min_pairs=7,
    head_max_pairs=60,
    decision_budget_s=3.0,
    decision_batches=(1, 32),
    preprocess_sizes=((1024, 768), (4000, 3000), (3000, 4000)),
    preprocess_target=336,
    preprocess_budget_s=10.0,
    preprocess_min=7,
    preprocess_max=60,
    e2e_archs=("vit-b-32", "vit-l-14-336"),
    e2e_images=64,
    e2e_batch=32,
    e2e_source=(1024, 768),
    precision_archs=("vit-b-32", "vit-l-14-336"),
    precision_batch=8,
    precision_budget_s=20.0,
    precision_min=5,
    precision_max=30,
    precision_agreement_images=64,
    gate_arch="vit-b-32",
    gate_image_px=336,
    gate_images_per_request=(1, 8),
    gate_requests_cold=20,
    gate_requests_warm=200,
    gate_clients=64,
    gate_concurrent_requests=512,
    gate_cold_rounds=3,
    photos_arch="vit-b-32",
    photos_cold_sizes=((1024, 768), (4000, 3000)),
    photos_cold_requests=40,
    photos_warm_large=(4000, 3000),
    photos_warm_requests=300,
    scaling_arch="vit-b-32",
    scaling_batches=(1, 2, 4, 8, 16, 32),
    scaling_budget_s=20.0,
    scaling_min=3,
    scaling_max=10,
    scan_arch="tiny",
    scan_ceiling_archs=("tiny", "vit-b-32"),
    scan_images=2048,
    scan_per_shard=256,
    scan_batch=32,
    scan_budget_s=120.0,
    scan_min=5,
    scan_max=9,
    scan_ray_cpus=2,
    scan_ray_rounds=3,
)

QUICK = Settings(
    mode="quick",
    head_archs=("vit-b-32",),
    head_budget_s=8.0,
    head_min_pairs=7,
    head_max_pairs=40,
    decision_budget_s=1.0,
    decision_batches=(1, 32),
    preprocess_sizes=((1024, 768), (4000, 3000), (3000, 4000)),
    preprocess_target=336,
    preprocess_budget_s=4.0,
    preprocess_min=5,
    preprocess_max=30,
    e2e_archs=("vit-b-32",),
    e2e_images=64,
    e2e_batch=32,
    e2e_source=(1024, 768),
    precision_archs=("vit-b-32",),
    precision_batch=8,
    precision_budget_s=6.0,
    precision_min=3,
    precision_max=15,
    precision_agreement_images=32,
    gate_arch="vit-b-32",
    gate_image_px=336,
    gate_images_per_request=(1, 8),
    gate_requests_cold=10,
    gate_requests_warm=100,
    gate_clients=64,
    gate_concurrent_requests=256,
    gate_cold_rounds=2,
    photos_arch="vit-b-32",
    photos_cold_sizes=((1024, 768), (4000, 3000)),
    photos_cold_requests=24,
    photos_warm_large=(4000, 3000),
    photos_warm_requests=150,
    scaling_arch="vit-b-32",
    scaling_batches=(1, 2, 4, 8, 16, 32),
    scaling_budget_s=12.0,
    scaling_min=2,
    scaling_max=5,
    scan_arch="tiny",
    scan_ceiling_archs=("tiny", "vit-b-32"),
    scan_images=1024,
    scan_per_shard=128,
    scan_batch=32,
    scan_budget_s=40.0,
    scan_min=3,
    scan_max=5,
    scan_ray_cpus=2,
    scan_ray_rounds=2,
)

# The test suite's preset: the seeded tiny model and the fewest samples that still give a median.
SMOKE = Settings(
    mode="smoke",
    head_archs=("tiny",),
    head_budget_s=0.2,
    head_min_pairs=3,
    head_max_pairs=5,
    decision_budget_s=0.1,
    decision_batches=(1, 4),
    preprocess_sizes=((160, 120),),
    preprocess_target=56,
    preprocess_budget_s=0.1,
    preprocess_min=3,
    preprocess_max=3,
    e2e_archs=("tiny",),
    e2e_images=4,
    e2e_batch=2,
    e2e_source=(160, 120),
    precision_archs=("tiny",),
    precision_batch=2,
    precision_budget_s=0.1,
    precision_min=3,
    precision_max=3,
    precision_agreement_images=4,
    gate_arch="tiny",
    gate_image_px=56,
    gate_images_per_request=(1,),
    gate_requests_cold=3,
    gate_requests_warm=5,
    gate_clients=4,
    gate_concurrent_requests=8,
    gate_cold_rounds=2,
    photos_arch="tiny",
    photos_cold_sizes=((160, 120), (3200, 2400)),  # the second 6x the Anthropic budget: downscaled
    photos_cold_requests=3,
    photos_warm_large=(800, 600),
    photos_warm_requests=3,
    scaling_arch="tiny",
    scaling_batches=(1, 2, 4),
    scaling_budget_s=0.2,
    scaling_min=3,
    scaling_max=3,
    scan_arch="tiny",
    scan_ceiling_archs=("tiny",),
    scan_images=24,
    scan_per_shard=10,
    scan_batch=4,
    scan_budget_s=0.1,
    scan_min=1,
    scan_max=1,
    scan_ray_cpus=2,
    scan_ray_rounds=1,
    plot=True,
)

PRESETS = {s.mode: s for s in (FULL, QUICK, SMOKE)}
