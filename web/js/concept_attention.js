// Concept Attention front end: a live training panel on the Train Concepts node and trigger-word
// completions in prompt text boxes. Plain ES module, no build step; ComfyUI serves every .js file
// under the pack's WEB_DIRECTORY. Every hook is guarded: a graph without this pack's nodes, or a
// server without its routes, simply sees nothing.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION_NAME = "concept_attention.ui";
const TRAIN_NODE = "ConceptAttention_TrainConcepts";
const TRAINING_EVENT = "concept_attention.training";
const CONCEPTS_URL = "/concept_attention/concepts";
const PANEL_WIDGET = "live_training";
const PANEL_HEIGHT = 230;
const REFRESH_AFTER_MS = 3000; // the concept list is fetched again on focus after this long
const MAX_COMPLETIONS = 12;
const TERM_COLOURS = { loss: "#e8e8e8", reconstruction: "#5aa9e6", calibration: "#f4a259", mask: "#8cd17d" };
const FALLBACK_COLOURS = ["#c084fc", "#f472b6", "#facc15", "#2dd4bf"];

const lastUpdates = new Map(); // node id -> latest training message, kept after the run ends
let conceptFiles = [];
let conceptsFetchedAt = 0;
let conceptsRequest = null;

// ----- styles ---------------------------------------------------------------------------------
function installStyles() {
  if (document.getElementById("concept-attention-styles")) return;
  const style = document.createElement("style");
  style.id = "concept-attention-styles";
  style.textContent = `
.concept-attention-live { box-sizing: border-box; width: 100%; height: 100%; padding: 4px;
  display: flex; flex-direction: column; gap: 4px; font: 11px sans-serif; color: #ddd;
  background: rgba(0, 0, 0, 0.25); border-radius: 4px; overflow: hidden; }
.concept-attention-live .ca-status { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.concept-attention-live canvas { width: 100%; height: 110px; flex: none; }
.concept-attention-live .ca-maps { display: flex; flex-wrap: wrap; gap: 4px; overflow: auto; }
.concept-attention-live figure { margin: 0; display: flex; flex-direction: column; align-items: center; }
.concept-attention-live figure img { width: 48px; height: 48px; image-rendering: pixelated; }
.concept-attention-live figcaption { max-width: 56px; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
.concept-attention-completions { position: fixed; z-index: 10000; min-width: 180px; max-height: 240px;
  overflow-y: auto; background: #222; color: #eee; border: 1px solid #555; border-radius: 4px;
  font: 12px sans-serif; box-shadow: 0 4px 12px rgba(0, 0, 0, 0.5); }
.concept-attention-completions .ca-item { padding: 3px 8px; cursor: pointer; white-space: nowrap; }
.concept-attention-completions .ca-item.ca-active { background: #3b5b8a; }
.concept-attention-completions .ca-detail { color: #999; margin-left: 6px; }
`;
  document.head.appendChild(style);
}

// ----- live training panel --------------------------------------------------------------------
function createPanel() {
  const root = document.createElement("div");
  root.className = "concept-attention-live";
  root.dataset.step = "0";
  root.dataset.points = "0";
  const status = document.createElement("div");
  status.className = "ca-status";
  status.textContent = "Live view: queue the graph to watch the loss and attention maps.";
  const canvas = document.createElement("canvas");
  canvas.width = 320;
  canvas.height = 110;
  const maps = document.createElement("div");
  maps.className = "ca-maps";
  root.append(status, canvas, maps);
  return root;
}

function seriesColour(name, index) {
  return TERM_COLOURS[name] ?? FALLBACK_COLOURS[index % FALLBACK_COLOURS.length];
}

function drawLosses(canvas, losses) {
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "rgba(0, 0, 0, 0.35)";
  ctx.fillRect(0, 0, width, height);
  const steps = Array.isArray(losses?.step) ? losses.step : [];
  const names = Object.keys(losses ?? {}).filter((k) => k !== "step" && Array.isArray(losses[k]));
  const values = names.flatMap((k) => losses[k]).filter((v) => typeof v === "number" && isFinite(v));
  if (!steps.length || !values.length) return;
  const pad = 6;
  const minStep = steps[0];
  const maxStep = Math.max(steps[steps.length - 1], minStep + 1);
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (high - low < 1e-12) { high += 0.5; low -= 0.5; }
  const x = (s) => pad + ((s - minStep) / (maxStep - minStep)) * (width - 2 * pad);
  const y = (v) => height - pad - ((v - low) / (high - low)) * (height - 2 * pad - 24);
  let legendX = pad;
  let legendY = 10;
  ctx.font = "10px sans-serif";
  names.forEach((name, index) => {
    ctx.strokeStyle = seriesColour(name, index);
    ctx.fillStyle = ctx.strokeStyle;
    ctx.lineWidth = name === "loss" ? 2 : 1;
    ctx.beginPath();
    let started = false;
    losses[name].forEach((v, i) => {
      if (typeof v !== "number" || !isFinite(v) || i >= steps.length) { started = false; return; }
      if (started) ctx.lineTo(x(steps[i]), y(v)); else ctx.moveTo(x(steps[i]), y(v));
      started = true;
    });
    ctx.stroke();
    if (steps.length === 1 && typeof losses[name][0] === "number") {
      ctx.fillRect(x(steps[0]) - 2, y(losses[name][0]) - 2, 4, 4);
    }
    const labelWidth = ctx.measureText(name).width + 10;
    if (legendX + labelWidth > width - pad && legendX > pad) { legendX = pad; legendY += 11; }
    ctx.fillText(name, legendX, legendY);
    legendX += labelWidth;
  });
}

function renderPanel(panel, message) {
  if (!panel || !message) return;
  const losses = message.losses ?? {};
  const points = Array.isArray(losses.step) ? losses.step.length : 0;
  const loss = Array.isArray(losses.loss) ? losses.loss[losses.loss.length - 1] : undefined;
  const done = message.step >= message.total;
  panel.dataset.step = String(message.step ?? 0);
  panel.dataset.total = String(message.total ?? 0);
  panel.dataset.points = String(points);
  panel.dataset.done = String(done);
  const lossText = typeof loss === "number" ? `  loss ${loss.toFixed(4)}` : "";
  panel.querySelector(".ca-status").textContent =
    `step ${message.step}/${message.total}${lossText}${done ? "  (done)" : ""}`;
  drawLosses(panel.querySelector("canvas"), losses);
  const maps = panel.querySelector(".ca-maps");
  const labels = Array.isArray(message.labels) ? message.labels : [];
  maps.replaceChildren(...(Array.isArray(message.maps) ? message.maps : []).map((url, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = img.title = labels[i] ?? `map ${i + 1}`;
    const caption = document.createElement("figcaption");
    caption.textContent = labels[i] ?? `map ${i + 1}`;
    figure.append(img, caption);
    return figure;
  }));
}

function attachPanel(node) {
  if (node.conceptAttentionPanel || typeof node.addDOMWidget !== "function") return;
  const panel = createPanel();
  const widget = node.addDOMWidget(PANEL_WIDGET, "concept_attention_live", panel, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => PANEL_HEIGHT,
    getValue: () => undefined,
    setValue: () => {},
  });
  if (widget) widget.serialize = false;
  node.conceptAttentionPanel = panel;
  const saved = lastUpdates.get(String(node.id));
  if (saved) renderPanel(panel, saved);
  if (Array.isArray(node.size) && typeof node.computeSize === "function") {
    const wanted = node.computeSize();
    node.setSize?.([Math.max(node.size[0], 340), Math.max(node.size[1], wanted[1])]);
  }
}

function findNode(id) {
  const graph = app.graph;
  if (!graph || typeof graph.getNodeById !== "function" || id == null) return null;
  const numeric = Number(id);
  return (Number.isFinite(numeric) ? graph.getNodeById(numeric) : null) ?? graph.getNodeById(id) ?? null;
}

function onTrainingMessage(event) {
  const message = event?.detail;
  if (!message || message.node == null) return;
  lastUpdates.set(String(message.node), message);
  const node = findNode(message.node);
  if (!node || node.comfyClass !== TRAIN_NODE) return;
  if (!node.conceptAttentionPanel) attachPanel(node);
  renderPanel(node.conceptAttentionPanel, message);
  node.setDirtyCanvas?.(true, false);
}

// ----- trigger-word completions ---------------------------------------------------------------
async function refreshConcepts(force = false) {
  if (!force && Date.now() - conceptsFetchedAt < REFRESH_AFTER_MS) return conceptFiles;
  if (conceptsRequest) return conceptsRequest;
  conceptsRequest = (async () => {
    try {
      const response = await api.fetchApi(CONCEPTS_URL, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      conceptFiles = Array.isArray(body?.concepts) ? body.concepts : [];
    } catch (error) {
      console.warn(`[${EXTENSION_NAME}] could not list concept files:`, error);
    } finally {
      conceptsFetchedAt = Date.now();
      conceptsRequest = null;
    }
    return conceptFiles;
  })();
  return conceptsRequest;
}

function completionItems(prefix) {
  const wanted = prefix.toLowerCase();
  const items = [];
  const seen = new Set();
  for (const file of conceptFiles) {
    if (!file || file.error || !Array.isArray(file.concepts)) continue;
    for (const concept of file.concepts) {
      const trigger = String(concept?.trigger ?? "");
      if (!trigger || !trigger.toLowerCase().startsWith(wanted)) continue;
      const text = concept.class_phrase ? `${trigger} ${concept.class_phrase}` : trigger;
      const key = `${text}\u0000${file.name}`;
      if (seen.has(key)) continue;
      seen.add(key);
      items.push({ text, trigger, file: file.name, architecture: file.architecture ?? "" });
    }
  }
  return items.slice(0, MAX_COMPLETIONS);
}

const completion = { box: null, textarea: null, items: [], active: 0, start: 0 };

function isPromptBox(element) {
  return element instanceof HTMLTextAreaElement && element.classList.contains("comfy-multiline-input");
}

function wordBeforeCaret(textarea) {
  const end = textarea.selectionStart ?? 0;
  if (end !== (textarea.selectionEnd ?? end)) return null;
  const before = textarea.value.slice(0, end);
  const match = /[\p{L}\p{N}_<>\-]+$/u.exec(before);
  return match ? { word: match[0], start: end - match[0].length } : null;
}

function closeCompletions() {
  completion.box?.remove();
  completion.box = null;
  completion.textarea = null;
  completion.items = [];
}

function highlight(index) {
  if (!completion.box || !completion.items.length) return;
  completion.active = (index + completion.items.length) % completion.items.length;
  completion.box.querySelectorAll(".ca-item").forEach((el, i) => {
    el.classList.toggle("ca-active", i === completion.active);
  });
}

function accept(index) {
  const { textarea, items, start } = completion;
  const item = items[index];
  if (!textarea || !item) return closeCompletions();
  const end = textarea.selectionStart ?? start;
  textarea.value = textarea.value.slice(0, start) + item.text + textarea.value.slice(end);
  const caret = start + item.text.length;
  textarea.setSelectionRange(caret, caret);
  closeCompletions();
  textarea.dispatchEvent(new Event("input", { bubbles: true })); // the widget reads its value here
  textarea.focus();
}

function showCompletions(textarea, items, start) {
  closeCompletions();
  if (!items.length) return;
  const box = document.createElement("div");
  box.className = "concept-attention-completions";
  items.forEach((item, i) => {
    const row = document.createElement("div");
    row.className = "ca-item";
    row.dataset.trigger = item.trigger;
    row.append(item.text);
    const detail = document.createElement("span");
    detail.className = "ca-detail";
    detail.textContent = [item.file, item.architecture].filter(Boolean).join(" \u00b7 ");
    row.append(detail);
    row.addEventListener("mousedown", (event) => { event.preventDefault(); accept(i); });
    box.append(row);
  });
  const rect = textarea.getBoundingClientRect();
  box.style.left = `${Math.round(rect.left)}px`;
  box.style.top = `${Math.round(Math.min(rect.bottom, window.innerHeight - 40))}px`;
  document.body.append(box);
  Object.assign(completion, { box, textarea, items, active: 0, start });
  highlight(0);
}

async function onPromptInput(event) {
  const textarea = event.target;
  if (!isPromptBox(textarea) || event.isComposing) return;
  const found = wordBeforeCaret(textarea);
  if (!found || !found.word) return closeCompletions();
  await refreshConcepts();
  const again = wordBeforeCaret(textarea); // the text may have changed while fetching
  if (!again || again.word !== found.word || document.activeElement !== textarea) return;
  const items = completionItems(found.word).filter((item) => item.text !== found.word);
  showCompletions(textarea, items, found.start);
}

function onPromptKeydown(event) {
  if (!completion.box || event.target !== completion.textarea) return;
  const moves = { ArrowDown: 1, ArrowUp: -1 };
  if (event.key in moves) {
    highlight(completion.active + moves[event.key]);
  } else if (event.key === "Enter" || event.key === "Tab") {
    accept(completion.active);
  } else if (event.key === "Escape") {
    closeCompletions();
  } else {
    return;
  }
  event.preventDefault();
  event.stopPropagation();
}

function installCompletions() {
  document.addEventListener("input", (event) => {
    onPromptInput(event).catch((error) => console.warn(`[${EXTENSION_NAME}] completion failed:`, error));
  }, true);
  document.addEventListener("keydown", onPromptKeydown, true);
  document.addEventListener("focusin", (event) => {
    if (isPromptBox(event.target)) refreshConcepts();
  }, true);
  document.addEventListener("focusout", (event) => {
    if (event.target === completion.textarea) closeCompletions();
  }, true);
}

// ----- registration ---------------------------------------------------------------------------
app.registerExtension({
  name: EXTENSION_NAME,
  async setup() {
    installStyles();
    installCompletions();
    api.addEventListener(TRAINING_EVENT, onTrainingMessage);
    refreshConcepts(true);
  },
  async nodeCreated(node) {
    if (node?.comfyClass === TRAIN_NODE) attachPanel(node);
  },
});

// A small read-only handle for debugging in the browser console (and the browser tests).
window.conceptAttention = Object.freeze({
  lastUpdate: (nodeId) => lastUpdates.get(String(nodeId)) ?? null,
  concepts: () => conceptFiles.slice(),
  refreshConcepts: () => refreshConcepts(true),
  completions: (prefix) => completionItems(String(prefix ?? "")),
});
