"""Model configurations and training hyper-parameters of the Shapes LLaVA.

The language model is a small Llama (8 layers, 8 heads, width 128, untied embeddings); the
vision tower is a small CLIP ViT (64 px images, 8 px patches, 4 layers, quick_gelu); the
projector is LLaVA-1.5's two-layer GELU MLP. Features come from the second-to-last vision
layer with the CLS token dropped, as in LLaVA-1.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

from hooked_llava.shapes.questions import IMAGE_TOKEN
from hooked_llava.shapes.tokenizer import BOS, EOS, IMAGE_SIZE, PAD, PATCH_SIZE, VOCAB

WIDTH = 128
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
FEATURE_LAYER = -2  # the vision layer LLaVA-1.5 reads


def vision_config() -> CLIPVisionConfig:
    """The CLIP vision tower: 64 px, patch 8 (an 8×8 grid plus CLS), 4 layers of width 128."""
    return CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
        projection_dim=WIDTH,
    )


def text_config() -> LlamaConfig:
    """The Llama language model: 8 layers, 8 heads of width 16, MLP width 384."""
    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=WIDTH,
        intermediate_size=3 * WIDTH,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=VOCAB.index(BOS),
        eos_token_id=VOCAB.index(EOS),
        pad_token_id=VOCAB.index(PAD),
    )


def clip_config() -> CLIPConfig:
    """The CLIP trained in stage 1: the vision tower above and a 2-layer text tower."""
    text = CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=48,
        hidden_act="quick_gelu",
        projection_dim=WIDTH,
        bos_token_id=VOCAB.index(BOS),
        eos_token_id=VOCAB.index(EOS),
        pad_token_id=VOCAB.index(PAD),
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision_config().to_dict(), projection_dim=WIDTH)


def llava_config() -> LlavaConfig:
    """The LLaVA-1.5-style configuration: features from vision layer -2, CLS dropped."""
    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config(),
        image_token_id=VOCAB.index(IMAGE_TOKEN),
        image_seq_length=N_IMAGE_TOKENS,
        vision_feature_layer=FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


@dataclass(frozen=True)
class Stage:
    """Optimisation settings of one training stage (AdamW, linear warm-up, cosine decay)."""

    steps: int
    batch: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.01


@dataclass(frozen=True)
class Recipe:
    """The four stages of the LLaVA recipe, in miniature.

    Attributes:
        clip: Stage 1, contrastive CLIP on scenes and their captions.
        region_weight: Weight of stage 1's region-text term (each object's patches against the
            phrases naming objects); 0 for plain CLIP.
        bind: Stage 2a, associative recall of a shape's colour on short sequences (at most
            ``steps``; it stops at ``bind_until`` accuracy). ``steps=0`` skips it.
        bind_until: Recall accuracy (mean over a progress interval) that ends stage 2a.
        lm: Stage 2, the base language model on descriptions and text-only QA.
        align: Stage 3, the projector alone on captioning (vision tower and LM frozen).
        tune: Stage 4, projector and LM on visual QA plus some text-only QA (vision frozen).
        caption_prob: Chance that a QA sequence also carries a "Describe the image." branch.
        text_weight: Weight of the description and caption loss relative to the answers' loss.
        describe_loss: Whether text-only sequences have a language-modelling loss on the description.
        embed_init: Standard deviation of the base LM's initial token embeddings (HF uses 0.02;
            a larger one keeps token identity visible in the residual stream, which the
            recall questions need early in training).
        text_share: Share of text-only QA sequences in each stage-4 batch.
        log_every: Steps between progress lines.
        probe_every: Steps between validation checks during stages 2 and 4 (0: none).
        probe_n: Questions per category in those checks.
    """

    clip: Stage = field(default_factory=lambda: Stage(steps=1000, batch=96, lr=1e-3, warmup=30))
    region_weight: float = 5.0
    bind: Stage = field(default_factory=lambda: Stage(steps=3000, batch=48, lr=1e-3))
    bind_until: float = 0.98
    lm: Stage = field(default_factory=lambda: Stage(steps=2500, batch=16, lr=2e-3))
    align: Stage = field(default_factory=lambda: Stage(steps=300, batch=16, lr=1e-3, warmup=20))
    tune: Stage = field(default_factory=lambda: Stage(steps=3000, batch=16, lr=1e-3))
    caption_prob: float = 0.5
    text_weight: float = 0.2
    describe_loss: bool = True
    embed_init: float = 1.0
    text_share: float = 0.25
    log_every: int = 50
    probe_every: int = 0
    probe_n: int = 30

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every stage's step count (and warm-up) multiplied by ``factor``."""

        def f(s: Stage) -> Stage:
            return replace(s, steps=max(2, round(s.steps * factor)), warmup=max(1, round(s.warmup * factor)))

        stages = {k: f(getattr(self, k)) for k in ("clip", "bind", "lm", "align", "tune")}
        return replace(self, **stages)

    def to_dict(self) -> dict:
        return asdict(self)


def smoke_recipe() -> Recipe:
    """A few tiny steps of every stage, to check that the script still runs end to end."""
    tiny = Stage(steps=2, batch=4, lr=1e-3, warmup=1)
    return Recipe(clip=tiny, bind=tiny, lm=tiny, align=tiny, tune=tiny, log_every=1)
