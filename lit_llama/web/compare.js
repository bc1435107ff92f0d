// The comparison page's logic. It speaks only to the server's OpenAI-compatible endpoints:
//   GET /v1/models             the models, and for each finetune run its settings and curves (the `lit_llama` field)
//   POST /v1/chat/completions  one streamed, greedy answer per chosen model, all sent at once
// Every failure ends in a message on the page (never a spinner that turns for ever).

"use strict";

const MIN_MODELS = 2, MAX_MODELS = 4;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const SETTINGS = ["method", "rank", "learning rate", "trainable params", "checkpoint MB", "peak memory GB",
                  "train time s", "tokens", "tokens/s", "train loss", "val loss"];  // as run_card writes them

let models = [];    // the /v1/models entries
const asked = [];   // what was asked so far: {prompt, answers: {model: text}, speeds: {model: tokens/s}}
const $ = (id) => document.getElementById(id);

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

// ---------------------------------------------------------------- the models, their curves and settings

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(`GET /v1/models answered ${response.status}`);
    models = (await response.json()).data;
  } catch (error) {
    $("models").textContent = "";
    showMessage(`The server did not answer (${error.message}): is serve.py still running? Reload the page once it is.`);
    return;
  }
  $("models").replaceChildren(...models.map((model) => {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = model.id;
    const method = (model.lit_llama || {}).method || "";
    label.append(box, ` ${model.id} `, Object.assign(document.createElement("span"),
                                                    {className: "method", textContent: `(${method})`}));
    return label;
  }));
  preselect();
  drawCurves();
  showSettings();
}

// ?models=a,b,c&prompt=... picks models and fills the prompt (a link to a comparison)
function preselect() {
  const params = new URLSearchParams(location.search);
  if (params.has("prompt")) $("prompt").value = params.get("prompt");
  if (!params.get("models")) return;
  const wanted = params.get("models").split(",").map((name) => name.trim()).filter(Boolean);
  const known = new Set(models.map((model) => model.id));
  const unknown = wanted.filter((name) => !known.has(name));
  for (const box of document.querySelectorAll("#models input")) box.checked = wanted.includes(box.value);
  if (unknown.length) {
    showMessage(`Unknown model${unknown.length > 1 ? "s" : ""}: ${unknown.join(", ")}. ` +
                `The server serves ${[...known].join(", ")}.`);
  }
}

function runs() {
  return models.filter((model) => model.lit_llama && model.lit_llama.run);
}

function drawCurves() {
  const kind = document.querySelector("input[name=curve]:checked").value;
  const withCurves = runs().filter((model) => model.lit_llama.run.curves);
  $("no-curves").replaceChildren(...runs().filter((model) => !model.lit_llama.run.curves).map((model) =>
    Object.assign(document.createElement("li"), {textContent: `${model.id}: no curves for this model (its run folder has no metrics.csv)`})));
  const lines = withCurves.map((model, i) => ({name: model.id, color: COLORS[i % COLORS.length],
                                               points: model.lit_llama.run.curves[kind]}));
  $("chart").replaceChildren(lines.length ? lineChart(lines, kind === "val" ? "validation loss" : "train loss")
                                          : Object.assign(document.createElement("p"), {className: "hint",
                                              textContent: "No finetune run with metrics.csv is served (serve.py --runs)."}));
}

// an SVG line chart: one line per run (class "curve"), loss against tokens, with a legend
function lineChart(lines, yLabel) {
  const W = 720, H = 320, left = 60, right = 150, top = 15, bottom = 40;
  const all = lines.flatMap((line) => line.points);
  const [x0, x1] = extent(all.map((p) => p[0])), [y0, y1] = extent(all.map((p) => p[1]));
  const x = (v) => left + (v - x0) / (x1 - x0 || 1) * (W - left - right);
  const y = (v) => H - bottom - (v - y0) / (y1 - y0 || 1) * (H - top - bottom);
  const svg = svgElement("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img"});
  svg.append(svgElement("line", {class: "axis", x1: left, y1: H - bottom, x2: W - right, y2: H - bottom}),
             svgElement("line", {class: "axis", x1: left, y1: top, x2: left, y2: H - bottom}));
  for (const [v, anchor] of [[x0, "start"], [x1, "end"]]) {
    svg.append(svgText(x(v), H - bottom + 15, anchor, formatNumber(v)));
  }
  for (const v of [y0, y1]) svg.append(svgText(left - 5, y(v) + 4, "end", formatNumber(v)));
  svg.append(svgText((left + W - right) / 2, H - 8, "middle", "training tokens seen"),
             svgText(14, (top + H - bottom) / 2, "middle", yLabel, "rotate(-90 14 " + (top + H - bottom) / 2 + ")"));
  lines.forEach((line, i) => {
    svg.append(svgElement("polyline", {class: "curve", "data-model": line.name, stroke: line.color,
                                       points: line.points.map((p) => `${x(p[0])},${y(p[1])}`).join(" ")}));
    svg.append(svgElement("line", {x1: W - right + 10, x2: W - right + 30, y1: top + 10 + 18 * i, y2: top + 10 + 18 * i,
                                   stroke: line.color, "stroke-width": 2}),
               svgText(W - right + 35, top + 14 + 18 * i, "start", line.name));
  });
  return svg;
}

function extent(values) {
  return values.length ? [Math.min(...values), Math.max(...values)] : [0, 1];
}

function svgElement(tag, attributes) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  return element;
}

function svgText(x, y, anchor, text, transform) {
  const element = svgElement("text", {x, y, "text-anchor": anchor, ...(transform ? {transform} : {})});
  element.textContent = text;
  return element;
}

function formatNumber(value) {
  if (value === null || value === undefined) return "";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return Math.abs(value) >= 100 ? value.toFixed(0) : Math.abs(value) >= 0.01 ? value.toFixed(3) : value.toExponential(1);
}

// the settings of every served run, a column each; a row whose runs differ is marked
function settingsRows(names) {
  const byName = Object.fromEntries(runs().map((model) => [model.id, model.lit_llama.run.settings]));
  return SETTINGS.map((field) => {
    const values = names.map((name) => formatNumber(byName[name][field]));
    return {field, values, differs: new Set(values).size > 1};
  });
}

function showSettings() {
  const names = runs().map((model) => model.id);
  if (!names.length) {
    $("settings").textContent = "No finetune run is served (serve.py --runs).";
    return;
  }
  const table = document.createElement("table");
  table.append(row("th", ["", ...names]));
  for (const {field, values, differs} of settingsRows(names)) {
    const tr = row("td", [field, ...values]);
    if (differs) tr.className = "differs";
    table.append(tr);
  }
  $("settings").replaceChildren(table);
}

function row(cell, texts) {
  const tr = document.createElement("tr");
  tr.append(...texts.map((text) => Object.assign(document.createElement(cell), {textContent: text})));
  return tr;
}

// ---------------------------------------------------------------- asking: one streamed answer per model

async function compare() {
  showMessage("");
  const chosen = [...document.querySelectorAll("#models input:checked")].map((box) => box.value);
  const prompt = $("prompt").value.trim();
  const maxTokens = Number($("max-tokens").value);
  if (chosen.length < MIN_MODELS || chosen.length > MAX_MODELS) {
    return showMessage(`Pick two to four models (${chosen.length} picked).`);
  }
  if (!prompt) return showMessage("Type a prompt first: it is empty.");
  if (!Number.isInteger(maxTokens) || maxTokens < 1) return showMessage("max tokens must be a whole number of at least 1.");
  const columns = chosen.map(answerColumn);
  $("answers").replaceChildren(...columns.map((column) => column.element));
  $("answers").dataset.state = "running";
  $("send").disabled = true;
  const results = await Promise.all(columns.map((column) => streamAnswer(column, prompt, maxTokens)));
  $("send").disabled = false;
  $("answers").dataset.state = "done";
  if (results.every((result) => result.ok)) {
    asked.push({prompt, answers: Object.fromEntries(results.map((r) => [r.model, r.text])),
                speeds: Object.fromEntries(results.map((r) => [r.model, r.speed]))});
    $("save").disabled = false;
  }
}

function answerColumn(model) {
  const element = document.createElement("div");
  element.className = "column busy";
  element.dataset.model = model;
  const answer = Object.assign(document.createElement("pre"), {className: "answer"});
  const speed = Object.assign(document.createElement("div"), {className: "speed", textContent: "waiting ..."});
  element.append(Object.assign(document.createElement("h3"), {textContent: model}), answer, speed);
  return {model, element, answer, speed};
}

// Streams one model's greedy answer into its column; tokens/s: the completion tokens the server counted, over
// the time from sending the request to the last token. Always ends the column's spinner.
async function streamAnswer(column, prompt, maxTokens) {
  const result = {model: column.model, ok: false, text: "", speed: null};
  const start = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: column.model, messages: [{role: "user", content: prompt}], temperature: 0,
                            max_tokens: maxTokens, stream: true, stream_options: {include_usage: true}}),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `the server answered ${response.status}`);
    }
    let usage = null;
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        result.text += delta.content;
        column.answer.textContent = result.text;
        column.speed.textContent = "answering ...";
      }
    }
    const seconds = (performance.now() - start) / 1000;
    result.speed = usage ? usage.completion_tokens / seconds : null;
    column.speed.textContent = usage ? `${result.speed.toFixed(1)} tokens/s (${usage.completion_tokens} tokens in ${seconds.toFixed(2)} s)`
                                     : "done";
    result.ok = true;
  } catch (error) {
    const message = error instanceof TypeError  // what fetch throws when nothing answers
      ? "the server did not answer: is serve.py still running?" : error.message;
    column.speed.textContent = `error: ${message}`;
    column.speed.classList.add("error");
  } finally {
    column.element.classList.remove("busy");
  }
  return result;
}

// the JSON objects of a text/event-stream response ("data: {...}" lines, up to "data: [DONE]")
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const {done, value} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data: "))
                         .map((line) => line.slice(6)).join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
  throw new TypeError("the answer stopped before its end");  // the server went away mid-answer
}

// ---------------------------------------------------------------- saving: the comparison as Markdown

function markdownCell(text) {  // as lit_llama/runs.py's markdown_cell
  return String(text).replaceAll("\\", "\\\\").replaceAll("|", "\\|").replaceAll("\r", "").replaceAll("\n", "<br>");
}

// the answers as a Markdown table, a row per prompt and a column per model: lit_llama/runs.py's answers_table,
// which scripts/compare.py --prompts FILE writes
function answersTable(prompts, answers) {
  const names = Object.keys(answers);
  return [`| prompt | ${names.map(markdownCell).join(" | ")} |`, "|---".repeat(names.length + 1) + "|",
          ...prompts.map((prompt, i) => `| ${[prompt, ...names.map((name) => answers[name][i])].map(markdownCell).join(" | ")} |`)];
}

function comparisonMarkdown() {
  const names = [...new Set(asked.flatMap((entry) => Object.keys(entry.answers)))];
  const prompts = asked.map((entry) => entry.prompt);
  const answers = Object.fromEntries(names.map((name) => [name, asked.map((entry) => entry.answers[name] ?? "")]));
  const lines = ["# Finetunes compared", "", `Served by ${location.host}, greedy answers (temperature 0).`, "",
                 "## Answers", "", ...answersTable(prompts, answers), "", "## Speed (tokens/s)", "",
                 ...answersTable(prompts, Object.fromEntries(names.map((name) =>
                   [name, asked.map((entry) => entry.speeds[name] == null ? "" : entry.speeds[name].toFixed(1))])))];
  const served = runs().map((model) => model.id).filter((name) => names.includes(name));
  if (served.length) {
    lines.push("", "## Settings", "", `| setting | ${served.map(markdownCell).join(" | ")} |`,
               "|---".repeat(served.length + 1) + "|",
               ...settingsRows(served).map(({field, values, differs}) =>
                 `| ${differs ? `**${field}**` : field} | ${values.map(markdownCell).join(" | ")} |`));
  }
  lines.push("", "To ask them again without a browser: one prompt a line in a file, then " +
             "`python scripts/compare.py --prompts FILE ...`.", "");
  return lines.join("\n");
}

function save() {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([comparisonMarkdown()], {type: "text/markdown"}));
  link.download = "comparison.md";
  link.click();
  URL.revokeObjectURL(link.href);
}

$("send").addEventListener("click", compare);
$("save").addEventListener("click", save);
for (const radio of document.querySelectorAll("input[name=curve]")) radio.addEventListener("change", drawCurves);
loadModels();
