// The attention viewer: asks /translate for a translation with attention weights and draws them on a canvas.
"use strict";

const $ = (id) => document.getElementById(id);
let health = null; // GET /health
let current = null; // the translation being shown (one entry of /translate's "translations")

async function init() {
  const response = await fetch("/health");
  health = await response.json();
  $("model-info").textContent =
    `${health.src_lang} → ${health.tgt_lang}, ${health.model}` +
    (health.members > 1 ? ` × ${health.members} (an ensemble), ` : ", ") +
    `${(health.parameters / 1e6).toFixed(1)}M parameters`;
  for (let k = 1; k <= health.limits.max_beam; k++) {
    $("beam").add(new Option(String(k), String(k), k === health.beam, k === health.beam));
  }
  $("attention-panel").hidden = !health.attention;
  $("translate-form").addEventListener("submit", translate);
  for (const id of ["kind", "layer", "head"]) {
    $(id).addEventListener("change", () => {
      if (!current || !current.attention) return;
      if (id === "kind") fillLayerAndHead();
      draw();
    });
  }
  $("heatmap").addEventListener("mousemove", describeCell);
}

async function translate(event) {
  event.preventDefault();
  $("translate").disabled = true;
  $("status").textContent = "translating…";
  $("error").hidden = true;
  try {
    const response = await fetch("/translate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        sentences: [$("source").value],
        beam: Number($("beam").value),
        attention: health.attention,
      }),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    current = answer.translations[0];
    $("status").textContent = `${answer.time_ms.toFixed(0)} ms`;
    show();
  } catch (error) {
    $("error").textContent = error.message;
    $("error").hidden = false;
    $("status").textContent = "";
  } finally {
    $("translate").disabled = false;
  }
}

function show() {
  $("result").hidden = false;
  $("translation").textContent = current.translation || "(empty)";
  const body = $("alternatives").tBodies[0];
  body.replaceChildren();
  current.alternatives.forEach((alt, i) => {
    const row = body.insertRow();
    if (i === 0) row.className = "best";
    row.insertCell().textContent = String(i + 1);
    row.insertCell().textContent = alt.translation;
    const score = row.insertCell();
    score.textContent = alt.score.toFixed(3);
    score.className = "num";
    const logProb = row.insertCell();
    logProb.textContent = alt.log_prob.toFixed(3);
    logProb.className = "num";
  });
  // An empty sentence has no attention: hide the last sentence's rather than leave it on show.
  $("attention-panel").hidden = !(health.attention && current.attention);
  if (current.attention) {
    fillLayerAndHead();
    draw();
  }
}

function fillLayerAndHead() {
  const layers = current.attention[$("kind").value];
  const keep = (select, n, extra) => {
    const old = select.value;
    select.replaceChildren();
    for (let i = 0; i < n; i++) select.add(new Option(String(i + 1), String(i)));
    if (extra) select.add(new Option(extra, "mean"));
    if ([...select.options].some((o) => o.value === old)) select.value = old;
  };
  keep($("layer"), layers.length, null);
  keep($("head"), layers[0].length, "mean of heads");
}

// The matrix shown, with its row and column labels.
function selection() {
  const a = current.attention;
  const kind = $("kind").value;
  const heads = a[kind][Number($("layer").value)];
  const head = $("head").value;
  const matrix =
    head === "mean"
      ? heads[0].map((row, i) => row.map((_, j) => heads.reduce((s, h) => s + h[i][j], 0) / heads.length))
      : heads[Number(head)];
  const labels = {
    encoder: [a.source_tokens, a.source_tokens, "rows: source positions (queries) · columns: source positions"],
    decoder: [a.target_tokens, a.target_tokens, "rows: target positions (queries) · columns: earlier target positions"],
    cross: [a.output_tokens, a.source_tokens, "rows: the token being predicted · columns: source positions"],
  }[kind];
  return { matrix, rows: labels[0], cols: labels[1], caption: labels[2] };
}

const layout = { cell: 24, left: 0, top: 0 };

function draw() {
  const { matrix, rows, cols, caption } = selection();
  $("axes").textContent = caption;
  const canvas = $("heatmap");
  const ctx = canvas.getContext("2d");
  ctx.font = "12px system-ui, sans-serif";
  const widest = (labels) => Math.max(...labels.map((t) => ctx.measureText(t).width));
  layout.cell = Math.max(14, Math.min(34, Math.floor(640 / Math.max(rows.length, cols.length))));
  layout.left = Math.ceil(widest(rows)) + 10;
  layout.top = Math.ceil(widest(cols) * 0.75) + 14; // labels at -50°
  const width = layout.left + cols.length * layout.cell + 10;
  const height = layout.top + rows.length * layout.cell + 10;
  const scale = window.devicePixelRatio || 1;
  canvas.width = width * scale;
  canvas.height = height * scale;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  const c = layout.cell;
  matrix.forEach((row, i) =>
    row.forEach((w, j) => {
      ctx.fillStyle = colour(w);
      ctx.fillRect(layout.left + j * c, layout.top + i * c, c - 1, c - 1);
    }),
  );
  ctx.fillStyle = "#1b1f24";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  rows.forEach((t, i) => ctx.fillText(t, layout.left - 6, layout.top + i * c + c / 2));
  ctx.textAlign = "left";
  cols.forEach((t, j) => {
    ctx.save();
    ctx.translate(layout.left + j * c + c / 2, layout.top - 6);
    ctx.rotate((-50 * Math.PI) / 180);
    ctx.fillText(t, 0, 0);
    ctx.restore();
  });
  document.body.dataset.drawn = `${$("kind").value}:${$("layer").value}:${$("head").value}`;
}

// White for 0, deep blue for 1.
function colour(w) {
  const t = Math.max(0, Math.min(1, w));
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return `rgb(${mix(255, 8)}, ${mix(255, 48)}, ${mix(255, 107)})`;
}

function describeCell(event) {
  if (!current || !current.attention) return;
  const { matrix, rows, cols } = selection();
  const box = $("heatmap").getBoundingClientRect();
  const j = Math.floor((event.clientX - box.left - layout.left) / layout.cell);
  const i = Math.floor((event.clientY - box.top - layout.top) / layout.cell);
  if (i >= 0 && j >= 0 && i < rows.length && j < cols.length) {
    $("cell-info").textContent = `${rows[i]} → ${cols[j]}: ${matrix[i][j].toFixed(3)}`;
  }
}

init().catch((error) => {
  $("error").textContent = `could not reach the service: ${error.message}`;
  $("error").hidden = false;
});
