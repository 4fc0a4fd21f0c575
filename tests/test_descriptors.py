from __future__ import annotations

import pytest

from safeclip.export.descriptors import DescriptorError, load_descriptors


def write(tmp_path, text: str):
    path = tmp_path / "d.toml"
    path.write_text(text)
    return path


def test_default_set_has_the_papers_categories():
    d = load_descriptors()
    assert [c.name for c in d.categories] == [
        "neutral",
        "porn",
        "blood",
        "gun",
        "insulting gesture",
        "knife",
        "alcohol",
        "cigarette",
    ]
    assert [c.name for c in d.categories if c.neutral] == ["neutral"]
    assert all(len(c.phrases) >= 5 for c in d.categories)
    assert len(set(d.phrases)) == len(d.phrases) == 40


GOOD = '[[category]]\nname = "neutral"\nneutral = true\nphrases = ["a cat"]\n'


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[[category]]\nname = "gun"\nphrases = ["a gun"]\n[[category]]\nname = "x"\nphrases = ["y"]\n',
            "exactly one category must be marked `neutral = true`, found none",
        ),
        (GOOD + '[[category]]\nname = "gun"\nphrases = []\n', "category 'gun': empty category"),
        (GOOD + '[[category]]\nname = "gun"\n', "category 'gun': empty category"),
        (
            GOOD + '[[category]]\nname = "gun"\nphrases = ["a cat"]\n',
            "category 'gun': duplicate phrase 'a cat' (already in 'neutral')",
        ),
        (GOOD + '[[category]]\nname = "gun"\nphrase = ["a gun"]\n', "category #2: unknown keys ['phrase']"),
        ('title = "x"\n' + GOOD, "unknown top-level keys ['title']"),
        (GOOD + '[[category]]\nname = "neutral"\nphrases = ["b"]\n', "category 'neutral': duplicate category name"),
        (GOOD, "at least one to detect"),
        (GOOD + '[[category]]\nname = "gun"\nneutral = "no"\nphrases = ["a gun"]\n', "`neutral` must be true or false"),
        (GOOD + '[[category]]\nname = "gun"\nphrases = ["  "]\n', "phrase '  ' must be a non-empty string"),
        ("[[category]\n", "not valid TOML"),
        ("", "no [[category]] tables"),
    ],
)
def test_bad_descriptor_files_name_the_entry(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DescriptorError) as e:
        load_descriptors(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DescriptorError, match="cannot read"):
        load_descriptors(tmp_path / "nope.toml")
