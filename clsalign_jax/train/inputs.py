"""What a run reads besides its config: `init_from` and the data.

`InitFrom` parses `config.init_from` at most once (artifacts.parse_spec), and only when something
needs it: the tokenizer it carries (when `data.tokenizer` is empty) or its weights (a fresh start,
state.py). `resolve_text_inputs` turns that into the data room's `TextInputs` (tokenizer, chat
template), which the run context hands to every iterator it opens and to the run facts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from clsalign_jax import artifacts, synthetic
from clsalign_jax import model as model_lib

if TYPE_CHECKING:
  from clsalign_jax.data.sources import TextInputs


@dataclasses.dataclass(frozen=True)
class InitFrom:
  """`config.init_from`, parsed on first use and then kept."""

  text: str  # the spec as configured ('' when the run starts from random weights)

  @functools.cached_property
  def spec(self) -> artifacts.Spec:
    """The parsed spec; a malformed or missing one raises CheckpointError naming it."""
    return artifacts.parse_spec(self.text)

  @functools.cached_property
  def tokenizer_spec(self) -> str | None:
    """The tokenizer the checkpoint carries (artifacts.tokenizer_spec_of); None when it has none."""
    return artifacts.tokenizer_spec_of(self.spec) if self.text else None


def _data_room(config):
  """clsalign_jax.data.sources, imported on first use: it pulls in grain and TFDS, which synthetic
  runs (tests, smoke runs) never need."""
  try:
    from clsalign_jax.data import sources
  except ModuleNotFoundError as e:
    if e.name != "clsalign_jax.data":
      raise
    raise ValueError(
      f"config.data.source={config.data.source!r} needs the data pipeline package "
      "clsalign_jax.data, which is not installed; use config.data.source='synthetic'"
    ) from None
  return sources


def resolve_text_inputs(config, cfg: model_lib.ModelConfig, init: InitFrom) -> TextInputs | None:
  """The tokenizer and template the run's rows are made with (None for synthetic data): the
  tokenizer is `data.tokenizer`, else the one `init_from` carries; the data room loads it, checks it
  fits `cfg` and picks the template."""
  if config.data.source == "synthetic":
    return None
  sources = _data_room(config)
  return sources.resolve_text_inputs(config, cfg, config.data.tokenizer or init.tokenizer_spec)


def make_data_iterator(config, split: str, shard_index: int, shard_count: int, inputs: TextInputs | None = None):
  """The single place where a data source is chosen.

  Returns an iterator of dicts of numpy arrays holding rows [shard_index·b, (shard_index+1)·b)
  of each global batch (b = global_batch_size / shard_count), with JSON-able
  `get_state()` / `set_state(state)`. 'synthetic' is clsalign_jax.synthetic; every other
  source name goes to `clsalign_jax.data.sources.make_data_iterator` with the same arguments and
  `inputs`, the run's resolved tokenizer and template (None: resolved here from `config`).
  """
  if config.data.source == "synthetic":
    return synthetic.make_data_iterator(config, split, shard_index, shard_count)
  sources = _data_room(config)
  if inputs is None:
    inputs = resolve_text_inputs(config, model_lib.config_from_fields(config.model), InitFrom(config.init_from))
  return sources.make_data_iterator(config, split, shard_index, shard_count, inputs)


def with_tokenizer(config):
  """`config` with `data.tokenizer` filled from the checkpoint it starts from when it is empty (the
  caller's config is left as it was)."""
  if config.data.tokenizer or not config.init_from:
    return config
  found = InitFrom(config.init_from).tokenizer_spec
  if not found:
    return config
  config = config.copy_and_resolve_references()
  config.data.tokenizer = found
  return config
