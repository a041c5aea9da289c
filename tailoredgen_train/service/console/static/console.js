// tailoredgen console: drag-and-drop upload, JSON caption editors, the run page's live progress and
// curves (inline SVG). Everything else is plain HTML forms; pages work without this script.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

// ---- drag-and-drop upload: the dropped files go into the form's file input, and the form is sent
document.querySelectorAll("[data-upload]").forEach((form) => {
  const zone = form.querySelector("[data-dropzone]");
  const input = form.querySelector("input[type=file]");
  const over = (on) => (event) => { event.preventDefault(); zone.classList.toggle("over", on); };
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, over(true)));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, over(false)));
  zone.addEventListener("drop", (event) => {
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    input.files = event.dataTransfer.files;
    form.requestSubmit();
  });
});

// ---- JSON editors: say at once when the text is not a JSON object; "Format JSON" indents it.
// The server checks again on save, with the API's rule and message.
function jsonProblem(text) {
  if (!text.trim()) return null;
  try {
    const value = JSON.parse(text);
    return value !== null && typeof value === "object" && !Array.isArray(value) ? null
      : "a structured caption or prompt is a JSON object: { \"field\": ... }";
  } catch (error) {
    return "not valid JSON yet: " + error.message;
  }
}

document.querySelectorAll("textarea[data-json-editor]").forEach((area) => {
  let message = area.parentElement.querySelector("[data-json-message]");
  if (!message) {
    message = document.createElement("p");
    message.className = "error";
    message.hidden = true;
    message.id = area.id + "-live";
    area.setAttribute("aria-describedby", ((area.getAttribute("aria-describedby") || "") + " " + message.id).trim());
    area.insertAdjacentElement("afterend", message);
  }
  let timer = null;
  area.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      const problem = jsonProblem(area.value);
      message.textContent = problem || "";
      message.hidden = !problem;
      if (problem) area.setAttribute("aria-invalid", "true"); else area.removeAttribute("aria-invalid");
    }, 300);
  });
  const format = area.form && area.form.querySelector("[data-format]");
  if (format) {
    format.addEventListener("click", () => {
      try { area.value = JSON.stringify(JSON.parse(area.value), null, 2); } catch (error) { /* the message says why */ }
      area.dispatchEvent(new Event("input"));
    });
  }
});

// ---- a select that reloads its page when changed (the Generate page's model)
document.querySelectorAll("select[data-autosubmit]").forEach((select) => {
  select.addEventListener("change", () => select.form.submit());
});

// ---- after a refused form, the first field it refused gets the focus
const firstInvalid = document.querySelector("[aria-invalid=true]");
if (firstInvalid && document.querySelector("[role=alert], .error:not([hidden])")) firstInvalid.focus();

// ---- the dataset page: reload while the captioning model writes captions, unless a caption is being edited
if (document.querySelector("[data-captions-pending]")) {
  const edited = () => [...document.querySelectorAll("textarea")].some((t) => t.value !== t.defaultValue);
  const reload = () => (edited() || document.activeElement?.tagName === "TEXTAREA" ? setTimeout(reload, 3000)
                                                                                    : window.location.reload());
  setTimeout(reload, 3000);
}

// ---- the run page: poll the progress every few seconds while the model trains
function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.round(seconds);
  if (seconds < 60) return seconds + " s";
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return minutes + " min " + String(seconds % 60).padStart(2, "0") + " s";
  return Math.floor(minutes / 60) + " h " + String(minutes % 60).padStart(2, "0") + " min";
}

function node(parent, name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  parent.appendChild(element);
  return element;
}

function tick(value) {
  const magnitude = Math.abs(value);
  return magnitude !== 0 && (magnitude < 1e-2 || magnitude >= 1e4) ? value.toExponential(2) : +value.toPrecision(3) + "";
}

// One curve (and for the loss, its smoothed line) over steps 0..total, drawn into an SVG.
function drawChart(svg, points, column, total, smooth) {
  const W = 640, H = 240, left = 62, right = 14, top = 12, bottom = 30;
  const values = points.filter((p) => p[column] !== null && p[column] !== undefined);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.dataset.count = String(values.length);
  const name = column === 1 ? "Training loss" : "Learning rate";
  if (!values.length) {
    node(svg, "text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no steps yet");
    svg.setAttribute("aria-label", name + " by step: no steps yet");
    return;
  }
  const lastStep = points[points.length - 1][0];
  const xMax = Math.max(total || 0, lastStep, 1);
  let low = Math.min(...values.map((p) => p[column])), high = Math.max(...values.map((p) => p[column]));
  if (low === high) { const pad = Math.abs(low) * 0.1 || 1e-3; low -= pad; high += pad; }
  const span = high - low;
  low -= span * 0.05; high += span * 0.05;
  const x = (step) => left + (W - left - right) * step / xMax;
  const y = (value) => top + (H - top - bottom) * (1 - (value - low) / (high - low));
  for (let i = 0; i <= 4; i++) {
    const value = low + (high - low) * i / 4;
    node(svg, "line", { class: "grid", x1: left, x2: W - right, y1: y(value), y2: y(value) });
    node(svg, "text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, tick(value));
  }
  node(svg, "line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom });
  node(svg, "line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom });
  [0, Math.round(xMax / 2), xMax].forEach((step) => {
    node(svg, "text", { x: x(step), y: H - bottom + 18, "text-anchor": "middle" }, String(step));
  });
  const stride = Math.max(1, Math.floor(values.length / 1200));  // a long run: about 1200 points drawn
  const line = (list) => list.filter((_, i) => i % stride === 0 || i === list.length - 1)
    .map((p) => x(p[0]).toFixed(1) + "," + y(p[column]).toFixed(1)).join(" ");
  if (smooth) {
    node(svg, "polyline", { class: "raw", points: line(values) });
    // exponential moving average, debiased (as TensorBoard smooths)
    let average = 0, weight = 0;
    const smoothed = values.map((p) => {
      average = 0.9 * average + 0.1 * p[column]; weight = 0.9 * weight + 0.1;
      return [p[0], average / weight];
    });
    node(svg, "polyline", { class: "line", points: line(smoothed) });  // [step, value]: column 1, as the loss
  } else {
    node(svg, "polyline", { class: "line", points: line(values) });
  }
  points.filter((p) => p[3]).forEach((p) => node(svg, "circle", { class: "skipped", cx: x(p[0]), cy: H - bottom, r: 3 }));
  const last = values[values.length - 1];
  svg.setAttribute("aria-label", name + " by step: " + values.length + " steps, " + tick(last[column]) + " at step " + last[0]);
}

const run = document.querySelector("[data-run]");
if (run) {
  const state = { after: -1, points: [], renders: null, checkpoints: null, status: run.dataset.status };
  const total = () => Number(run.dataset.total) || null;
  const active = (status) => status === "InProgress" || status === "Stopping";
  const text = (id, value) => { const element = document.getElementById(id); if (element) element.textContent = value; };

  async function refreshSamples() {
    const response = await fetch(run.dataset.samplesUrl, { credentials: "same-origin" });
    if (response.ok && !response.redirected) document.getElementById("samples").innerHTML = await response.text();
  }

  async function poll() {
    let body = null;
    try {
      const response = await fetch(run.dataset.progressUrl + "?after=" + state.after, { credentials: "same-origin" });
      if (response.ok && !response.redirected) body = await response.json();
    } catch (error) { /* the server restarts or the network blinks: try again at the next tick */ }
    if (body) {
      if (body.status !== state.status && (active(body.status) || active(state.status))) {
        location.reload();  // started or ended: the page's forms and links change
        return;
      }
      state.points.push(...body.points);
      if (body.points.length) state.after = body.points[body.points.length - 1][0];
      const progress = body.progress;
      if (progress) {
        if (progress.total_steps) run.dataset.total = progress.total_steps;
        text("run-step", progress.current_step);
        text("run-total", total() || "–");
        text("run-loss", progress.last_loss === null ? "–" : progress.last_loss.toFixed(4));
        text("run-eta", duration(progress.eta_seconds));
        const bar = document.getElementById("run-progress");
        bar.max = total() || 1;
        bar.value = progress.current_step;
      }
      drawChart(document.getElementById("loss-chart"), state.points, 1, total(), true);
      drawChart(document.getElementById("lr-chart"), state.points, 2, total(), false);
      const log = document.getElementById("run-log");
      const atBottom = state.renders === null || log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      log.textContent = body.log.join("\n");
      if (atBottom) log.scrollTop = log.scrollHeight;
      const renders = body.renders.join(",") + "/" + body.checkpoints;
      if (state.renders !== null && renders !== state.renders) await refreshSamples();
      state.renders = renders;
    }
    if (active(state.status) || !body) setTimeout(poll, Number(run.dataset.pollMs) || 2000);
  }
  poll();
}
