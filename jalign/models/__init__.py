"""The decoder (one module with options for every family) and its heads."""

from jalign.models.config import PRESETS, ModelConfig
from jalign.models.heads import scalar_model_init_fn, sequence_scores
from jalign.models.transformer import Decoder, unembedding

__all__ = ["PRESETS", "Decoder", "ModelConfig", "scalar_model_init_fn", "sequence_scores",
           "unembedding"]
