"""The README's code runs as printed, and its way of asking gets the answers the model was trained to give.

The shipped `shapes-llava` was tuned with Colour questions answered after "ASSISTANT: The color
of the X is"; its chat template adds that prefix, so `prepare(questions=...)` must build exactly
the prompts of the training format (`Example.prompt`) in every category, and answer them right.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hooked_llava.shapes import CATEGORIES, ShapesWorld, checkpoint_path
from hooked_llava.shapes.evaluate import hits

pytestmark = pytest.mark.skipif(
    not checkpoint_path("shapes-llava").is_dir(), reason="the Shapes checkpoints are not shipped"
)
README = Path(__file__).resolve().parents[1] / "README.md"
N_HELD_OUT = 200  # examples per category
FLOOR = 0.95  # accuracy every category must reach


@pytest.fixture(scope="module")
def model():
    from hooked_llava import HookedLlava

    return HookedLlava.from_pretrained("shapes-llava")


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, as printed."""
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


def test_python_blocks_are_found():
    blocks = python_blocks("text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n")
    assert blocks == ["x = 1\n", "y = 2\n"]


def _needs_missing_extra(block: str) -> bool:
    """A block for an optional extra (SAELens) is run only where that extra is installed."""
    import importlib.util

    uses_sae_lens = "import sae_lens" in block or "from sae_lens" in block
    return uses_sae_lens and importlib.util.find_spec("sae_lens") is None


def test_readme_python_blocks_run_as_printed(capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    for i, block in enumerate(blocks):
        if not _needs_missing_extra(block):
            exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    printed = capsys.readouterr().out
    said = re.search(r"answer '(\w+)' \(p = ([\d.]+)\), expected '(\w+)'", printed)
    assert said, f"the first-look block no longer prints its answer:\n{printed}"
    assert said.group(1) == said.group(3)
    assert "ASSISTANT: The color of the cross is'" in printed
    assert "['What', 'is', 'the', 'color', 'of', 'the', 'cross', '?']" in printed
    if not any(map(_needs_missing_extra, blocks)):  # the SAE block ran: 16 features are active per patch (k)
        assert re.search(r"torch.Size\(\[1, \d+, 1024\]\) 16 features per patch", printed), printed


def test_questions_build_the_trained_prompts_in_every_category(model):
    world = ShapesWorld(seed=0)
    examples = [world.example(i, c) for c in CATEGORIES for i in range(5)]
    images = [e.image for e in examples]
    asked = model.prepare(images=images, questions=[e.question for e in examples])
    trained = model.prepare(images=images, prompts=[e.prompt for e in examples])
    assert asked.texts == [e.prompt for e in examples]
    assert torch.equal(asked.input_ids, trained.input_ids)
    assert torch.equal(asked.attention_mask, trained.attention_mask)
    assert torch.equal(asked.question_mask, trained.question_mask)
    for row, e in enumerate(examples):  # the mask holds exactly the question's words
        words = model.to_str_tokens(asked.input_ids[row, asked.mask("question")[row]])
        assert words == model.to_str_tokens(model.to_tokens(e.question, prepend_bos=False)[0])


@torch.no_grad()
def accuracy(model, category: str, batch_size: int = 100) -> float:
    """The README's way of asking, on held-out examples of a category: arg-max next token vs answer."""
    world = ShapesWorld(seed=0)
    examples = [world.example(i, category) for i in range(N_HELD_OUT)]
    right: list[bool] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        inputs = model.prepare(images=[e.image for e in batch], questions=[e.question for e in batch])
        logits = model(inputs)  # left padding: the last position is each row's last token
        right += hits(model.to_str_tokens(logits[:, -1].argmax(-1)), batch)
    return sum(right) / len(right)


@pytest.mark.parametrize("category", CATEGORIES)
def test_the_readme_way_of_asking_answers_right(model, category):
    assert accuracy(model, category) >= FLOOR


def test_the_shipped_chat_templates_are_what_a_retrain_writes(tmp_path):
    """`train.save` writes the processor (shapes-llava) and its tokenizer (shapes-lm); both carry the template."""
    from hooked_llava.shapes import build_processor

    processor = build_processor()
    processor.save_pretrained(tmp_path / "shapes-llava")
    processor.tokenizer.save_pretrained(tmp_path / "shapes-lm")
    for name in ("shapes-llava", "shapes-lm"):
        written = (tmp_path / name / "chat_template.jinja").read_text()
        assert written == (checkpoint_path(name) / "chat_template.jinja").read_text()
    world = ShapesWorld(seed=3)
    for e in (world.example(i, c) for c in CATEGORIES for i in range(3)):  # visual and text QA prompts
        question = {"type": "text", "text": e.question}
        visual = [{"role": "user", "content": [{"type": "image"}, question]}]
        text = [{"role": "user", "content": [{"type": "text", "text": e.scene.describe()}, question]}]
        assert processor.apply_chat_template(visual, add_generation_prompt=True) == e.prompt
        assert (
            processor.tokenizer.apply_chat_template(text, tokenize=False, add_generation_prompt=True) == e.text_prompt
        )
    e = world.example(0, "Colour")  # the training sequence: prompt (with the answer prefix), answer, end
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.question}]}
    answered = [user, {"role": "assistant", "content": [{"type": "text", "text": e.answer}]}]
    rendered = processor.apply_chat_template(answered)
    assert e.answer_prefix.startswith(" The color of the") and e.prompt.endswith("ASSISTANT:" + e.answer_prefix)
    assert rendered == f"{e.prompt} {e.answer}</s>"
