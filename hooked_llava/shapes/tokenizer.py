"""The Shapes word-level tokenizer, image processor and ``LlavaProcessor``.

The vocabulary is every word the Shapes prompts can contain, so each answer is exactly one
token. Text is split on spaces and punctuation; newlines are tokens of their own, because the
LLaVA-1.5 prompt format has them. Like Llama tokenizers, encoding prepends ``<s>``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from hooked_llava.shapes.questions import COLOUR_ANSWER_PREFIX, COLOUR_QUESTION, IMAGE_TOKEN
from hooked_llava.shapes.scene import COLORS, SHAPES

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, IMAGE_TOKEN)
PUNCTUATION: tuple[str, ...] = ("\n", ":", ".", ",", "?")
# Every word of the prompt format, descriptions and question templates (see questions.py).
WORDS: tuple[str, ...] = (
    "USER", "ASSISTANT", "Describe", "Do", "Is", "On", "The", "There", "What", "Which",
    "a", "an", "and", "color", "have", "image", "in", "is", "left", "middle", "no", "not", "of",
    "on", "or", "picture", "right", "same", "shape", "side", "that", "the", "there", "to", "which", "yes",
)  # fmt: skip
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + PUNCTUATION + WORDS + COLORS + SHAPES
IMAGE_SIZE, PATCH_SIZE = 64, 8
_ASKED, _ENDS = COLOUR_QUESTION.split("{shape}")  # "What is the color of the ", "?"
_SAID, _IS = COLOUR_ANSWER_PREFIX.split("{shape}")  # " The color of the ", " is"
# After a user text that is the colour question, the assistant's turn starts with its answer prefix.
_PREFIX = (
    "{% set ns.prefix = '' %}"
    f"{{% if text.startswith('{_ASKED}') and text.endswith('{_ENDS}') %}}"
    f"{{% set ns.prefix = '{_SAID}' + text[{len(_ASKED)}:-{len(_ENDS)}] + '{_IS}' %}}"
    "{% endif %}"
)
# Renders the LLaVA-1.5 prompt: "USER: <image>\n{text}\nASSISTANT:{answer prefix} {answer}</s>...",
# the answer prefix being " The color of the X is" after "What is the color of the X?" and "" otherwise.
CHAT_TEMPLATE = (
    "{% set ns = namespace(prefix='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for content in message['content'] if content['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ content['text'] + '\n' }}"
    "{% set text = content['text'] %}" + _PREFIX + "{% endfor %}"
    "{% else %}{{ 'ASSISTANT:' + ns.prefix }}"
    "{% for content in message['content'] if content['type'] == 'text' %}{{ ' ' + content['text'] }}{% endfor %}"
    "{{ '</s>' }}{% set ns.prefix = '' %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' + ns.prefix }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer, built offline from ``VOCAB``.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` and
        ``<image>`` special tokens that prepends ``<s>`` when encoding.
    """
    vocab = {word: i for i, word in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Keep every newline, letter run and punctuation mark; drop spaces and tabs.
    keep = Regex(r"\n|[A-Za-z]+|[^\sA-Za-z]")
    tok.pre_tokenizer = pre_tokenizers.Split(keep, behavior="removed", invert=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos = vocab[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        image_token=IMAGE_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def build_image_processor() -> CLIPImageProcessor:
    """A ``CLIPImageProcessor`` for Shapes scenes: 64 px, OpenAI CLIP normalisation."""
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )


def build_processor() -> LlavaProcessor:
    """The Shapes ``LlavaProcessor``; one ``<image>`` expands into 64 image tokens."""
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
