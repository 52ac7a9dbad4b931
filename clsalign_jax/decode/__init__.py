"""Decoding: sampling, the jitted generate loop with a KV cache, and strategic decoding."""

from clsalign_jax.decode.config import DecodeConfig, PAPER_REFUSAL, RELEASED_REFUSAL, SCHEDULES
from clsalign_jax.decode.loop import (
  DecodeInputs,
  DecodeOutput,
  RowResult,
  bucket,
  decode,
  generate_ids,
  pack_inputs,
  row_results,
)
from clsalign_jax.decode.sampling import Sampling, filter_logits, sample_tokens
from clsalign_jax.decode.text import Decoder, Encoded, Generation, refusal_ids
