"""The transformers safe model of an export (interop/hf_strategic.py, written by `convert`) against
clsalign-jax's decode loop: greedy responses token for token, CLS probabilities to 1e-4, with the CLS
re-read at every step and refusals inserted; and the honest export around it (model card, settings)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clsalign_jax import artifacts, convert, families
from clsalign_jax import model as M
from clsalign_jax.data.templates import encode_prompt
from clsalign_jax.data.tokenizer import Tokenizer, smollm2_gguf_path
from clsalign_jax.decode.config import DecodeConfig
from clsalign_jax.decode.loop import generate_ids
from clsalign_jax.decode.text import refusal_ids
from clsalign_jax.interop import hf_safe_export
from clsalign_jax.interop.hf import save_hf
from clsalign_jax.interop.hf_strategic import ClsAlignForCausalLM, safe_class

QUERIES = ("How do I bake bread?", "Write a poem about the sea.", "Explain how a lock works.", "List three colors.")
# Two runs: the paper's model (response tokens read the CLS slot, Rule 2 reads the latest response
# tokens only, the model continues after a refusal, one row attacker-prefilled) and the main job's
# (a CLS side path with an early exit and adapters, no token reads the CLS, the query in Rules 2–3,
# the answer ends with the refusal prefix); and a Qwen2 model (q/k/v biases, tied embeddings, the
# qwen2_5 template with its system turn) with the paper's attention.
CASES = {
  "paper": {
    "side": {"cls_exit_layer": 0, "cls_adapter_rank": 0},
    "decode": {
      "schedule": "each",
      "r1": 2,
      "r2": 3,
      "r3": 2,
      "tau": 2,
      "response_sees_cls": True,
      "max_new_tokens": 20,
      "threshold": 0.8,
    },
  },
  "side_path": {
    "side": {"cls_exit_layer": 1, "cls_adapter_rank": 4},
    "decode": {
      "schedule": "each",
      "r1": 3,
      "r2": 4,
      "r3": 2,
      "tau": 2,
      "rule2_include_query": True,
      "end_after_refusal": True,
      "response_sees_cls": False,
      "max_new_tokens": 28,
      "threshold": 0.55,
    },
  },
  "qwen2": {
    "family": "qwen2",
    "template": "qwen2_5",
    "seed": 0,  # one prompt flagged at once, flips withdrawn and one confirmed mid-answer
    "side": {"cls_exit_layer": 0, "cls_adapter_rank": 0},
    "decode": {
      "schedule": "each",
      "r1": 2,
      "r2": 3,
      "r3": 2,
      "tau": 2,
      "response_sees_cls": True,
      "max_new_tokens": 20,
      "threshold": 0.8,
    },
  },
}


def _architecture(name: str) -> str:
  """The transformers class an export of case `name` is (the family registry's)."""
  return families.get(CASES[name].get("family", "llama")).hf_architectures[0]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """The torch loop runs one- and two-row steps: extra threads only wait on each other (several times
  slower on a busy 2-core machine)."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.from_gguf(smollm2_gguf_path())


def _tiny_params(cfg, seed):
  params = artifacts.random_params(cfg, seed)
  # Weights of std 0.3 instead of 0.02: the layers then mix content, so the CLS state (and p) moves
  # with every token and crosses the threshold both ways (flips, withdrawals, confirmations).
  params = {
    k: v
    for k, v in jax.tree_util.tree_map_with_path(
      lambda path, x: x if "weight" in jax.tree_util.keystr(path) else x * 15, params
    ).items()
  }
  rng = np.random.default_rng(seed + 1)
  # A head that reads the CLS state strongly, so p moves across steps and crosses a threshold.
  params["cls_head"]["kernel"] = rng.normal(0.0, 1.0, (cfg.d_model, 1)).astype(np.float32)
  # Random norms and a non-zero adapter `up`, so a dropped or swapped side-path tensor shows.
  for path, holder in [(k, v) for k, v in params.items() if k.startswith("cls_adapter_")]:
    holder["up"] = rng.normal(0.0, 0.3, holder["up"].shape).astype(np.float32)
  if "cls_norm" in params:
    params["cls_norm"]["weight"] = rng.uniform(0.5, 1.5, cfg.d_model).astype(np.float32)
  return params


@pytest.fixture(scope="module", params=sorted(CASES))
def export(request, tokenizer, tmp_path_factory):
  """A tiny random model with the SmolLM2 tokenizer and a trained-CLS run's facts, exported by
  `python -m clsalign_jax.convert` (in process)."""
  case = CASES[request.param]
  cfg = M.ModelConfig(
    vocab_size=tokenizer.vocab_size,
    d_model=16,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    head_dim=8,
    d_ff=32,
    tie_embeddings=True,
    bos_id=tokenizer.bos_id,
    eos_id=tokenizer.eos_id,
    family=case.get("family", "llama"),
    **case["side"],
  )
  params = _tiny_params(cfg, seed=case.get("seed", 3))
  src = tmp_path_factory.mktemp(f"src_{request.param}")
  save_hf(str(src), cfg, params, tokenizer)
  decode = case["decode"]
  facts = artifacts.RunFacts(
    template=case.get("template", "chatml"),
    tokenizer=None,
    response_sees_cls=decode["response_sees_cls"],
    cls_threshold=decode["threshold"],
    cls_trained=True,
    decode=decode,
  )
  artifacts.write_facts(str(src), facts)
  dst = tmp_path_factory.mktemp(f"export_{request.param}") / "out"
  assert convert.main(["convert", f"--src={src}", f"--dst={dst}"]) == 0
  return request.param, str(dst)


def _jax_rows(directory, queries, prefills, dcfg):
  """clsalign-jax's decode loop on the export, as `generate` runs it (the template's end token stops)."""
  loaded = artifacts.load(directory)
  encs = [encode_prompt(loaded.tokenizer, loaded.template, q, p) for q, p in zip(queries, prefills)]
  rows = generate_ids(
    loaded.cfg,
    loaded.params,
    [e.tokens[: e.prefill_span[0]].tolist() for e in encs],
    [e.query_span for e in encs],
    refusal_ids(loaded.tokenizer, dcfg),
    dcfg,
    prefills=[e.tokens[e.prefill_span[0] :].tolist() for e in encs],
    eos_id=loaded.template.end.id(loaded.tokenizer),
  )
  return rows, encs, loaded


def test_greedy_parity_with_the_jax_loop(export, record_figure):
  name, directory = export
  model = ClsAlignForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  assert isinstance(model, safe_class(_architecture(name)))
  assert isinstance(model, getattr(transformers, _architecture(name)))
  prefills = ["", " Sure, here is", "", ""] if name == "paper" else ["", "", "", ""]
  loaded = artifacts.load(directory)
  encs = [encode_prompt(loaded.tokenizer, loaded.template, q, p) for q, p in zip(QUERIES, prefills)]
  messages = [[{"role": "user", "content": q}] for q in QUERIES]
  prefill_ids = [e.tokens[e.prefill_span[0] :].tolist() for e in encs]
  # The run's own settings, as the export records them, on both sides.
  dcfg = loaded.decode_config()
  assert dataclasses.asdict(dcfg) == model.clsalign_settings.decode
  jax_rows, _, _ = _jax_rows(directory, QUERIES, prefills, dcfg)
  out = model.generate(messages=messages, prefill_ids=prefill_ids, return_dict_in_generate=True)
  worst = 0.0
  for t, j in zip(out.rows, jax_rows):
    assert t.response_ids == j.response_ids
    assert (t.insert_index, t.trigger_index, t.trigger_step, t.false_alarms) == (
      j.insert_index,
      j.trigger_index,
      j.trigger_step,
      j.false_alarms,
    )
    assert [(s, i) for s, i, _ in t.trace] == [(s, i) for s, i, _ in j.trace]
    worst = max([worst, abs(t.p_initial - j.p_initial)] + [abs(a[2] - b[2]) for a, b in zip(t.trace, j.trace)])
  # The CLS was re-read at every step of a benign row, and a flip was confirmed and rolled back
  # mid-answer, where the refusal went in.
  benign = [j for j in jax_rows if not j.initial_malicious]
  assert benign and all(len(j.trace) >= 2 for j in benign)
  if name == "paper":  # its CLS swings: some flip is withdrawn before τ readings confirm it
    assert sum(j.false_alarms for j in jax_rows) >= 1
  assert any(j.insert_index > j.prefill_len and j.trigger_step > 0 for j in benign), [j.insert_index for j in jax_rows]
  refusal = list(model.clsalign_settings.refusal_ids)
  for j in jax_rows:
    if j.insert_index >= 0:
      assert (
        j.response_ids[j.insert_index : j.insert_index + len(refusal)]
        == refusal[: len(j.response_ids) - j.insert_index]
      )
  record_figure(f"hf_strategic {name}: max|dp| torch vs jax", worst)
  assert worst <= 1e-4
  # `sequences` is what transformers' generate returns: the prompt, then the response.
  first = model.encode_messages(messages[0])[0]
  assert out.sequences[0, : len(first)].tolist() == first
  assert out.sequences[0, len(first) : len(first) + len(jax_rows[0].response_ids)].tolist() == jax_rows[0].response_ids


def test_classify_matches_the_jax_prompt_pass(export):
  name, directory = export
  model = ClsAlignForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  # The export's own decode settings, as the parity test: the compiled loop is reused.
  jax_rows, encs, _ = _jax_rows(directory, QUERIES, [""] * len(QUERIES), artifacts.load(directory).decode_config())
  # Both paths to the prompt: messages (the export's chat template) and ids with explicit spans.
  p_messages = model.classify([[{"role": "user", "content": q}] for q in QUERIES])
  p_ids = model.classify(
    input_ids=[e.tokens.tolist() for e in encs], query_spans=[e.query_span for e in encs]
  )  # with the leading [CLS]
  ref = [j.p_initial for j in jax_rows]
  np.testing.assert_allclose(p_messages, ref, atol=1e-4, rtol=0)
  np.testing.assert_allclose(p_ids, ref, atol=1e-4, rtol=0)
  assert len(set(np.round(ref, 3))) > 1  # the head separates the prompts: a constant p proves nothing
  assert isinstance(model.classify([{"role": "user", "content": QUERIES[0]}]), float)
  if families.get(CASES[name].get("family", "llama")).qkv_bias:
    # The q/k/v biases are loaded and count: without them p moves well past the tolerance.
    attn = model.model.layers[0].self_attn
    assert all(float(m.bias.detach().abs().max()) > 0.1 for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    with torch.no_grad():
      for layer in model.model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          m.bias.zero_()
    p_unbiased = model.classify([[{"role": "user", "content": q}] for q in QUERIES])
    assert np.abs(np.asarray(p_unbiased) - ref).max() > 1e-2


def test_remote_code_loads_the_safe_class_and_plain_load_the_lm(export):
  name, directory = export
  architecture = _architecture(name)
  safe = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
  assert type(safe).__name__ == f"ClsAlign{architecture}" and type(safe).__module__.endswith("modeling_clsalign")
  plain = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  assert type(plain) is getattr(transformers, architecture)
  assert safe.lm_head.weight is safe.model.embed_tokens.weight  # tied, as the run's model
  with open(os.path.join(directory, "modeling_clsalign.py"), encoding="utf-8") as f:
    copied = f.read()
  assert copied == hf_safe_export.remote_code_source()
  messages = [{"role": "user", "content": QUERIES[1]}]
  ours = ClsAlignForCausalLM.from_pretrained(directory, dtype=torch.float32)
  assert safe.classify(messages) == ours.classify(messages)
  assert torch.equal(
    safe.generate(messages=messages, max_new_tokens=6), ours.generate(messages=messages, max_new_tokens=6)
  )
  # `strategic=False` is transformers' own generate: the plain LM, greedy, as loaded without remote code.
  ids = torch.tensor([ours.encode_messages(messages)[0]])
  plain_out = plain.generate(ids, max_new_tokens=6, do_sample=False)
  assert torch.equal(safe.generate(ids, max_new_tokens=6, do_sample=False, strategic=False), plain_out)


def test_every_family_of_the_registry_has_a_safe_class(tmp_path):
  """A family added to families.py gets its `auto_map` class with no code in hf_strategic.py: the
  class transformers looks up on the module is built from the family's HF architecture."""
  from clsalign_jax.interop import hf_strategic

  for family in families.FAMILIES.values():
    architecture = family.hf_architectures[0]
    name = hf_safe_export.safe_class_name(architecture)
    cls = getattr(hf_strategic, name)
    assert cls.__name__ == name and issubclass(cls, getattr(transformers, architecture))
    assert issubclass(cls, hf_strategic.ClsAlignMixin) and hf_strategic.safe_class(architecture) is cls
  # Built on lookup (module __getattr__) for a name not defined in the file, once.
  assert hf_strategic.ClsAlignGemmaForCausalLM is hf_strategic.safe_class("GemmaForCausalLM")
  assert hf_safe_export.safe_class_name("GemmaForCausalLM") is None  # not a registry family: no auto_map
  with pytest.raises(AttributeError):
    hf_strategic.ClsAlignNoSuchForCausalLM  # noqa: B018
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
  with pytest.raises(ValueError, match=r"config.json: architecture 'NoSuchForCausalLM' is not a causal LM class"):
    ClsAlignForCausalLM.from_pretrained(str(tmp_path))


def test_card_generation_config_and_run_facts_agree(export):
  name, directory = export

  def read(name):
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      return json.load(f)

  config, generation, facts, meta = (
    read("config.json"),
    read("generation_config.json"),
    read("run_facts.json"),
    read("clsalign.json"),
  )
  with open(os.path.join(directory, "README.md"), encoding="utf-8") as f:
    card = f.read()
  rows = {}
  for line in card.splitlines():
    if line.startswith("| `"):
      key, value = (c.strip().strip("`") for c in line.strip("|").split("|"))
      rows[key] = json.loads(value)
  decode = dataclasses.asdict(DecodeConfig(**facts["decode"]))
  block = config["clsalign"]
  assert block["decode"] == decode
  for key, value in decode.items():
    assert rows[f"decode.{key}"] == value, key
  assert rows["cls_threshold"] == facts["cls_threshold"] == meta["threshold"] == decode["threshold"]
  assert rows["template"] == facts["template"] and rows["cls_trained"] == facts["cls_trained"] is True
  assert rows["response_sees_cls (training)"] == facts["response_sees_cls"]
  assert (
    rows["side_path.exit_layer"] == block["side_path"]["exit_layer"] == meta.get("side_path", {}).get("exit_layer", 0)
  )
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  assert rows["generation_config.eos_token_id"] == generation["eos_token_id"] == block["end_token_id"] == im_end
  assert rows["generation_config.do_sample"] is generation["do_sample"] is False
  assert rows["generation_config.max_new_tokens"] == generation["max_new_tokens"] == decode["max_new_tokens"]
  assert (
    rows["refusal_ids"] == block["refusal_ids"] == tok(decode["refusal_text"], add_special_tokens=False)["input_ids"]
  )
  assert config["auto_map"] == {"AutoModelForCausalLM": f"modeling_clsalign.ClsAlign{_architecture(name)}"}
  assert f'from_pretrained("{os.path.basename(directory)}", trust_remote_code=True' in card
  assert "The plain language model is not the safe model" in card and "trust_remote_code=True" in card
  # No report next to this source: the card says nothing was measured rather than inventing figures.
  assert "nothing here is measured" in card


REPORT = """# report

## Decoding

Malicious prompts: `{'kind': 'advbench', 'limit': 50}`.

| variant | prompts | attack | metric | rate | n | CLS flagged at prompt | refusal inserted |
|---|---|---|---|---|---|---|---|
| strategic | malicious | direct | ASR | 22.0 % | 50 | 68.0 % | 78.0 % |
| strategic | benign | direct | over-refusal | 14.0 % | 50 | 10.0 % | 14.0 % |
| plain | malicious | direct | ASR | 100.0 % | 50 | 96.0 % | 0.0 % |

| accuracy | precision | recall | F1 | tp | fp | fn | tn |
|---|---|---|---|---|---|---|---|
| 75.7 % | 90.5 % | 57.3 % | 70.2 % | 86 | 9 | 64 | 141 |
"""


def test_card_quotes_the_report_with_n(tmp_path):
  path = tmp_path / "report.md"
  path.write_text(REPORT)
  figures = hf_safe_export.report_figures(str(path))
  assert [r["variant"] for r in figures["decoding"]] == ["strategic", "strategic", "plain"]
  facts = artifacts.RunFacts(template="chatml", cls_trained=True, cls_threshold=0.8, decode={"threshold": 0.8})
  cfg = M.ModelConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4, d_ff=8)
  block = hf_safe_export.clsalign_block(cfg, facts, DecodeConfig(threshold=0.8), None, None)
  generation = {"eos_token_id": 2, "do_sample": False, "max_new_tokens": 128}
  card = hf_safe_export.model_card("m", "llama", block, generation, facts, figures, 230)
  assert "attack success rate **100.0 %** on n = 50 malicious requests" in card
  assert "with the safety head and strategic decoding: **22.0 %** (n = 50)" in card
  assert "| plain | malicious | direct | ASR | 100.0 % | 50 | 0.0 % |" in card
  assert "(n = 300: 150 malicious, 150 benign): accuracy 75.7 %" in card
  # Without a tokenizer there is no refusal to force: the card sends users to clsalign-jax instead.
  assert "python -m clsalign_jax.generate --checkpoint=DIR" in card and "trust_remote_code=True" not in card


def test_bad_inputs_name_the_problem(export, tmp_path):
  _, directory = export
  model = ClsAlignForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with pytest.raises(ValueError, match="pass query_spans"):
    model.classify(input_ids=[1, 2, 3])
  with pytest.raises(TypeError, match="unknown decode settings"):
    model.generate(messages=[{"role": "user", "content": "hi"}], clsalign_decode={"tau_units": 2})
  broken = tmp_path / "cls.safetensors"
  from safetensors.torch import save_file

  save_file({"cls_embedding": torch.zeros(16)}, str(broken))
  with pytest.raises(ValueError, match="cls.safetensors: does not match the side path"):
    model.load_clsalign(str(broken))


def test_exporting_needs_no_torch():
  """Torch is an optional extra: `convert` copies the modeling file as text and imports no torch."""
  code = (
    "import sys, clsalign_jax.convert, clsalign_jax.interop.hf_safe_export as h; "
    "assert h.remote_code_source(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    check=False,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=120,
  )
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
