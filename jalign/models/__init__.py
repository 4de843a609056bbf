"""The decoder (one module with options for every family) and its heads."""

from jalign.models.config import PRESETS, ModelConfig
from jalign.models.heads import scalar_model_init_fn, sequence_scores
from jalign.models.hf import abstract_params, from_pretrained, save_pretrained
from jalign.models.transformer import (Decoder, decoder_init_fn, logits_from_hidden,
                                       unembedding)

__all__ = ["PRESETS", "Decoder", "ModelConfig", "abstract_params", "decoder_init_fn",
           "from_pretrained", "logits_from_hidden", "save_pretrained", "scalar_model_init_fn",
           "sequence_scores", "unembedding"]
