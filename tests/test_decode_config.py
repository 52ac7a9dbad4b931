"""DecodeConfig: schedule definitions and validation."""

import pytest

from clsalign_jax.decode import PAPER_REFUSAL, DecodeConfig


def _steps(cfg, n=300):
  return [s for s in range(n) if bool(cfg.reclassify_at(s))]


def test_schedules():
  assert _steps(DecodeConfig(schedule="each"), 5) == [0, 1, 2, 3, 4]
  assert DecodeConfig(schedule="every").schedule == "each"
  assert _steps(DecodeConfig(schedule="first")) == []
  assert _steps(DecodeConfig(schedule="periodic"), 35) == [0, 10, 20, 30]
  assert _steps(DecodeConfig(schedule="annealing")) == [0, 1, 2, 4, 8, 16, 32, 64, 128]
  assert _steps(DecodeConfig(schedule="annealing", anneal_cutoff=9)) == [0, 1, 2, 4, 8]


def test_defaults_follow_the_project_decisions():
  """The defaults that docs/method.md §6 (decisions 3 and 5–10) describes."""
  cfg = DecodeConfig()
  assert (cfg.r1, cfg.r2, cfg.r3, cfg.tau, cfg.threshold, cfg.schedule) == (10, 10, 10, 3, 0.5, "each")
  assert cfg.tau_unit == "events" and cfg.prefill_visible and not cfg.rule2_include_query
  assert cfg.refusal_text == PAPER_REFUSAL and cfg.strategic_attention and cfg.strategic_decoding
  assert not cfg.end_after_refusal  # the paper's way: the model continues after an inserted refusal


@pytest.mark.parametrize(
  "kw",
  [
    {"schedule": "sometimes"},
    {"tau": 0},
    {"tau_unit": "tokens"},
    {"r2": -1},
    {"threshold": 1.5},
    {"max_new_tokens": 0},
    {"end_after_refusal": "false"},
  ],
)
def test_rejects_bad_values(kw):
  with pytest.raises(ValueError):
    DecodeConfig(**kw)


def test_presets_name_the_paper_settings_and_the_plain_model():
  from clsalign_jax.decode.config import CLS_RUN, NO_INTERVENTION, PLAIN

  run = DecodeConfig(**CLS_RUN)
  assert (run.schedule, run.r1, run.r2, run.r3, run.tau, run.strategic_decoding) == ("each", 5, 15, 10, 3, True)
  plain = DecodeConfig(**PLAIN)
  # The plain model: nothing re-classified, nothing inserted, no token reads the CLS slot.
  assert _steps(plain) == [] and not plain.strategic_decoding and not plain.response_sees_cls
  assert DecodeConfig(**NO_INTERVENTION).response_sees_cls and dict(PLAIN) == {
    **NO_INTERVENTION,
    "response_sees_cls": False,
  }
  with pytest.raises(TypeError):
    CLS_RUN["tau"] = 1  # shared by configs and fingerprints: read-only
