"""Per-layer transcoders (PLTs) for the language model's MLPs (and for the vision tower's MLPs and the
projector), beside the SAEs.

A transcoder reads an MLP's input and predicts its output through a sparse, wide layer of
features (`transcoder`), is stored in circuit-tracer's on-disk format (`io`: `config.yaml` plus
`layer_{i}.safetensors`), is trained on Shapes-world questions by streaming activations through
the model's hooks (`train`), and gets a card with its reconstruction and accuracy numbers (`card`).

    >>> from hooked_llava.transcoders import load_transcoders
    >>> ts = load_transcoders("shapes-llava")
    >>> len(ts), ts.feature_input_hook
    (8, 'blocks.{layer}.ln2.hook_normalized')
    >>> vision_ts = load_transcoders("shapes-llava-vision")  # 3 vision MLPs, then the projector
    >>> vision_ts.input_hook(0), vision_ts.output_hook(3)
    ('vision.blocks.0.ln2.hook_normalized', 'projector.hook_out')

This package imports only torch, safetensors, PyYAML, tqdm and the model core; never `analyses` or `sae_lens`.
"""

from hooked_llava.transcoders.io import load_transcoders, save_transcoders
from hooked_llava.transcoders.transcoder import JumpReLU, SingleLayerTranscoder, TopK, TranscoderSet

__all__ = ["JumpReLU", "SingleLayerTranscoder", "TopK", "TranscoderSet", "load_transcoders", "save_transcoders"]
