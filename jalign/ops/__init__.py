"""Fused ops: hidden states -> per-token log-probs without [tokens, vocab] logits."""

from jalign.ops.divergence import token_divergence
from jalign.ops.logprobs import BlockSizes, TokenLogprobs, token_logprobs

__all__ = ["BlockSizes", "TokenLogprobs", "token_divergence", "token_logprobs"]
