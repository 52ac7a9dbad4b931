"""The OpenAI-compatible server (clsalign_jax.serve) driven by the official `openai` client, on a
tiny CLS run served in-process: answers checked against `decode.text.Decoder` (the command
line's path, unbatched), streaming against the plain answer, concurrency against sequential
requests, and every kind of bad input against its OpenAI-style error body."""

import concurrent.futures
import json
import pathlib
import time

import httpx2 as httpx
import openai
import pytest
from serve_utils import BENIGN, HARMFUL

REPO = pathlib.Path(__file__).resolve().parents[1]

from clsalign_jax import artifacts
from clsalign_jax.decode.sampling import Sampling
from clsalign_jax.decode.text import Decoder


@pytest.fixture(scope="module")
def server(tiny_server):
  return tiny_server


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(server):
  """Decoder.generate_text (the command line's path) on the same checkpoint, one query at a time."""
  loaded = artifacts.load(server[2])
  decoder = Decoder("ref", loaded.cfg, loaded.params, loaded.tokenizer, loaded.template, loaded.decode_config(), 1)
  cache = {}

  def run(query, max_tokens=8, prefill="", temperature=0.0, seed=0):
    key = (query, max_tokens, prefill, temperature, seed)
    if key not in cache:
      dcfg = loaded.decode_config(max_new_tokens=max_tokens)
      (cache[key],) = decoder.generate_text([query], prefill, Sampling(temperature, seed=seed), dcfg)
    return cache[key]

  return run


def verdict(choice) -> dict:
  return choice.model_extra["clsalign"]


def test_models_health_and_settings(server, client):
  url = server[0]
  assert [m.id for m in client.models.list().data] == ["tiny"]
  assert client.models.retrieve("tiny").id == "tiny"
  health = httpx.get(url + "/health").json()
  assert health["status"] == "ok" and health["queue_depth"] == 0
  settings = httpx.get(url + "/v1/clsalign/settings").json()
  assert settings["decode"]["tau"] == 3 and settings["decode"]["r1"] == 5  # the run's facts (CLS_RUN)
  assert settings["max_tokens_limit"] == 16


@pytest.mark.parametrize("query", [BENIGN, HARMFUL])
def test_chat_matches_generate_text(server, client, reference, query):
  r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": query}], max_tokens=8)
  ref = reference(query)
  choice = r.choices[0]
  assert choice.message.content == ref.response
  v = verdict(choice)
  assert v["p_malicious"] == pytest.approx(ref.row.p_initial, abs=1e-5)
  assert v["malicious"] == ref.row.initial_malicious == (query == HARMFUL)
  assert v["refusal_inserted"] == (ref.row.insert_index >= 0)
  if query == HARMFUL:  # Rule 1: the refusal prefix is forced right after the prompt
    assert v["refusal_index"] == 0 and v["refusal_cause"] == "prompt" and v["refusal_char"] == 0
  n = len(ref.row.response_ids)
  assert choice.finish_reason == ("length" if n == 8 else "stop")
  assert r.usage.completion_tokens == n
  assert r.usage.prompt_tokens == len(server[1].encode(query).prompt)


def test_streaming_joins_to_the_plain_answer(client):
  messages = [{"role": "user", "content": HARMFUL}]
  plain = client.chat.completions.create(
    model="tiny", messages=messages, max_tokens=16, extra_body={"clsalign": {"trace": True}}
  )
  chunks = list(
    client.chat.completions.create(
      model="tiny", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
  )
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == plain.choices[0].message.content
  assert chunks[0].choices[0].delta.role == "assistant"
  finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
  assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
  done = finals[0].choices[0].model_extra["clsalign"]
  v = verdict(plain.choices[0])
  assert {k: done[k] for k in ("p_malicious", "refusal_index", "refusal_cause")} == {
    k: v[k] for k in ("p_malicious", "refusal_index", "refusal_cause")
  }
  assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
  # Every re-classification reaches the stream as it happens: stream step s + 1 is loop step s.
  steps = [c.choices[0].model_extra["clsalign"] for c in chunks if c.choices and "clsalign" in c.choices[0].model_extra]
  streamed_p = {e["step"]: e["p_malicious"] for e in steps if e["event"] == "step" and e["p_malicious"] is not None}
  assert streamed_p == pytest.approx({e["step"] + 1: e["p_malicious"] for e in v["trace"]}, abs=1e-6)
  assert steps[0]["event"] == "prompt" and steps[0]["p_malicious"] == pytest.approx(v["p_malicious"], abs=1e-6)
  assert any(e.get("refusal_index") == 0 for e in steps)  # the Rule-1 refusal, marked as it went in


def test_completions_plain_and_streaming(client, reference):
  r = client.completions.create(model="tiny", prompt=BENIGN, max_tokens=8)
  assert r.choices[0].text == reference(BENIGN).response
  streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model="tiny", prompt=BENIGN, max_tokens=8, stream=True)
    if c.choices
  )
  assert streamed == r.choices[0].text


def test_prefill_and_max_tokens_cut(client, reference):
  messages = [{"role": "user", "content": BENIGN}, {"role": "assistant", "content": " Sure, here is"}]
  r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
  ref = reference(BENIGN, prefill=" Sure, here is")
  pre = ref.row.prefill_len
  assert r.usage.completion_tokens == len(ref.row.response_ids) - pre
  short = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": BENIGN}], max_tokens=3)
  full = reference(BENIGN, max_tokens=8)
  # max_tokens=3 runs in the 8-token bucket and is cut: its tokens are the first 3 of that row.
  assert short.usage.completion_tokens == min(3, len(full.row.response_ids))
  assert full.response.startswith(short.choices[0].message.content)
  assert short.choices[0].finish_reason == "length"


def test_stop_sequence_cuts_the_text(client):
  base = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": HARMFUL}], max_tokens=8)
  text = base.choices[0].message.content
  stop = text[5:8]
  cut = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": HARMFUL}], max_tokens=8, stop=[stop]
  )
  assert cut.choices[0].message.content == text[: text.find(stop)]
  assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_without_recompiling(server, client):
  engine = server[1]
  compiles, batches = engine.compiles, engine.batches_run
  jobs = [(q, t, s) for q in (BENIGN, HARMFUL) for t, s in ((0.0, 0), (0.9, 1), (0.9, 2), (1.3, 3))]

  def ask(job):
    q, t, s = job
    r = client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": q}], max_tokens=8, temperature=t, seed=s
    )
    return r.choices[0].message.content, verdict(r.choices[0])["p_malicious"]

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    together = list(pool.map(ask, jobs))
  assert engine.batches_run - batches < len(jobs)  # some requests shared a batch
  alone = [ask(j) for j in jobs]
  # A row's answer does not depend on which rows share its batch (per-row seeds, padded rows).
  for (a, pa), (b, pb) in zip(together, alone):
    assert a == b and pa == pytest.approx(pb, abs=1e-5)
  assert engine.compiles == compiles  # every shape was compiled during warm-up


BAD = [
  (dict(temperature=-1), 400, "temperature"),
  (dict(temperature=2.5), 400, "temperature"),
  (dict(top_p=0), 400, "top_p"),
  (dict(top_p=1.5), 400, "top_p"),
  (dict(top_k=-2), 400, "top_k"),
  (dict(n=2), 400, "n"),
  (dict(max_tokens=0), 400, "max_tokens"),
  (dict(max_tokens=17), 400, "max_tokens"),
  (dict(presence_penalty=1.0), 400, "presence_penalty"),
  (dict(model="gpt-4"), 404, "model"),
  (dict(messages=[{"role": "user", "content": "x " * 200}]), 400, "messages"),
  (
    dict(messages=[{"role": "system", "content": "be evil"}, {"role": "user", "content": "hi"}]),
    400,
    "messages[0].role",
  ),
  (
    dict(
      messages=[
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
      ]
    ),
    400,
    "messages",
  ),
  (dict(messages=[{"role": "user", "content": "   "}]), 400, "messages[0].content"),
  (dict(messages=[]), 400, "messages"),
  (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
  (dict(temperature="hot"), 400, "temperature"),
]


@pytest.mark.parametrize("change,status,param", BAD, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(server, change, status, param):
  url = server[0]
  body = {"model": "tiny", "messages": [{"role": "user", "content": BENIGN}], "max_tokens": 4, **change}
  for stream in (False, True):
    r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
  ok = {"model": "tiny", "messages": [{"role": "user", "content": BENIGN}], "max_tokens": 4}
  assert httpx.post(url + "/v1/chat/completions", json=ok, timeout=30).status_code == 200


def test_openai_client_raises_on_bad_input(client):
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": BENIGN}], temperature=-1)
  assert e.value.body["param"] == "temperature"
  with pytest.raises(openai.NotFoundError) as e:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": BENIGN}])
  assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
  "payload,code",
  [
    (b'{"model": "tiny", "messages": [', "invalid_json"),
    (b"[1, 2]", "invalid_value"),
    (b'{"messages": []}', "missing_required_parameter"),
  ],
)
def test_malformed_body(server, payload, code):
  r = httpx.post(server[0] + "/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
  assert r.status_code == 400 and r.json()["error"]["code"] == code


def test_unknown_route_is_a_json_404(server):
  r = httpx.get(server[0] + "/v1/nothing")
  assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_client_disconnect_mid_stream_keeps_serving(server, client):
  url, engine = server[0], server[1]
  body = {"model": "tiny", "messages": [{"role": "user", "content": BENIGN}], "max_tokens": 16, "stream": True}
  for _ in range(3):
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
      first = next(r.iter_lines())
      assert first.startswith("data: ")
    # leaving the block closes the connection before the answer was read
  deadline = time.time() + 30
  while engine.queue_depth() and time.time() < deadline:
    time.sleep(0.05)
  assert engine.queue_depth() == 0  # the abandoned requests left the queue
  r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": BENIGN}], max_tokens=4)
  assert r.choices[0].finish_reason in ("stop", "length")
  assert httpx.get(url + "/health").json()["status"] == "ok"


def test_metrics(server, client):
  client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": HARMFUL}], max_tokens=4)
  text = httpx.get(server[0] + "/metrics").text
  values = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, _, value = line.rpartition(" ")
      values[name] = float(value)
  assert values['clsalign_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
  assert values['clsalign_refusals_inserted_total{rule="prompt"}'] >= 1
  assert values["clsalign_completion_tokens_total"] >= 4 and values["clsalign_prompt_tokens_total"] > 0
  assert values["clsalign_queue_depth"] == 0
  assert values["clsalign_compiles"] == server[1].compiles
  json.dumps(values)


@pytest.mark.parametrize(
  "flag,message",
  [
    ("--batch_sizes=0", "error: --batch_sizes=(0,): give positive sizes"),
    ("--max_tokens_buckets=8,x", "error: --max_tokens_buckets=8,x: expected integers"),
    ("--max_new_tokens=999", "error: --max_new_tokens=999 exceeds the largest --max_tokens_buckets (256)"),
  ],
)
def test_command_line_errors_name_the_flag(flag, message, capsys):
  from clsalign_jax.serve.__main__ import main  # noqa: PLC0415

  assert main(["serve", flag]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == message


def _marked(path, marker: str) -> str:
  text = (REPO / path).read_text()
  block = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
  return " ".join(line for line in block.splitlines() if line.strip() and not line.startswith("```"))


def test_the_documented_serve_command_serves_the_main_jobs_run():
  from absl import flags  # noqa: PLC0415

  from clsalign_jax.serve.__main__ import define_flags  # noqa: PLC0415

  command = _marked("README.md", "serve-command")
  assert command == _marked("docs/serving.md", "serve-command")
  workdir = _marked("README.md", "main-command").split("--workdir=", 1)[1].split()[0]
  python, dash_m, module, *args = command.split()
  assert (python, dash_m, module) == (".venv/bin/python", "-m", "clsalign_jax.serve")
  fv = flags.FlagValues()
  define_flags(fv, [])
  fv(["serve", *args])
  assert fv.checkpoint == workdir


def test_load_test_benchmark_runs_against_the_server(server):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  out = subprocess.run(
    [
      sys.executable,
      str(REPO / "benchmarks" / "serve.py"),
      f"--url={server[0]}",
      "--clients=2",
      "--requests=2",
      "--max_tokens=4",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  row = out.stdout.strip().splitlines()[-1].strip("|").split("|")
  assert [c.strip() for c in row[:3]] == ["2", "4", "0"]  # clients, requests, errors
