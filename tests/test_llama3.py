"""Llama-3 family: the chat template's ids against transformers' `apply_chat_template` of a
Llama-3-style tokenizer.json built here, with exact query spans."""

import numpy as np
import pytest
import transformers

import llama3_tokenizer
from clsalign_jax.data.templates import LLAMA31_DATE_PREAMBLE, encode_example, encode_prompt, get_template, query_text
from clsalign_jax.data.tokenizer import Tokenizer

QUERIES = (
    "How do I bake bread at home?",
    "Write a poem about the sea.\n\nMake it rhyme.",
    "What is 1234567 + 89?",
    "emoji 😀 and 日本語 in one line",
    "x",
    "Tabs\tinside and 'quotes' it's fine",
    "[INST] looks like another template [/INST]",
)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
  return llama3_tokenizer.build(tmp_path_factory.mktemp("llama3_tok"))


@pytest.fixture(scope="module")
def ours(llama3_dir):
  return Tokenizer.from_tokenizer_json(llama3_dir)


@pytest.fixture(scope="module")
def theirs(llama3_dir):
  return transformers.AutoTokenizer.from_pretrained(str(llama3_dir))


def _hf_ids(hf_tok, messages):
  ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  return list(ids if isinstance(ids, list) else ids["input_ids"])


@pytest.mark.parametrize("system", [None, "Be brief."], ids=["no_system", "system"])
def test_llama3_template_ids_equal_apply_chat_template(ours, theirs, system):
  kwargs = {} if system is None else {"system_prompt": LLAMA31_DATE_PREAMBLE + system}
  template = get_template("llama3", **kwargs)
  specials = {t: ours.token_to_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
  for q in QUERIES:
    messages = ([] if system is None else [{"role": "system", "content": LLAMA31_DATE_PREAMBLE + system}])
    want = _hf_ids(theirs, messages + [{"role": "user", "content": q}])
    enc = encode_prompt(ours, template, q)
    assert enc.tokens[0] == ours.cls_id
    assert enc.tokens[1:].tolist() == want, q
    assert not enc.forced_boundary and query_text(ours, enc) == q
    # Header and end-of-turn markers are single ids, never text pieces.
    assert want.count(specials["<|start_header_id|>"]) == want.count(specials["<|end_header_id|>"]) == (
        3 if system else 2)
    q0, q1 = enc.query_span
    assert enc.tokens[q0 - 1] == theirs.encode("\n\n", add_special_tokens=False)[-1]
    assert enc.tokens[q1] == specials["<|eot_id|>"]


def test_llama3_example_ends_with_eot(ours, theirs):
  template = get_template("llama3")
  ex = encode_example(ours, template, QUERIES[0], "Mix flour and water.", label=0)
  want = theirs.apply_chat_template([{"role": "user", "content": QUERIES[0]},
                                     {"role": "assistant", "content": "Mix flour and water."}], tokenize=True)
  want = list(want if isinstance(want, list) else want["input_ids"])
  assert ex.tokens[1:].tolist() == want
  assert ex.tokens[-1] == ours.token_to_id("<|eot_id|>") == template.end.id(ours)
  r0, r1 = ex.response_span
  assert ours.decode_fragment(ex.tokens[r0:r1 - 1].tolist()) == "Mix flour and water."
  assert np.asarray(ex.loss_mask)[r0:].all()
