"""Data room: tokenizers, chat templates with exact spans, TFDS builders, the grain pipeline.

Importing this package stays light (no grain, TFDS or jax): the pipeline names below and
`make_data_iterator` (the training loop's hook, in `sources`) load on first use; the TFDS builders
live in `clsalign_jax.data.builders`.
"""

from clsalign_jax.data.mixture import SAFETY_PHRASES, MixtureReport, build_safety_mix, load_advbench
from clsalign_jax.data.records import (
  DataError,
  FieldMap,
  SftRecord,
  TextRecord,
  normalize_prompt,
  read_sft_records,
  read_text_records,
)
from clsalign_jax.data.templates import (
  ChatTemplate,
  EncodedExample,
  PromptEncoding,
  SpanError,
  chatml_template,
  encode_document,
  encode_example,
  encode_prompt,
  get_template,
  llama2_template,
  mistral_template,
  query_text,
  render,
)
from clsalign_jax.data.tokenizer import Tokenizer, mistral_sentencepiece_path, smollm2_gguf_path

__all__ = [
  "SAFETY_PHRASES",
  "ChatTemplate",
  "DataError",
  "EncodedCorpus",
  "EncodedExample",
  "FieldMap",
  "MixtureReport",
  "Pipeline",
  "PipelineConfig",
  "PromptEncoding",
  "SftRecord",
  "SpanError",
  "TextRecord",
  "Tokenizer",
  "build_safety_mix",
  "chatml_template",
  "encode_document",
  "encode_documents",
  "encode_example",
  "encode_prompt",
  "encode_sft",
  "get_template",
  "llama2_template",
  "load_advbench",
  "make_data_iterator",
  "mistral_sentencepiece_path",
  "mistral_template",
  "normalize_prompt",
  "pretrain_pipeline",
  "query_text",
  "read_sft_records",
  "read_text_records",
  "render",
  "sft_pipeline",
  "smollm2_gguf_path",
]

_PIPELINE_NAMES = {
  "EncodedCorpus",
  "Pipeline",
  "PipelineConfig",
  "encode_documents",
  "encode_sft",
  "pretrain_pipeline",
  "sft_pipeline",
}


def __getattr__(name):
  # Plain imports inside the hook: grain and TFDS load only when a pipeline name is first used.
  if name in _PIPELINE_NAMES:
    from clsalign_jax.data import pipeline

    return getattr(pipeline, name)
  if name == "make_data_iterator":  # the training loop's hook (clsalign_jax.train.inputs)
    from clsalign_jax.data import sources

    return sources.make_data_iterator
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
