"""The four stages of the Shapes LLaVA's training (see `train` for the whole run):
CLIP, the base LM (after associative recall), projector alignment and visual instruction tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPModel, LlamaForCausalLM, LlavaForConditionalGeneration

from hooked_llava.shapes.data import TEXT, answer_branch, collate, encode, pack, pixel_values, visual_prefix
from hooked_llava.shapes.loop import Logger, make_probe, optimise, qa_batch, token_loss, world_for
from hooked_llava.shapes.questions import CAPTION_QUESTION
from hooked_llava.shapes.recipe import FEATURE_LAYER, Recipe, clip_config, llava_config, text_config
from hooked_llava.shapes.scene import COLORS, SHAPES, describe_object, make_object
from hooked_llava.shapes.tokenizer import BOS, EOS, PAD, VOCAB, build_processor


def object_phrases() -> list[str]:
    """Every way a description can name one object (colour, shape and left/middle/right)."""
    placed = [make_object(shape, colour, 16, x0, 24) for colour in COLORS for shape in SHAPES for x0 in (2, 24, 46)]
    return [describe_object(o) for o in placed]


def train_clip(recipe: Recipe, seed: int, log: Logger) -> CLIPModel:
    """Stage 1: contrastive CLIP on scenes and their captions (caption pooled at ``</s>``).

    With ``recipe.region_weight``, a region-text term is added, as in RegionCLIP: each object's
    patches (the mean of the layer that LLaVA reads, -2) are contrasted with every phrase a
    description can name an object by ("a red circle on the left"). Whole-scene captions are
    told apart by colours and positions alone, so on its own the contrastive loss hardly
    teaches shape; the region term does, where the language model will look for it.
    Returns the CLIP model; its accuracy is the scene retrieval's, or the region term's.
    """
    torch.manual_seed(seed)
    clip, world, B = CLIPModel(clip_config()), world_for(seed, 1), recipe.clip.batch
    phrases = object_phrases()
    phrase_index = {p: i for i, p in enumerate(phrases)}
    phrase_ids = torch.tensor([list(encode(p)) + [VOCAB.index(EOS)] for p in phrases])  # all the same length

    def embed_text(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        hidden = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(clip.text_projection(hidden[torch.arange(len(ids)), lengths - 1]), dim=-1)

    def loss_fn(step: int):
        scenes = [world.scene(step * B + j) for j in range(B)]
        caps = [list(encode(s.describe())) + [VOCAB.index(EOS)] for s in scenes]
        ids = torch.full((B, max(map(len, caps))), VOCAB.index(PAD))
        for j, c in enumerate(caps):
            ids[j, : len(c)] = torch.tensor(c)
        t = embed_text(ids, torch.tensor([len(c) for c in caps]))
        out = clip.vision_model(pixel_values=pixel_values([s.image for s in scenes]), output_hidden_states=True)
        v = F.normalize(clip.visual_projection(out.pooler_output), dim=-1)
        scale = clip.logit_scale.exp()
        logits, labels = scale * v @ t.T, torch.arange(B)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        if not recipe.region_weight:
            return loss, (logits.argmax(-1) == labels).float().mean().item()
        patches = out.hidden_states[FEATURE_LAYER][:, 1:]
        regions, names = [], []
        for j, s in enumerate(scenes):
            for o, idx in zip(s.objects, world.object_patches(s)):
                regions.append(patches[j, idx].mean(0))
                names.append(phrase_index[describe_object(o, world.image_size)])
        r = F.normalize(clip.visual_projection(clip.vision_model.post_layernorm(torch.stack(regions))), dim=-1)
        p = embed_text(phrase_ids, torch.full((len(phrases),), phrase_ids.shape[1]))
        region_logits, names = scale * r @ p.T, torch.tensor(names)
        loss = loss + recipe.region_weight * F.cross_entropy(region_logits, names)
        return loss, (region_logits.argmax(-1) == names).float().mean().item()

    optimise("clip", list(clip.parameters()), recipe.clip, loss_fn, log, recipe.log_every)
    return clip


def train_binding(lm: LlamaForCausalLM, recipe: Recipe, seed: int, log: Logger) -> int:
    """Stage 2a: associative recall, ``<s> red circle blue square green star square`` → ``blue``.

    Recalling the colour of a named shape needs two attention heads that work together (one
    copies each colour onto the next token, one finds the named shape). On full-length prompts
    the model sits on a long plateau before it finds them; on these short sequences it finds
    them in a few hundred steps, and the full prompts are then learned quickly. Stops once the
    recall accuracy reaches ``recipe.bind_until``. Returns the number of steps taken.
    """
    g, B = torch.Generator().manual_seed(seed), recipe.bind.batch
    colours = torch.tensor([VOCAB.index(c) for c in COLORS])
    shapes = torch.tensor([VOCAB.index(s) for s in SHAPES])

    def loss_fn(step: int):
        n = torch.randint(2, 4, (), generator=g).item()
        keys = shapes[torch.stack([torch.randperm(len(SHAPES), generator=g)[:n] for _ in range(B)])]
        values = colours[torch.randint(0, len(COLORS), (B, n), generator=g)]
        asked = torch.randint(0, n, (B,), generator=g)
        rows = torch.arange(B)
        bos = torch.full((B, 1), VOCAB.index(BOS))
        ids = torch.cat([bos, torch.stack([values, keys], -1).reshape(B, 2 * n), keys[rows, asked, None]], 1)
        logits = lm(input_ids=ids).logits[:, -1]
        target = values[rows, asked]
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean().item()

    return optimise("bind", list(lm.parameters()), recipe.bind, loss_fn, log, recipe.log_every, until=recipe.bind_until)


def train_lm(recipe: Recipe, seed: int, log: Logger) -> tuple[LlamaForCausalLM, int]:
    """Stage 2: the base LM, first on associative recall, then on scene descriptions and text-only QA.

    Returns the model and the number of recall steps taken.
    """
    torch.manual_seed(seed)
    lm, world = LlamaForCausalLM(text_config()), world_for(seed, 2)
    torch.nn.init.normal_(lm.model.embed_tokens.weight, std=recipe.embed_init)
    bind_steps = train_binding(lm, recipe, seed, log) if recipe.bind.steps else 0

    def loss_fn(step: int):
        b = collate(qa_batch(world, step, recipe.lm.batch, False, recipe))
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        return token_loss(logits, b, recipe.text_weight)

    probe = make_probe(recipe, "lm text", lm, build_processor().tokenizer, False, log)
    optimise("lm", list(lm.parameters()), recipe.lm, loss_fn, log, recipe.log_every, probe)
    return lm, bind_steps


def assemble(clip: CLIPModel, lm: LlamaForCausalLM) -> LlavaForConditionalGeneration:
    """A LLaVA from the CLIP vision tower, a fresh projector and the base LM (all copied)."""
    llava = LlavaForConditionalGeneration(llava_config())
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    return llava


def llava_loss(llava: LlavaForConditionalGeneration, seqs: list, text_weight: float) -> tuple[torch.Tensor, float]:
    b = collate(seqs)
    out = llava(
        input_ids=b["input_ids"],
        pixel_values=b.get("pixel_values"),
        attention_mask=b["attention_mask"],
        position_ids=b["position_ids"],
    )
    return token_loss(out.logits, b, text_weight)


@torch.no_grad()
def calibrate_projector(llava: LlavaForConditionalGeneration, images: list, log: Logger) -> None:
    """Scale the fresh projector's output to the mean norm of the LM's token embeddings.

    At HF's default initialisation, image tokens enter the residual stream about twenty times
    smaller than word embeddings (whose initial std is ``recipe.embed_init``), where the first
    attention layers' outputs swamp them. Rescaling the last linear layer once, on a batch of
    scenes that no stage trains on, puts them at the scale the LM was trained on.
    """
    model, proj = llava.model, llava.model.multi_modal_projector
    features = torch.cat(list(model.get_image_features(pixel_values=pixel_values(images)).pooler_output))
    target = model.language_model.embed_tokens.weight.norm(dim=-1).mean()
    ratio = target / features.norm(dim=-1).mean()
    proj.linear_2.weight.mul_(ratio)
    proj.linear_2.bias.mul_(ratio)
    log(f"projector output scaled by {ratio.item():.1f} to the embeddings' mean norm {target.item():.1f}")


def train_align(llava: LlavaForConditionalGeneration, recipe: Recipe, seed: int, log: Logger) -> None:
    """Stage 3: only the projector learns, on captioning."""
    torch.manual_seed(seed)
    world, B = world_for(seed, 3), recipe.align.batch
    llava.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)
    calibrate_projector(llava, [world.scene(10**9 + j).image for j in range(B)], log)
    prefix = visual_prefix()

    def loss_fn(step: int):
        scenes = [world.scene(step * B + j) for j in range(B)]
        seqs = [
            pack(*prefix, [answer_branch(CAPTION_QUESTION, s.describe(), kind=TEXT)], image=s.image) for s in scenes
        ]
        return llava_loss(llava, seqs, 1.0)

    optimise(
        "align", list(llava.model.multi_modal_projector.parameters()), recipe.align, loss_fn, log, recipe.log_every
    )


def train_tune(llava: LlavaForConditionalGeneration, recipe: Recipe, seed: int, log: Logger) -> None:
    """Stage 4: projector and LM on visual QA, with a share of text-only QA."""
    torch.manual_seed(seed)
    world, B = world_for(seed, 4), recipe.tune.batch
    n_text = round(B * recipe.text_share)
    llava.requires_grad_(True)
    llava.model.vision_tower.requires_grad_(False)

    def loss_fn(step: int):
        seqs = qa_batch(world, step, B - n_text, True, recipe)
        seqs += qa_batch(world, step, n_text, False, recipe, offset=3)
        return llava_loss(llava, seqs, recipe.text_weight)

    params = [p for p in llava.parameters() if p.requires_grad]
    probe = make_probe(recipe, "llava visual", llava, build_processor(), True, log)
    optimise("tune", params, recipe.tune, loss_fn, log, recipe.log_every, probe)
