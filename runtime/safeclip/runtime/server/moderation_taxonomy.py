"""OpenAI's moderation taxonomy, and how our default categories map onto it (for `/v1/moderations`)."""

from __future__ import annotations

# OpenAI's moderation categories (omni-moderation), the keys its clients read.
OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
# Our default categories (export/safeclip/export/descriptor_files/default.toml) -> OpenAI moderation
# categories. A category named like an OpenAI one maps to it without an entry; alcohol and cigarette have no
# OpenAI counterpart.
DEFAULT_MODERATION_MAP: dict[str, tuple[str, ...]] = {
    "porn": ("sexual",),
    "blood": ("violence", "violence/graphic"),
    "gun": ("violence",),
    "knife": ("violence",),
    "insulting gesture": ("harassment",),
}
