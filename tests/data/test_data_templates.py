import unicodedata

import numpy as np
import pytest
import sentencepiece

from clsalign_jax.data.templates import (
  BOS,
  LLAMA2_SYSTEM_PROMPT,
  QUERY,
  ChatTemplate,
  SpanError,
  chatml_template,
  encode_document,
  encode_example,
  encode_prompt,
  get_template,
  llama2_template,
  query_text,
  render,
)
from clsalign_jax.data.tokenizer import mistral_sentencepiece_path


def _check_example(tok, template, query, response, label=1, check_prompt=True):
  ex = encode_example(tok, template, query, response, label)
  tokens = ex.tokens.tolist()
  assert tokens[0] == tok.cls_id and tokens[1] == tok.bos_id
  assert query_text(tok, ex) == query
  q0, q1 = ex.query_span
  fragment = tok.decode_fragment(tokens[q0:q1])
  assert fragment == (" " + query if ex.glued_space else query)
  r0, r1 = ex.response_span
  assert r1 == len(tokens) and tokens[-1] == template.end.id(tok)
  assert ex.loss_span == ex.response_span
  assert ex.loss_mask.tolist() == [0] * r0 + [1] * (r1 - r0)
  text = tok.decode_fragment(tokens[r0:-1])
  assert text == template.response_prefix + response + template.response_suffix
  if check_prompt:  # inference sees exactly the training prompt
    prompt = encode_prompt(tok, template, query)
    assert prompt.tokens.tolist() == tokens[:r0] and prompt.query_span == ex.query_span
  return ex


def test_span_exactness_on_every_shipped_record(combos, shipped):
  splits, _ = shipped
  records = [r for rows in splits.values() for r in rows]
  for name, tok, template in combos:
    forced = 0
    for n, r in enumerate(records):
      ex = _check_example(tok, template, r.prompt, r.response, r.label, check_prompt=n % 20 == 0)
      forced += ex.forced_boundary
    # Only SmolLM2's byte-level BPE needs a forced boundary here, once: a LIMA query that starts
    # with "\n  ", which would merge with the template's "\n".
    assert forced == (1 if name == "chatml" else 0), (name, forced)


def test_span_exactness_on_adversarial_strings(combos, adversarial):
  for _, tok, template in combos:
    for text in adversarial:
      _check_example(tok, template, text, text)
      _check_example(tok, template, f"{text} in the middle {text}", "ok")


def test_llama2_matches_the_reference_construction(mistral, shipped):
  # The reference tokenises "[INST] <<SYS>>...### Response:\n [/INST]" + " " + response + " "
  # in one go with BOS, appends EOS and prepends CLS.
  sp = sentencepiece.SentencePieceProcessor(model_file=mistral_sentencepiece_path())
  template = llama2_template()
  splits, _ = shipped
  for r in splits["train"][:1500]:
    prompt = (
      f"[INST] <<SYS>>\n{LLAMA2_SYSTEM_PROMPT}\n<</SYS>>\n\n### Instruction:\n{r.prompt}\n\n### Response:\n [/INST]"
    )
    want = [mistral.cls_id] + sp.encode(prompt + " " + r.response + " ", add_bos=True) + [2]
    ex = encode_example(mistral, template, r.prompt, r.response, r.label)
    assert ex.tokens.tolist() == want
    assert not ex.forced_boundary and not ex.glued_space


def test_mistral_matches_mistral_common_v1(mistral, shipped):
  # mistral-common's V1 instruct tokenizer encodes "[INST] {content} [/INST]" in one piece and the
  # answer on its own (SentencePiece adds the dummy-prefix space to it).
  sp = sentencepiece.SentencePieceProcessor(model_file=mistral_sentencepiece_path())
  template = get_template("mistral")
  splits, _ = shipped
  glued = 0
  for r in splits["validation"]:
    want = [mistral.cls_id] + sp.encode(f"[INST] {r.prompt} [/INST]", add_bos=True)
    want += sp.encode(r.response) + [2]
    ex = encode_example(mistral, template, r.prompt, r.response, r.label)
    assert ex.tokens.tolist() == want
    glued += ex.glued_space
  assert glued > 0.9 * len(splits["validation"])  # "[INST] How" -> "▁How" is the usual case


def test_chatml_matches_smollm2_chat_template(smollm2, hf_smollm2, shipped, adversarial):
  hf = hf_smollm2
  template = chatml_template()
  splits, _ = shipped
  # HF parses special-token text inside user content; we keep it as text, so skip those.
  queries = [r.prompt for r in splits["validation"]] + [a for a in adversarial if "<|" not in a]
  for q in queries:
    enc = encode_prompt(smollm2, template, q)
    want = hf.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
    want = want if isinstance(want, list) else want["input_ids"]
    if enc.forced_boundary:  # the documented divergence: the query's edges are forced
      assert smollm2.decode(enc.tokens[1:].tolist()) == smollm2.decode(want)
    else:
      assert enc.tokens[1:].tolist() == want, q
  rendered = render(template, "Hi", tokenizer=smollm2)
  text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
  assert rendered.text == text


def test_render_spans_and_consistency_with_tokens(combos):
  query, response = " What's 2+2? 😀", "Four.\n"
  for _, tok, template in combos:
    r = render(template, query, response, tokenizer=tok)
    assert r.text[slice(*r.query_span)] == query
    assert r.text[slice(*r.response_span)] == response
    ex = encode_example(tok, template, query, response, 0)
    specials = {tok.bos_token, tok.eos_token, "<|im_start|>", "<|im_end|>"}
    plain = r.text
    for s in specials:
      plain = plain.replace(s, "")
    assert tok.decode(ex.tokens.tolist(), skip_special_tokens=True) == plain
  llama = render(llama2_template(), "Q", "A")
  assert llama.text == (
    "<bos>[INST] <<SYS>>\nBelow is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n<</SYS>>\n\n### Instruction:\nQ\n\n### Response:\n"
    " [/INST] A <eos>"
  )
  assert render(get_template("mistral"), "Q", "A").text == "<bos>[INST] Q [/INST] A<eos>"
  assert render(chatml_template(system_prompt=None), "Q").text == (
    "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
  )


def test_prefill_is_the_start_of_the_response(combos):
  for _, tok, template in combos:
    prompt = encode_prompt(tok, template, "Tell me a story", prefill="Sure, here is")
    ex = encode_example(tok, template, "Tell me a story", "Sure, here is a story.", 1)
    p0, p1 = prompt.prefill_span
    assert p0 == ex.response_span[0] and p1 > p0
    assert prompt.tokens.tolist() == ex.tokens[:p1].tolist()


def test_lossy_query_raises_span_error(mistral, smollm2):
  # SentencePiece reads U+2581 as its own space marker: the query could not decode back.
  with pytest.raises(SpanError, match="lossy"):
    encode_prompt(mistral, llama2_template(), "a\u2581b")
  assert query_text(smollm2, encode_prompt(smollm2, chatml_template(), "a\u2581b")) == "a\u2581b"
  with pytest.raises(SpanError, match="empty"):
    encode_prompt(smollm2, chatml_template(), "")


def test_template_validation():
  with pytest.raises(ValueError, match="QUERY"):
    ChatTemplate("bad", (BOS, "no query"))
  with pytest.raises(ValueError, match="follow literal text"):
    ChatTemplate("bad", (BOS, QUERY, "x"))
  with pytest.raises(ValueError, match="unknown chat template"):
    get_template("vicuna")


def test_encode_document_chunks(smollm2):
  text = "word " * 50
  chunks = encode_document(smollm2, text, label=1, max_length=20)
  body = smollm2.encode(text) + [smollm2.eos_id]
  assert [c.tokens[:2].tolist() for c in chunks] == [[smollm2.cls_id, smollm2.bos_id]] * len(chunks)
  assert np.concatenate([c.tokens[2:] for c in chunks]).tolist() == body
  assert all(len(c) <= 20 and c.label == 1 for c in chunks)
  last = chunks[-1]
  assert last.query_span == (2, len(last)) and last.response_span == (len(last), len(last))
  assert last.loss_mask.tolist() == [0, 0] + [1] * (len(last) - 2)


def test_qwen2_5_is_chatml_with_qwen_system_turn():
  # What Qwen2.5-Instruct's own chat template renders for one user message "Q" with a generation
  # prompt (its default system turn included), and the reply closed by <|im_end|>.
  assert render(get_template("qwen2_5"), "Q", "A").text == (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>"
  )
  assert get_template("qwen2_5", system_prompt=None).prompt == chatml_template(system_prompt=None).prompt


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """(ours, transformers') of a Qwen2.5-style tokenizer with Qwen2.5's chat template; ours fitted
  to a model whose vocabulary pads past the tokenizer, BOS <|endoftext|>."""
  import qwen2_tokenizer
  from transformers import AutoTokenizer

  from clsalign_jax.data.tokenizer import Tokenizer

  directory = qwen2_tokenizer.build(tmp_path_factory.mktemp("qwen_tok"))
  bare = Tokenizer.from_tokenizer_json(directory)
  return bare.for_model(bare.vocab_size + 64, bare.token_to_id("<|endoftext|>")), AutoTokenizer.from_pretrained(
    str(directory)
  )


def test_qwen2_5_matches_qwen_chat_template_with_a_padded_vocabulary(qwen, adversarial):
  tok, hf = qwen
  template = get_template("qwen2_5")
  # HF parses special-token text inside user content; we keep it as text, so skip those.
  queries = ["How do I bake bread at home?", "  spaced 123 ", *[a for a in adversarial if "<|" not in a]]
  natural = 0
  for q in queries:
    if unicodedata.normalize("NFC", q) != q:
      # Qwen's NFC normalizer rewrites it: no tokens decode back to exactly this query.
      with pytest.raises(SpanError, match="losslessly"):
        encode_prompt(tok, template, q)
      continue
    enc = encode_prompt(tok, template, q)
    want = hf.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
    want = list(want if isinstance(want, list) else want["input_ids"])
    # [CLS] (one past the model's padded rows), then exactly Qwen's prompt: it has no BOS.
    assert enc.tokens[0] == tok.cls_id == tok.vocab_size > tok.base_vocab_size
    if enc.forced_boundary:  # the documented divergence: the query's edges are forced
      assert tok.decode(enc.tokens[1:].tolist()) == hf.decode(want)
    else:
      assert enc.tokens[1:].tolist() == want, q
      natural += 1
    assert query_text(tok, enc) == q
  assert natural >= len(queries) // 2
  text = hf.apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=True, tokenize=False)
  assert render(template, "Q", tokenizer=tok).text == text
  # A training row: the response closed by <|im_end|>, the model's EOS; no id at or past the
  # tokenizer's real size but the [CLS].
  ex = encode_example(tok, template, "How do I bake bread?", "Mix flour and water.", 0)
  assert ex.tokens[-1] == tok.eos_id == tok.token_to_id("<|im_end|>")
  assert (ex.tokens[1:] < tok.base_vocab_size).all()
  assert tok.decode_fragment(ex.tokens[ex.response_span[0] : -1].tolist()) == "Mix flour and water."
  # Documents keep the [CLS, BOS] layout: BOS is <|endoftext|>, Qwen's separator between documents.
  doc = encode_document(tok, "Plain text.", 0, max_length=32)[0]
  assert doc.tokens[:2].tolist() == [tok.cls_id, tok.token_to_id("<|endoftext|>")]


@pytest.mark.parametrize(
  "family,want_smollm2,want_mistral",
  [
    (None, "chatml", "llama2"),
    ("llama", "chatml", "llama2"),
    ("mistral", "chatml", "llama2"),
    ("qwen2", "qwen2_5", "qwen2_5"),
  ],
)
def test_training_default_follows_a_one_format_family(smollm2, mistral, family, want_smollm2, want_mistral):
  from clsalign_jax import families
  from clsalign_jax.data.templates import training_default

  assert training_default(smollm2, family) == want_smollm2
  assert training_default(mistral, family) == want_mistral
  if family:
    assert training_default(smollm2, families.get(family)) == want_smollm2
