"""The training loop's entry point: `make_data_iterator(config, split, shard_index, shard_count, inputs)`.

It reads the training config (`clsalign_jax.config`) and returns a grain iterator over this shard's
rows of each global batch, with JSON-able `get_state()` / `set_state()`. `inputs` (`TextInputs`) are
the tokenizer and chat template the run resolved once (`resolve_text_inputs`, which the training
entry calls with the tokenizer `config.init_from` carries); without them they are resolved from the
config. Fields it uses:

    config.data.source             'safety_mix' (SFT) or 'wiki_pretrain' / 'safety_pretrain_corpus'
    config.data.seq_len            row length (rows are padded to it unless bucket_lengths is set)
    config.data.global_batch_size  rows per global batch
    config.train.mode, config.seed, config.model (for the vocabulary check)

and these, declared with their defaults (in brackets) in clsalign_jax/config.py:

    config.data.data_dir          TFDS directory [$TFDS_DATA_DIR or ~/tensorflow_datasets]
    config.data.tokenizer         'smollm2', 'mistral', or a .gguf / .model / tokenizer.json path
                                  [derived from config.init_from: gguf:FILE, hf:DIR]
    config.data.template          'llama2' | 'mistral' | 'chatml' | 'qwen2_5' | 'llama3' [the model
                                  family's own where it has one format (qwen2: qwen2_5), else chatml
                                  for ChatML vocabularies, else llama2, the paper's template for
                                  both Llama-2 and Mistral]
    config.data.files             user files: JSONL with prompt/response/label (SFT) or text/label
                                  (pretraining) [the shipped mixture; required for pretraining]
    config.data.balance_classes   oversample the minority label in training [True]
    config.data.bucket_lengths    pad to the smallest fitting length instead of seq_len [()]
    config.data.skip_bad_records  [False]
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

from clsalign_jax import model as model_lib
from clsalign_jax.data import builders, pipeline, streaming, templates, views
from clsalign_jax.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

SFT_SOURCES = ("safety_mix",)
PRETRAIN_SOURCES = ("wiki_pretrain", "safety_pretrain_corpus")


@dataclasses.dataclass(frozen=True)
class TextInputs:
  """The tokenizer and chat template a run's rows are made with, resolved once per run
  (`resolve_text_inputs`) and handed to every iterator the run opens, so none works them out again."""

  tokenizer_spec: str  # what `tokenizer` was loaded from ('smollm2', 'mistral', a path); the run facts record it
  tokenizer: Tokenizer  # its [CLS] / BOS / EOS ids fit the model (checked when resolved)
  template: str  # chat template name of SFT rows: config.data.template, else templates.training_default


def resolve_text_inputs(config, model_cfg: model_lib.ModelConfig, tokenizer_spec: str | None = None) -> TextInputs:
  """Load the tokenizer `tokenizer_spec` (None or '': config.data.tokenizer), check that it fits
  `model_cfg`, and pick the template. The data room never parses a checkpoint spec: the training
  entry passes the tokenizer `config.init_from` carries (clsalign_jax.train.inputs)."""
  tokenizer_spec = tokenizer_spec or _tokenizer_spec(config)
  # Fitted to the model: embedding rows past its tokens (Qwen2.5's padded vocabulary) and the
  # model's BOS when the tokenizer names none; a tokenizer larger than the model is refused below.
  tokenizer = load_tokenizer(tokenizer_spec).for_model(model_cfg.vocab_size, model_cfg.bos_id)
  if (tokenizer.cls_id, tokenizer.bos_id, tokenizer.eos_id) != (
    model_cfg.vocab_size,
    model_cfg.bos_id,
    model_cfg.eos_id,
  ):
    raise ValueError(
      f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, eos "
      f"{tokenizer.eos_id}) does not fit the model (vocab {model_cfg.vocab_size}, bos "
      f"{model_cfg.bos_id}, eos {model_cfg.eos_id}); set config.data.tokenizer"
    )
  template = config.data.template or templates.training_default(tokenizer, model_cfg.family_spec)
  return TextInputs(tokenizer_spec, tokenizer, template)


def make_data_iterator(config, split: str, shard_index: int, shard_count: int, inputs: TextInputs | None = None):
  """A resumable iterator of this shard's rows [shard_index·b, (shard_index+1)·b) per batch.

  The pretraining train split is the exception: it streams (data/streaming.py), and a shard's b rows
  per batch are its own documents (every shard_count-th of the shuffled order, from shard_index).
  `inputs`: the run's tokenizer and template (None: `resolve_text_inputs` from config.data).
  """
  data = config.data
  if inputs is None:
    inputs = resolve_text_inputs(config, model_lib.config_from_fields(config.model))
  tokenizer = inputs.tokenizer
  training = split == "train"
  sft = data.source in SFT_SOURCES
  files = tuple(data.files)
  if training and data.source in PRETRAIN_SOURCES:
    # A corpus may be Wikipedia-sized: documents are read, tokenised and cut into rows per host as
    # training consumes them (data/streaming.py), never encoded up front.
    stream_config = pipeline.PipelineConfig(
      max_length=int(data.seq_len),
      batch_size=int(data.global_batch_size),
      shuffle=True,
      seed=int(config.seed),
      num_epochs=None,
      skip_bad_records=bool(data.skip_bad_records),
    )
    documents = _documents(
      data.source,
      split,
      os.path.expanduser(data.data_dir or _default_data_dir()),
      files,
      bool(data.skip_bad_records),
    )
    return iter(
      streaming.DocumentStream(
        documents, tokenizer, stream_config, process_index=shard_index, process_count=shard_count
      )
    )
  if sft and config.views.enabled:
    return iter(
      views_pipeline(config, split, tokenizer, inputs.tokenizer_spec, shard_index, shard_count, inputs.template)
    )
  corpus = _encoded(
    data.source,
    split,
    os.path.expanduser(data.data_dir or _default_data_dir()),
    files,
    tokenizer,
    inputs.template,
    int(data.seq_len),
    bool(data.skip_bad_records),
  )
  pipeline_config = pipeline.PipelineConfig(
    max_length=int(data.seq_len),
    batch_size=int(data.global_batch_size),
    bucket_lengths=tuple(data.bucket_lengths),
    balance_classes=training and sft and bool(data.balance_classes),
    shuffle=training,
    seed=int(config.seed),
    num_epochs=None if training else 1,
    drop_remainder=training,
  )
  batches = pipeline.Pipeline(
    corpus,
    pipeline_config,
    pad_id=tokenizer.pad_id,
    process_index=shard_index,
    process_count=shard_count,
  )
  if training and data.num_train_examples not in (0, batches.examples_per_epoch):
    log.warning(
      "config.data.num_train_examples=%d, but an epoch of %s/%s holds %d examples; "
      "epoch-based step counts and LR decay use the config value",
      data.num_train_examples,
      data.source,
      split,
      batches.examples_per_epoch,
    )
  return iter(batches)


def views_pipeline(
  config, split, tokenizer, tokenizer_spec, shard_index, shard_count, template: str | None = None
) -> views.ViewsPipeline:
  """`template`: the run's chat template name (None: config.data.template, else the tokenizer's default)."""
  data, v = config.data, config.views
  settings = views.ViewSettings(
    r2=int(v.r2), r3=int(v.r3), response_tokens=int(v.response_tokens), rule3_share=float(v.rule3_share)
  )
  corpus = _view_corpus(
    split,
    os.path.expanduser(data.data_dir or _default_data_dir()),
    tuple(data.files),
    tokenizer,
    template or data.template or templates.training_default(tokenizer, _family(config)),
    v.completions,
    settings,
    int(v.max_prompt_tokens),
  )
  training = split == "train"
  pipeline_config = pipeline.PipelineConfig(
    max_length=int(data.seq_len),
    batch_size=int(data.global_batch_size),
    balance_classes=training and bool(data.balance_classes),
    shuffle=training,
    seed=int(config.seed),
    num_epochs=None if training else 1,
    drop_remainder=training,
    # Batches of similar lengths: a row is as long as the batch's longest example (prompts run
    # from 30 to 500 tokens), so grouping cuts most of the padding.
    length_grouping=16,
    group_mixes_labels=True,
  )
  return views.ViewsPipeline(
    corpus, pipeline_config, settings, pad_id=tokenizer.pad_id, process_index=shard_index, process_count=shard_count
  )


def completions_path(spec: str) -> str:
  """A completions file: a path, or the name of a shipped one (data/shipped/completions/NAME.jsonl)."""
  if not spec or os.path.exists(spec):
    return spec
  shipped = os.path.join(os.path.dirname(__file__), "shipped", "completions", f"{spec}.jsonl")
  if os.sep not in spec and os.path.exists(shipped):
    return shipped
  raise ValueError(f"config.views.completions={spec!r}: no such file, and no shipped completions of that name")


@functools.lru_cache(maxsize=4)
def _view_corpus(split, data_dir, files, tokenizer, template_name, completions, settings, max_prompt_tokens):
  # Cached like _encoded: validation reopens its split at every evaluation.
  config = builders.safety_mix_config([builders.UserFile(f) for f in files]) if files else None
  records = builders.prepare(builders.SafetyMix(data_dir=data_dir, config=config))[split]
  path = completions_path(completions)
  return views.encode_views(
    records,
    tokenizer,
    templates.get_template(template_name),
    views.read_completions(path) if path else {},
    settings,
    max_prompt_tokens,
  )


def _tokenizer_spec(config) -> str:
  # The training entry passes the tokenizer init_from carries (clsalign_jax.train.inputs); the
  # data room never parses a checkpoint spec itself.
  if config.data.tokenizer:
    return config.data.tokenizer
  raise ValueError(
    f"config.data.tokenizer is empty and config.init_from={config.init_from!r} carries no tokenizer; "
    "set config.data.tokenizer ('smollm2', 'mistral' or a file)"
  )


def _family(config) -> str:
  """The model family of the run config `config` (config.model)."""
  return model_lib.config_from_fields(config.model).family


def _default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


@functools.lru_cache(maxsize=8)
def _encoded(source, split, data_dir, files, tokenizer, template_name, seq_len, skip_bad_records):
  # Cached: the eval split is re-opened at every evaluation, and encoding is the costly part. The
  # tokenizer is part of the key by identity: a run hands the same one to every iterator it opens.
  if source in SFT_SOURCES:
    config = (
      builders.safety_mix_config([builders.UserFile(f) for f in files], skip_bad_records=skip_bad_records)
      if files
      else None
    )
    records = builders.prepare(builders.SafetyMix(data_dir=data_dir, config=config))[split]
    return pipeline.encode_sft(
      records,
      tokenizer,
      templates.get_template(template_name),
      max_length=seq_len,
      skip_bad_records=skip_bad_records,
    )
  if source in PRETRAIN_SOURCES:
    records = _documents(source, split, data_dir, files, skip_bad_records)
    return pipeline.encode_documents(records, tokenizer, max_length=seq_len, skip_bad_records=skip_bad_records)
  raise ValueError(
    f"unknown config.data.source {source!r}; expected one of {SFT_SOURCES + PRETRAIN_SOURCES} or 'synthetic'"
  )


def _documents(source, split, data_dir, files, skip_bad_records):
  """The prepared pretraining corpus split: a random-access ArrayRecord source, read lazily."""
  if not files:
    raise ValueError(f"config.data.source={source!r} needs config.data.files (JSONL with text/label)")
  config = builders.pretrain_corpus_config(files, skip_bad_records=skip_bad_records)
  return builders.prepare(builders.SafetyPretrainCorpus(data_dir=data_dir, config=config))[split]
