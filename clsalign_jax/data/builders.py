"""TFDS builders writing ArrayRecord (no TensorFlow needed): `safety_mix` and `safety_pretrain_corpus`.

    builder = SafetyMix(data_dir=...)                        # the shipped mixture
    builder = SafetyMix(data_dir=..., config=safety_mix_config([UserFile("mine.jsonl", ...)]))
    source = prepare(builder)["train"]                       # random-access, records are dicts

Records come back as dicts of numpy scalars / bytes: {"id", "prompt", "response", "label", "source"}
(`safety_mix`) and {"id", "text", "label", "source"} (`safety_pretrain_corpus`); label 1 = malicious.
A user config's name is a fingerprint of its files' bytes and settings, so editing a file gives a new
dataset directory instead of silently reusing stale data.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from clsalign_jax.data import curation, mixture
from clsalign_jax.data.records import (
  LABEL_NAMES,
  DataError,
  FieldMap,
  _apportion,
  iter_text_records,
  normalize_prompt,
  read_sft_records,
)

_SHIPPED_LICENSE = (
  "CC BY-NC-SA 4.0 for the prepared mixture (the most restrictive component, LIMA); "
  "AlpacaEval and safety-tuned-llamas data CC BY-NC 4.0; AdvBench MIT. Research, non-commercial use."
)


@dataclasses.dataclass(frozen=True)
class UserFile:
  """One user file for `safety_mix`: where it is, how to read it, and optionally its split."""

  path: str
  fields: FieldMap = FieldMap()
  default_label: int | None = None  # for files without a label column (all benign, say)
  source: str | None = None  # defaults to the file name
  split: str | None = None  # None: split automatically, stratified by label


@dataclasses.dataclass
class SafetyMixConfig(tfds.core.BuilderConfig):
  files: tuple[UserFile, ...] = ()  # empty: the shipped mixture
  mixture_version: str = "v2"  # without files: "v2" (data/curation.py) or "v1" (data/mixture.py, the first mixture)
  fractions: tuple[tuple[str, float], ...] = tuple(mixture.DEFAULT_SPLIT_FRACTIONS.items())
  split_seed: int = mixture.DEFAULT_SPLIT_SEED
  safety_phrase_filter: bool = True
  skip_bad_records: bool = False


@dataclasses.dataclass
class PretrainCorpusConfig(tfds.core.BuilderConfig):
  files: tuple[str, ...] = ()
  text_field: str = "text"
  label_field: str | None = "label"
  source_field: str | None = None
  id_field: str | None = None
  default_label: int | None = None
  validation_fraction: float = 0.01
  split_seed: int = mixture.DEFAULT_SPLIT_SEED
  skip_bad_records: bool = False


def safety_mix_config(
  files: Sequence[UserFile],
  *,
  fractions: Mapping[str, float] = mixture.DEFAULT_SPLIT_FRACTIONS,
  split_seed: int = mixture.DEFAULT_SPLIT_SEED,
  safety_phrase_filter: bool = True,
  skip_bad_records: bool = False,
  name: str | None = None,
) -> SafetyMixConfig:
  """A `safety_mix` config over user files (JSONL / JSON / CSV with a field mapping)."""
  files = tuple(files)
  settings = (tuple(fractions.items()), split_seed, safety_phrase_filter, skip_bad_records)
  return SafetyMixConfig(
    name=name or "user_" + _fingerprint([f.path for f in files], repr((files, settings))),
    description="safety_mix built from user files",
    files=files,
    fractions=tuple(fractions.items()),
    split_seed=split_seed,
    safety_phrase_filter=safety_phrase_filter,
    skip_bad_records=skip_bad_records,
  )


def pretrain_corpus_config(files: Sequence[str], *, name: str | None = None, **settings) -> PretrainCorpusConfig:
  """A `safety_pretrain_corpus` config: text files with a per-document label (0/1)."""
  files = tuple(str(f) for f in files)
  return PretrainCorpusConfig(
    name=name or "user_" + _fingerprint(files, repr(sorted(settings.items()))),
    description="labelled pretraining text from user files",
    files=files,
    **settings,
  )


# TFDS derives a builder's code path (where it looks for a checksums file) through
# `importlib_resources`, a backport it does not install on Python >= 3.9; stating the path avoids it.
_CODE_PATH = epath.Path(__file__)


class SafetyMix(tfds.core.GeneratorBasedBuilder):
  """Safety SFT mixture: prompt / response / label (1 = malicious) / source."""

  code_path = _CODE_PATH

  VERSION = tfds.core.Version("2.1.0")
  RELEASE_NOTES = {
    "1.0.0": "LIMA + AlpacaEval (benign), safety-tuned-llamas (malicious), AdvBench (eval split).",
    "2.0.0": "`shipped` is mixture v2 (data/curation.py: new sources, form-balanced); v1 stays as config `v1`.",
    "2.1.0": "`shipped` adds the contrast source (benign prompts on harm topics, data/contrast.py) with the base "
    "model's answers from shipped/completions/contrast.jsonl; no rows while that file is absent. Existing rows "
    "keep their splits.",
  }
  BUILDER_CONFIGS = [
    SafetyMixConfig(
      name="shipped",
      description="Mixture v2 built from clsalign_jax/data/shipped by data/curation.py; see docs/data.md.",
    ),
    SafetyMixConfig(
      name="v1",
      mixture_version="v1",
      description="The first mixture (LIMA + AlpacaEval vs safety-tuned-llamas), kept to reproduce old runs.",
    ),
  ]

  def __init__(self, **kwargs):
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo is built directly: dataset_info_from_configs() would look for metadata files
    # next to this module.
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "prompt": tfds.features.Text(),
          "response": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=LABEL_NAMES),
          "source": tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      license=_SHIPPED_LICENSE if not self.builder_config.files else "as the user's files",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    config = self.builder_config
    if not config.files and config.mixture_version == "v2":
      rows, report = curation.build_mixture_v2()
      splits = {name: [r.record for r in rs] for name, rs in rows.items()}
    elif not config.files:
      splits, report = mixture.build_safety_mix(dict(config.fractions), config.split_seed)
    else:
      splits, report = _user_mix(config)
    self.info.metadata.update(report.as_metadata())
    return {name: self._generate_examples(rows) for name, rows in splits.items()}

  def _generate_examples(self, rows):
    for r in rows:
      yield (
        r.id,
        {
          "id": r.id,
          "prompt": r.prompt,
          "response": r.response,
          "label": r.label,
          "source": r.source,
        },
      )


class SafetyPretrainCorpus(tfds.core.GeneratorBasedBuilder):
  """Pretraining text with a per-document safety label (the paper: Wikipedia labelled by
  Llama-Guard-3; any labelled text works). Splits: train, validation."""

  code_path = _CODE_PATH

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "JSONL / JSON / CSV text with a 0/1 label per document."}

  def __init__(self, **kwargs):
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "text": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=LABEL_NAMES),
          "source": tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    if config is None or not config.files:
      raise ValueError(
        "safety_pretrain_corpus needs files: SafetyPretrainCorpus(config=pretrain_corpus_config([...]), data_dir=...)"
      )
    fractions = {"train": 1.0 - config.validation_fraction, "validation": config.validation_fraction}
    plan = _CorpusSplits(config, fractions)
    self.info.metadata.update(plan.metadata)
    return {name: self._generate_examples(plan, name) for name in fractions}

  def _generate_examples(self, plan: _CorpusSplits, split: str):
    # The files are read again per split rather than held: a corpus need not fit in memory.
    for r in _iter_corpus(plan.config, []):
      if plan.split_of(r.text) == split:
        yield r.id, {"id": r.id, "text": r.text, "label": r.label, "source": r.source}


class _CorpusSplits:
  """`records.assign_splits` over a corpus read as a stream, holding 17 bytes per document.

  One pass keeps each document's label and the first 16 bytes of the salted SHA-256 of its
  normalised text (the key `assign_splits` orders groups by; equal texts are one group). The
  groups are then cut per label exactly as `assign_splits` cuts them, and only the smaller split's
  digests are kept to answer `split_of` while the examples are generated.
  """

  def __init__(self, config: PretrainCorpusConfig, fractions: Mapping[str, float]):
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
      raise ValueError(f"split fractions must sum to 1, got {dict(fractions)}")
    if len(fractions) != 2:
      raise ValueError(f"a corpus splits into two parts, got {list(fractions)}")
    self.config, self.names = config, list(fractions)
    digests, labels = bytearray(), array.array("b")
    skipped = _Capped(100)
    for r in _iter_corpus(config, skipped):
      digests += self._digest(r.text)
      labels.append(r.label)
    doc_labels = np.frombuffer(labels, np.int8) if labels else np.zeros(0, np.int8)
    keys = np.frombuffer(bytes(digests), dtype=[("hi", ">u8"), ("lo", ">u8")])
    # Big-endian halves sort like assign_splits' hex digests; a group's label is its documents' largest.
    groups, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    group_label = np.zeros(len(groups), np.int8)
    np.maximum.at(group_label, inverse, doc_labels)
    group_split = np.zeros(len(groups), np.int8)
    for s in np.unique(group_label):
      members = np.flatnonzero(group_label == s)
      start = 0
      for k, count in enumerate(_apportion(len(members), list(fractions.values()))):
        group_split[members[start : start + count]] = k
        start += count
    doc_split = group_split[inverse]
    per_split = np.bincount(doc_split, minlength=2)
    if len(labels) and per_split.min() == 0:
      # TFDS would stop on an empty split with an assertion that reads like its own bug.
      empty = self.names[int(np.argmin(per_split))]
      raise DataError(
        f"{', '.join(map(str, config.files))}: {len(labels)} documents leave the {empty!r} split empty "
        f"(fractions {dict(fractions)}); give more documents (about {int(np.ceil(1 / min(fractions.values())))} "
        "or more) or a larger validation_fraction"
      )
    self.rare = int(np.argmin(np.bincount(group_split, minlength=2)))
    self.rare_digests = {g.tobytes() for g in groups[group_split == self.rare]}
    self.metadata = {
      "read": len(labels) + skipped.count,
      "skipped_bad_records": skipped.count,
      "skipped_examples": list(skipped),
      "split_counts": {
        name: {
          "benign": int(((doc_split == k) & (doc_labels == 0)).sum()),
          "malicious": int(((doc_split == k) & (doc_labels == 1)).sum()),
        }
        for k, name in enumerate(self.names)
      },
    }

  def _digest(self, text: str) -> bytes:
    return hashlib.sha256(f"{self.config.split_seed}\0{normalize_prompt(text)}".encode()).digest()[:16]

  def split_of(self, text: str) -> str:
    return self.names[self.rare if self._digest(text) in self.rare_digests else 1 - self.rare]


class _Capped(list):
  """Keeps the first `limit` reasons and counts them all."""

  def __init__(self, limit: int):
    super().__init__()
    self.limit, self.count = limit, 0

  def append(self, item):
    self.count += 1
    if len(self) < self.limit:
      super().append(item)


def _iter_corpus(config: PretrainCorpusConfig, skipped: list):
  for path in config.files:
    yield from iter_text_records(
      path,
      text_field=config.text_field,
      label_field=config.label_field,
      source_field=config.source_field,
      id_field=config.id_field,
      default_label=config.default_label,
      skip_bad_records=config.skip_bad_records,
      skipped=skipped,
    )


def prepare(builder: tfds.core.GeneratorBasedBuilder) -> Mapping:
  """Writes the dataset if needed (offline) and returns {split: random-access data source}."""
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder.as_data_source()


def _user_mix(config: SafetyMixConfig):
  report = mixture.MixtureReport()
  auto, fixed, skipped = [], {}, []
  for f in config.files:
    result = read_sft_records(
      f.path,
      f.fields,
      default_label=f.default_label,
      default_source=f.source,
      skip_bad_records=config.skip_bad_records,
    )
    name = f.source or os.path.basename(f.path)
    report.read[name] = report.read.get(name, 0) + len(result.records) + len(result.skipped)
    skipped += result.skipped
    (auto if f.split is None else fixed.setdefault(f.split, [])).extend(result.records)
  report.skipped_bad_records = len(skipped)
  report.skipped_examples = skipped[:100]
  phrases = mixture.SAFETY_PHRASES if config.safety_phrase_filter else ()
  splits = mixture.curate(
    auto,
    report,
    fractions=dict(config.fractions),
    seed=config.split_seed,
    phrases=phrases,
    fixed_splits=fixed,
  )
  return splits, report


def _fingerprint(paths: Sequence[str], settings: str) -> str:
  h = hashlib.sha256(settings.encode())
  for p in paths:
    # In blocks: a corpus file may be larger than memory.
    file_hash = hashlib.sha256()
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        file_hash.update(block)
    h.update(file_hash.digest())
  return h.hexdigest()[:12]
