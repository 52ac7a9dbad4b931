// The playground: streams /v1/chat/completions (SSE) and draws the `clsalign` extension live.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { threshold: 0.5, model: null, points: [], refusalStep: null, maxStep: 1 };

async function loadSettings() {
  const s = await (await fetch("/v1/clsalign/settings")).json();
  state.model = s.model;
  state.threshold = s.decode.threshold;
  $("model").textContent = s.model;
  $("max_tokens").max = s.max_tokens_limit;
  $("max_tokens").value = Math.min(s.defaults.max_tokens, s.max_tokens_limit);
  $("temperature").value = s.defaults.temperature;
  $("top_p").value = s.defaults.top_p;
  $("top_k").value = s.defaults.top_k;
  $("seed").value = s.defaults.seed;
  const d = s.decode;
  $("settings").textContent =
    `threshold ${d.threshold.toFixed(3)} · schedule ${d.schedule} · tau ${d.tau} · r ${d.r1}/${d.r2}/${d.r3} · ` +
    `strategic decoding ${d.strategic_decoding ? "on" : "off"} · end after refusal ${d.end_after_refusal ? "on" : "off"} · ` +
    `refusal "${d.refusal_text}"`;
  document.body.dataset.ready = "1";
}

function draw() {
  const svg = $("trace");
  const W = 600, H = 180, pad = 10;
  const x = (s) => pad + (W - 2 * pad) * (s / Math.max(state.maxStep, 1));
  const y = (p) => H - pad - (H - 2 * pad) * p;
  let out = `<line x1="${pad}" x2="${W - pad}" y1="${y(state.threshold)}" y2="${y(state.threshold)}" stroke="#999" stroke-dasharray="4 3"/>`;
  if (state.points.length) {
    const path = state.points.map((pt, i) => `${i ? "L" : "M"}${x(pt.step).toFixed(1)},${y(pt.p).toFixed(1)}`).join(" ");
    out += `<path d="${path}" fill="none" stroke="#36c" stroke-width="1.5"/>`;
    for (const pt of state.points) {
      const bad = pt.p > state.threshold;
      out += `<circle class="pt" data-step="${pt.step}" data-p="${pt.p}" cx="${x(pt.step).toFixed(1)}" cy="${y(pt.p).toFixed(1)}" r="2.5" fill="${bad ? "#c00" : "#36c"}"/>`;
    }
  }
  if (state.refusalStep !== null) {
    const rx = x(state.refusalStep).toFixed(1);
    out += `<line id="refusal-mark" x1="${rx}" x2="${rx}" y1="${pad}" y2="${H - pad}" stroke="#c00" stroke-width="2"/>`;
  }
  svg.innerHTML = out;
}

function showAnswer(text, refusalChar) {
  const box = $("answer");
  box.textContent = "";
  if (refusalChar === null || refusalChar === undefined || refusalChar < 0) {
    box.textContent = text;
    return;
  }
  box.append(document.createTextNode(text.slice(0, refusalChar)));
  const span = document.createElement("span");
  span.className = "refusal";
  span.title = "refusal prefix inserted by strategic decoding";
  span.textContent = text.slice(refusalChar);
  box.append(span);
}

function showVerdict(p, malicious) {
  const v = $("verdict");
  v.className = malicious ? "malicious" : "benign";
  v.dataset.p = String(p);
  v.dataset.malicious = String(malicious);
  v.textContent = `prompt-time p(malicious) = ${p.toFixed(4)} (${malicious ? "malicious" : "benign"})`;
}

async function send() {
  const prompt = $("prompt").value;
  const messages = [{ role: "user", content: prompt }];
  if ($("prefill").value) messages.push({ role: "assistant", content: $("prefill").value });
  const body = {
    model: state.model, messages, stream: true,
    max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value),
    top_p: Number($("top_p").value), top_k: Number($("top_k").value), seed: Number($("seed").value),
  };
  Object.assign(state, { points: [], refusalStep: null, maxStep: 2 * body.max_tokens });
  document.body.dataset.done = "";
  document.body.dataset.deltas = "0";
  $("verdict").textContent = ""; $("refusal-note").textContent = ""; $("answer").textContent = "";
  $("status").textContent = "generating…";
  let text = "";
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!res.ok) {
    const err = await res.json();
    $("status").textContent = "error: " + err.error.message;
    document.body.dataset.done = "error";
    return;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut).trim();
      buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") continue;
      const msg = JSON.parse(data);
      if (msg.error) { $("status").textContent = "error: " + msg.error.message; continue; }
      const choice = msg.choices && msg.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        document.body.dataset.deltas = String(Number(document.body.dataset.deltas || 0) + 1);
      }
      const c = choice.clsalign;
      if (c && c.event === "prompt") {
        showVerdict(c.p_malicious, c.malicious);
        state.points.push({ step: 0, p: c.p_malicious });
      } else if (c && c.event === "step") {
        if (c.p_malicious !== null) state.points.push({ step: c.step, p: c.p_malicious });
        if (c.refusal_index !== null && state.refusalStep === null) state.refusalStep = c.step;
      }
      showAnswer(text, null);
      if (c && c.event === "done") {
        showAnswer(text, c.refusal_inserted ? c.refusal_char : null);
        $("verdict").dataset.refusal = String(c.refusal_inserted);
        $("refusal-note").textContent = c.refusal_inserted
          ? `refusal inserted at completion token ${c.refusal_index} (${c.refusal_cause === "prompt" ? "malicious at prompt time" : "a confirmed flip"})`
          : "no refusal inserted";
        $("status").textContent = `finished: ${choice.finish_reason}`;
        document.body.dataset.done = "1";
      }
      draw();
    }
  }
}

$("send").addEventListener("click", () => send().catch((e) => { $("status").textContent = "error: " + e; }));
loadSettings();
