// The vqe web page: submit a video to the jobs API (several: a batch), follow its progress,
// compare the result.
// Plain browser JavaScript, no libraries. Every API call goes through api(), which sends the
// API key (if one is saved) and shows the key field when the server answers 401.
"use strict";

const KEY_STORE = "vqe-api-key";
const POLL_MS = 800; // job status polling without an event stream
const POLL_WITH_EVENTS_MS = 4000; // polling kept as a safety net while events arrive
const JOBS_REFRESH_MS = 5000;
const MAX_STAGES = 16;
const FIT_MAX_HEIGHT = 540; // px: the "fit" zoom keeps the comparison about this tall

const $ = (id) => document.getElementById(id);

const state = {
  files: [], // the Files chosen or dropped (two or more make a batch)
  batchId: null, // the batch shown in the batch card
  batchTimer: null,
  jobId: null, // the job shown in the job card
  job: null, // its latest JSON
  pollTimer: null,
  events: null, // AbortController of the event stream, when one is open
  eventsLive: false,
  frames: null, // GET /v1/jobs/{id}/frames answer
  framesLoading: null, // job id whose frames are being fetched
  frame: 0,
  split: 50, // % of the width showing "before"
  blobUrls: {}, // img id -> object URL in use
  previewToken: 0,
};

class AuthNeeded extends Error {}

// -- API ------------------------------------------------------------------------------------

function apiKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch (_e) { return ""; }
}

function authHeaders(headers = {}) {
  const key = apiKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error.message} (${body.error.code})`;
  } catch (_e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (response.status === 401) {
    showAuth(await errorText(response));
    throw new AuthNeeded("API key needed");
  }
  return response;
}

async function apiJson(path, options = {}) {
  const response = await api(path, options);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// -- API key ----------------------------------------------------------------------------------

function showAuth(message) {
  $("auth").hidden = false;
  $("auth-error").textContent = apiKey() ? `The saved key was refused: ${message}` : "";
  $("api-key").focus();
}

function setupAuth() {
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    try { localStorage.setItem(KEY_STORE, key); } catch (_e) { /* private mode */ }
    $("api-key").value = "";
    $("auth").hidden = true;
    refreshJobs();
    if (state.jobId) openJob(state.jobId);
    if (state.batchId) openBatch(state.batchId);
  });
  $("auth-clear").addEventListener("click", () => {
    try { localStorage.removeItem(KEY_STORE); } catch (_e) { /* private mode */ }
    $("auth-error").textContent = "Key forgotten.";
  });
}

// -- submitting -----------------------------------------------------------------------------

function setFiles(files) {
  state.files = Array.from(files || []);
  const names = state.files.map((f) => `${f.name} (${formatBytes(f.size)})`);
  $("file-name").textContent =
    names.length > 1 ? `${names.length} files, one batch: ${names.join(", ")}` : names.join("");
  if (state.files.length) $("source-url").value = "";
}

function setupSubmit() {
  const stages = $("opt-stages");
  for (let i = 1; i <= MAX_STAGES; i++) stages.add(new Option(String(i), String(i)));
  const drop = $("drop");
  drop.addEventListener("click", (event) => {
    if (event.target.tagName !== "LABEL" && event.target.tagName !== "INPUT") $("file").click();
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
  });
  $("file").addEventListener("change", () => setFiles($("file").files));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) setFiles(files);
  });
  $("source-url").addEventListener("input", () => {
    if ($("source-url").value.trim()) { setFiles([]); $("file").value = ""; }
  });
  $("job-form").addEventListener("submit", (event) => { event.preventDefault(); submitJob(); });
}

function options() {
  const values = {
    codec: $("opt-codec").value,
    quality: $("opt-quality").value,
    stages: $("opt-stages").value,
    side_info: $("opt-side-info").value,
  };
  const crf = $("opt-crf").value.trim();
  if (crf) values.crf = crf;
  return values;
}

async function submitJob() {
  const error = $("submit-error");
  error.textContent = "";
  const url = $("source-url").value.trim();
  if (!state.files.length && !url) { error.textContent = "Choose a video file or give a stream URL."; return; }
  const button = $("submit-button");
  button.disabled = true;
  try {
    let job;
    if (state.files.length > 1) {
      const batch = await upload("/v1/batches", state.files, options());
      openBatch(batch.id, batch);
      refreshJobs();
      return;
    }
    if (state.files.length) {
      job = await upload("/v1/jobs", state.files, options());
    } else {
      const values = options();
      if (values.stages !== "auto") values.stages = Number(values.stages);
      if (values.crf !== undefined) values.crf = Number(values.crf);
      job = await apiJson("/v1/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ source_url: url, ...values }),
      });
    }
    openJob(job.id, job);
    refreshJobs();
  } catch (exc) {
    if (!(exc instanceof AuthNeeded)) error.textContent = exc.message;
  } finally {
    button.disabled = false;
  }
}

function upload(path, files, values) {
  // XMLHttpRequest rather than fetch: it reports upload progress. One `file` part per video.
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const [k, v] of Object.entries(values)) form.append(k, v);
    for (const file of files) form.append("file", file, file.name);
    const label = files.length > 1 ? `${files.length} files` : files[0].name;
    const shown = $("file-name").textContent;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) {
        $("file-name").textContent =
          `${label}: uploading ${Math.round((100 * event.loaded) / event.total)}%`;
      }
    };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_e) { /* not JSON */ }
      $("file-name").textContent = shown;
      if (xhr.status === 401) {
        showAuth(body && body.error ? body.error.message : "HTTP 401");
        reject(new AuthNeeded("API key needed"));
      } else if (xhr.status >= 200 && xhr.status < 300 && body) {
        resolve(body);
      } else {
        const msg = body && body.error ? `${body.error.message} (${body.error.code})` : "";
        reject(new Error(msg || `HTTP ${xhr.status}`));
      }
    };
    xhr.onerror = () => reject(new Error("the upload failed (network error)"));
    xhr.send(form);
  });
}

// -- following a job --------------------------------------------------------------------------

function stopFollowing() {
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
  if (state.events) state.events.abort();
  state.events = null;
  state.eventsLive = false;
}

function openJob(id, job) {
  stopFollowing();
  const same = state.jobId === id;
  state.jobId = id;
  if (!same) {
    state.frames = null;
    state.frame = 0;
    $("result").hidden = true;
  }
  history.replaceState(null, "", `#job=${id}`);
  $("job").hidden = false;
  $("job-id").textContent = id;
  highlightJobRow();
  if (job) showJob(job);
  poll();
  followEvents(id);
}

async function poll() {
  const id = state.jobId;
  if (!id) return;
  let job;
  try {
    job = await apiJson(`/v1/jobs/${id}`);
  } catch (exc) {
    if (exc instanceof AuthNeeded) return; // resumed when a key is saved
    $("job-error").textContent = exc.message;
    if (id === state.jobId) state.pollTimer = setTimeout(poll, 3 * POLL_MS);
    return;
  }
  if (id !== state.jobId) return;
  showJob(job);
  if (isFinished(job.status)) {
    stopFollowing();
    refreshJobs();
    return;
  }
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(poll, state.eventsLive ? POLL_WITH_EVENTS_MS : POLL_MS);
}

async function followEvents(id) {
  // An event stream (GET /v1/jobs/{id}/events), if this server has one, only tells us to look
  // again sooner; polling stays the source of truth, so any event format works.
  const controller = new AbortController();
  state.events = controller;
  try {
    const response = await fetch(`/v1/jobs/${id}/events`, {
      headers: authHeaders({ Accept: "text/event-stream" }),
      signal: controller.signal,
    });
    const type = response.headers.get("content-type") || "";
    if (!response.ok || !type.startsWith("text/event-stream") || !response.body) return;
    state.eventsLive = true;
    const reader = response.body.getReader();
    let nudge = null;
    for (;;) {
      const { done } = await reader.read();
      if (done || state.events !== controller) break;
      if (!nudge) {
        nudge = setTimeout(() => {
          nudge = null;
          if (state.events === controller) { clearTimeout(state.pollTimer); poll(); }
        }, 150);
      }
    }
  } catch (_e) {
    /* no stream: polling carries on */
  } finally {
    if (state.events === controller) state.eventsLive = false;
  }
}

function isFinished(status) {
  return status === "succeeded" || status === "failed" || status === "canceled";
}

function showJob(job) {
  state.job = job;
  const status = $("job-status");
  status.textContent = job.status;
  status.className = `status ${job.status}`;
  const pct = job.progress == null ? 0 : Math.round(job.progress * 1000) / 10;
  $("bar-fill").style.width = `${pct}%`;
  $("bar-fill").parentElement.setAttribute("aria-valuenow", String(pct));
  const parts = [];
  if (job.status === "running") parts.push(job.phase || "starting");
  if (job.status === "queued") parts.push("waiting in the queue");
  if (job.progress != null) parts.push(`${pct}%`);
  if (job.frames_total) parts.push(`${job.frames_done} / ${job.frames_total} frames`);
  else if (job.frames_done) parts.push(`${job.frames_done} frames`);
  if (job.fps) parts.push(`${job.fps.toFixed(1)} fps`);
  if (job.status === "running" && job.eta_seconds != null) parts.push(`ETA ${formatSeconds(job.eta_seconds)}`);
  if (job.status === "succeeded" && job.stats) {
    parts.push(`${job.stats.seconds.toFixed(1)} s`);
    if (job.stats.mean_qp != null) parts.push(`mean QP ${job.stats.mean_qp}`);
    const st = job.stats;
    if (st.passthrough) parts.push("passed through (nothing worth re-encoding)");
    else if (st.output_crf != null) parts.push(`output CRF ${st.output_crf} (${st.quality}, ${st.rate_source})`);
    else if (st.quality) parts.push(`${st.quality} (lossless)`);
    if (st.expected_gain_db != null) parts.push(`expected ${st.expected_gain_db >= 0 ? "+" : ""}${st.expected_gain_db} dB`);
    if (st.size_ratio != null) parts.push(`size ×${st.size_ratio}`);
    if (st.gops) parts.push(`${st.gops_copied}/${st.gops} GOPs copied`);
  }
  $("progress-text").textContent = parts.join(" · ");
  let error = job.error ? `${job.error.message} (${job.error.code})` : "";
  if (job.deleted) error = "The job's files were deleted.";
  else if (job.expired) error = "The job's result has expired.";
  $("job-error").textContent = job.status === "succeeded" && !error ? "" : error;
  if (job.status === "succeeded" && !job.deleted && !job.expired && !state.frames) loadResult(job.id);
}

// -- the result -----------------------------------------------------------------------------

async function loadResult(id) {
  if (state.framesLoading === id) return;
  state.framesLoading = id;
  let frames;
  try {
    frames = await apiJson(`/v1/jobs/${id}/frames`);
  } catch (exc) {
    if (!(exc instanceof AuthNeeded) && id === state.jobId) $("job-error").textContent = exc.message;
    return;
  } finally {
    state.framesLoading = null;
  }
  if (id !== state.jobId) return;
  state.frames = frames;
  $("result").hidden = false;
  const slider = $("frame");
  slider.max = String(Math.max(0, frames.count - 1));
  state.frame = Math.min(state.frame, frames.count - 1);
  slider.value = String(state.frame);
  drawPlot();
  showFrame(state.frame);
}

function showFrame(index) {
  state.frame = index;
  $("frame").value = String(index);
  const info = state.frames && state.frames.frames[index];
  const desc = info
    ? `${index + 1} / ${state.frames.count} · ${info.pict_type} · QP ${info.qp == null ? "?" : info.qp} · ${info.stages} stage${info.stages === 1 ? "" : "s"}`
    : "";
  $("frame-label").textContent = desc;
  $("preview-error").textContent = "";
  const token = ++state.previewToken;
  const base = `/v1/jobs/${state.jobId}/preview`;
  const kinds = { "img-before": "before", "img-after": "after", "img-mv": "mv",
    "img-partitions": "partitions", "img-qp": "qp" };
  for (const [imgId, kind] of Object.entries(kinds)) {
    loadImage(imgId, `${base}/${kind}.png?frame=${index}`, token);
  }
  drawPlot();
}

async function loadImage(imgId, url, token) {
  // fetch + object URL instead of <img src>: an <img> cannot send the Authorization header.
  const img = $(imgId);
  try {
    const response = await api(url);
    if (!response.ok) throw new Error(await errorText(response));
    const blob = await response.blob();
    if (token !== state.previewToken) return;
    const old = state.blobUrls[imgId];
    state.blobUrls[imgId] = URL.createObjectURL(blob);
    img.onload = () => { if (imgId === "img-after") layoutCompare(); };
    img.src = state.blobUrls[imgId];
    if (old) URL.revokeObjectURL(old);
  } catch (exc) {
    if (!(exc instanceof AuthNeeded) && token === state.previewToken) {
      $("preview-error").textContent = `${img.alt}: ${exc.message}`;
    }
  }
}

function layoutCompare() {
  const after = $("img-after");
  const before = $("img-before");
  if (!after.naturalWidth) return;
  const zoom = $("zoom").value;
  let width;
  if (zoom === "fit") { // the wrap's width, at most FIT_MAX_HEIGHT tall and 8x
    const room = $("compare-wrap").clientWidth - 2;
    const tall = (FIT_MAX_HEIGHT * after.naturalWidth) / after.naturalHeight;
    width = Math.max(1, Math.floor(Math.min(room, tall, after.naturalWidth * 8)));
  } else {
    width = after.naturalWidth * Number(zoom);
  }
  const height = Math.round((width * after.naturalHeight) / after.naturalWidth);
  for (const img of [after, before]) {
    img.style.width = `${width}px`;
    img.style.height = `${height}px`;
  }
  setSplit(state.split);
}

function setSplit(pct) {
  state.split = Math.max(0, Math.min(100, pct));
  $("img-before").style.clipPath = `inset(0 ${100 - state.split}% 0 0)`;
  $("handle").style.left = `${state.split}%`;
}

function setupCompare() {
  const compare = $("compare");
  let dragging = false;
  const move = (event) => {
    const rect = compare.getBoundingClientRect();
    if (rect.width > 0) setSplit((100 * (event.clientX - rect.left)) / rect.width);
  };
  compare.addEventListener("pointerdown", (event) => {
    dragging = true;
    compare.setPointerCapture(event.pointerId);
    move(event);
  });
  compare.addEventListener("pointermove", (event) => { if (dragging) move(event); });
  compare.addEventListener("pointerup", () => { dragging = false; });
  compare.addEventListener("pointercancel", () => { dragging = false; });
  $("zoom").addEventListener("change", layoutCompare);
  window.addEventListener("resize", () => { layoutCompare(); drawPlot(); });
  $("frame").addEventListener("input", () => showFrame(Number($("frame").value)));
  $("download").addEventListener("click", download);
  $("plot").addEventListener("click", (event) => {
    if (!state.frames || !state.frames.count) return;
    const rect = $("plot").getBoundingClientRect();
    const geom = plotGeometry(rect.width, rect.height, state.frames.count);
    const index = Math.round((event.clientX - rect.left - geom.left) / geom.step);
    showFrame(Math.max(0, Math.min(state.frames.count - 1, index)));
  });
}

function download() {
  if (state.jobId) downloadResult(state.jobId, $("job-error"));
}

async function downloadResult(id, errorBox) {
  const url = `/v1/jobs/${id}/result`;
  if (!apiKey()) { window.location.href = url; return; } // plain download, streamed to disk
  try {
    const response = await api(url);
    if (!response.ok) throw new Error(await errorText(response));
    const match = /filename="?([^";]+)"?/.exec(response.headers.get("content-disposition") || "");
    const blobUrl = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = blobUrl;
    link.download = match ? match[1] : `${id}.mp4`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(blobUrl), 60000);
  } catch (exc) {
    if (!(exc instanceof AuthNeeded)) errorBox.textContent = exc.message;
  }
}

// -- following a batch ----------------------------------------------------------------------

function openBatch(id, batch) {
  clearTimeout(state.batchTimer);
  state.batchId = id;
  history.replaceState(null, "", `#batch=${id}`);
  $("batch").hidden = false;
  $("batch-id").textContent = id;
  $("batch-error").textContent = "";
  if (batch) showBatch(batch);
  pollBatch();
}

async function pollBatch() {
  const id = state.batchId;
  if (!id) return;
  let batch;
  try {
    batch = await apiJson(`/v1/batches/${id}`);
  } catch (exc) {
    if (exc instanceof AuthNeeded) return;
    $("batch-error").textContent = exc.message;
    if (id === state.batchId) state.batchTimer = setTimeout(pollBatch, 3 * POLL_MS);
    return;
  }
  if (id !== state.batchId) return;
  showBatch(batch);
  clearTimeout(state.batchTimer);
  if (!isBatchFinished(batch.status)) state.batchTimer = setTimeout(pollBatch, POLL_MS);
  else refreshJobs();
}

function isBatchFinished(status) {
  return !["queued", "running"].includes(status);
}

function showBatch(batch) {
  const status = $("batch-status");
  status.textContent = batch.status;
  status.className = `status ${batch.status}`;
  const pct = Math.round(batch.progress * 1000) / 10;
  $("batch-bar-fill").style.width = `${pct}%`;
  $("batch-bar-fill").parentElement.setAttribute("aria-valuenow", String(pct));
  const counts = Object.entries(batch.counts).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`);
  $("batch-text").textContent = `${pct}% · ${batch.jobs.length} videos: ${counts.join(", ")}`;
  $("batch-cancel").hidden = isBatchFinished(batch.status);
  const body = $("batch-body");
  body.replaceChildren();
  for (const job of batch.jobs) body.append(batchRow(job));
}

function batchRow(job) {
  const row = document.createElement("tr");
  row.dataset.id = job.id;
  row.dataset.status = job.status;
  const cell = (text, className) => {
    const td = document.createElement("td");
    if (className) td.className = className;
    if (text !== undefined) td.textContent = text;
    row.append(td);
    return td;
  };
  cell(job.source.filename || job.source.url || job.source.kind, "name");
  const badge = document.createElement("span");
  badge.className = `status ${job.status}`;
  badge.textContent = job.status;
  cell(undefined, "state").append(badge);
  const pct = job.status === "failed" || job.progress == null ? null : Math.round(job.progress * 100);
  const progress = cell(undefined, "progress");
  if (pct != null) {
    const bar = document.createElement("span");
    bar.className = "bar small";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${pct}%`;
    bar.append(fill);
    progress.append(bar, `${pct}%`);
  }
  cell(job.frames_total ? `${job.frames_done} / ${job.frames_total}` : job.frames_done ? String(job.frames_done) : "");
  const result = cell(undefined, job.error ? "error" : "result");
  if (job.error) {
    result.textContent = `${job.error.message} (${job.error.code})`;
  } else if (job.status === "succeeded" && !job.deleted && !job.expired) {
    const get = document.createElement("button");
    get.type = "button";
    get.className = "download";
    get.textContent = "download";
    get.addEventListener("click", () => downloadResult(job.id, $("batch-error")));
    const details = document.createElement("button");
    details.type = "button";
    details.className = "secondary details";
    details.textContent = "compare";
    details.addEventListener("click", () => openJob(job.id));
    result.append(get, details);
  }
  return row;
}

function setupBatch() {
  $("batch-cancel").addEventListener("click", async () => {
    const id = state.batchId;
    if (!id) return;
    try {
      await apiJson(`/v1/batches/${id}`, { method: "DELETE" });
    } catch (exc) {
      if (!(exc instanceof AuthNeeded)) $("batch-error").textContent = exc.message;
    }
    pollBatch();
  });
}

// -- the per-frame plot ---------------------------------------------------------------------

const PICT_COLOURS = { I: "#dc2626", P: "#16a34a", B: "#2563eb" };

function plotGeometry(width, height, count) {
  const left = 40, right = 40, top = 24, bottom = 26;
  const inner = Math.max(1, width - left - right);
  const step = count > 1 ? inner / (count - 1) : 0;
  return { left, right, top, bottom, inner, step, plotH: Math.max(1, height - top - bottom) };
}

function drawPlot() {
  const canvas = $("plot");
  if (!state.frames || $("result").hidden) return;
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 800;
  const height = canvas.clientHeight || 200;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  const frames = state.frames.frames;
  const count = frames.length;
  if (!count) return;
  const g = plotGeometry(width, height, count);
  const x = (i) => (count > 1 ? g.left + i * g.step : g.left + g.inner / 2);
  const qps = frames.map((f) => f.qp).filter((q) => q != null);
  const qpLo = qps.length ? Math.floor(Math.min(...qps) - 2) : 0;
  const qpHi = qps.length ? Math.ceil(Math.max(...qps) + 2) : 51;
  const maxStages = Math.max(1, ...frames.map((f) => f.stages));
  const yQp = (q) => g.top + g.plotH * (1 - (q - qpLo) / Math.max(1, qpHi - qpLo));
  const yStage = (s) => g.top + g.plotH * (1 - s / maxStages);

  // Axes and grid.
  ctx.strokeStyle = "#e5e7eb";
  ctx.lineWidth = 1;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#667085";
  for (let k = 0; k <= 4; k++) {
    const y = g.top + (g.plotH * k) / 4;
    ctx.beginPath(); ctx.moveTo(g.left, y); ctx.lineTo(width - g.right, y); ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(String(Math.round(qpHi - ((qpHi - qpLo) * k) / 4)), g.left - 4, y + 4);
    const stages = (maxStages * (4 - k)) / 4;
    ctx.textAlign = "left";
    if (Number.isInteger(stages)) ctx.fillText(String(stages), width - g.right + 4, y + 4);
  }

  // Stages: bars.
  const barW = Math.max(1, Math.min(14, (count > 1 ? g.step : g.inner) * 0.7));
  ctx.fillStyle = "rgba(245, 158, 11, 0.55)";
  frames.forEach((f, i) => {
    const y = yStage(f.stages);
    ctx.fillRect(x(i) - barW / 2, y, barW, g.top + g.plotH - y);
  });

  // QP: line with picture-type dots.
  ctx.strokeStyle = "#111827";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let started = false;
  frames.forEach((f, i) => {
    if (f.qp == null) { started = false; return; }
    if (started) ctx.lineTo(x(i), yQp(f.qp)); else ctx.moveTo(x(i), yQp(f.qp));
    started = true;
  });
  ctx.stroke();
  frames.forEach((f, i) => {
    ctx.fillStyle = PICT_COLOURS[f.pict_type] || "#6b7280";
    const y = f.qp == null ? g.top + g.plotH : yQp(f.qp);
    ctx.beginPath(); ctx.arc(x(i), y, 3, 0, 2 * Math.PI); ctx.fill();
  });

  // The frame shown above.
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.moveTo(x(state.frame), g.top - 4);
  ctx.lineTo(x(state.frame), g.top + g.plotH + 4);
  ctx.stroke();

  // Legend and labels.
  ctx.fillStyle = "#111827";
  ctx.textAlign = "left";
  ctx.fillText("QP (left axis, line)", g.left, 14);
  ctx.fillStyle = "#b45309";
  ctx.fillText("stages (right axis, bars)", g.left + 130, 14);
  let lx = g.left + 290;
  for (const [t, colour] of Object.entries(PICT_COLOURS)) {
    ctx.fillStyle = colour;
    ctx.beginPath(); ctx.arc(lx, 10, 4, 0, 2 * Math.PI); ctx.fill();
    ctx.fillStyle = "#111827";
    ctx.fillText(t, lx + 7, 14);
    lx += 30;
  }
  ctx.fillStyle = "#667085";
  ctx.textAlign = "center";
  ctx.fillText(`frame (0 - ${count - 1})`, g.left + g.inner / 2, height - 6);
}

// -- recent jobs ----------------------------------------------------------------------------

async function refreshJobs() {
  let list;
  try {
    list = await apiJson("/v1/jobs?limit=20");
  } catch (exc) {
    if (!(exc instanceof AuthNeeded)) $("jobs-error").textContent = exc.message;
    return;
  }
  $("jobs-error").textContent = "";
  const body = $("jobs-body");
  body.replaceChildren();
  for (const job of list.items) {
    const row = document.createElement("tr");
    row.dataset.id = job.id;
    const source = job.source.filename || job.source.url || job.source.kind;
    const pct = job.progress == null ? "" : `${Math.round(job.progress * 100)}%`;
    const cells = [formatTime(job.created_at), source, job.status, pct, job.id.slice(0, 8)];
    cells.forEach((text, i) => {
      const cell = document.createElement("td");
      if (i === 2) {
        const badge = document.createElement("span");
        badge.className = `status ${job.status}`;
        badge.textContent = job.deleted ? "deleted" : job.expired ? "expired" : text;
        cell.append(badge);
      } else if (i === 4) {
        const code = document.createElement("code");
        code.textContent = text;
        code.title = job.id;
        cell.append(code);
      } else {
        cell.textContent = text;
      }
      row.append(cell);
    });
    row.addEventListener("click", () => openJob(job.id));
    body.append(row);
  }
  if (!list.items.length) {
    const row = document.createElement("tr");
    const cell = document.createElement("td");
    cell.colSpan = 5;
    cell.className = "muted";
    cell.textContent = "No jobs yet.";
    row.append(cell);
    body.append(row);
  }
  highlightJobRow();
}

function highlightJobRow() {
  for (const row of $("jobs-body").rows) row.classList.toggle("current", row.dataset.id === state.jobId);
}

// -- formatting -----------------------------------------------------------------------------

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

function formatSeconds(s) {
  if (s < 60) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function formatTime(iso) {
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? iso : when.toLocaleString();
}

// -- start ----------------------------------------------------------------------------------

function start() {
  setupAuth();
  setupSubmit();
  setupCompare();
  setupBatch();
  refreshJobs();
  setInterval(() => { if (!document.hidden) refreshJobs(); }, JOBS_REFRESH_MS);
  const match = /job=([0-9a-f]{32})/.exec(window.location.hash);
  if (match) openJob(match[1]);
  const batch = /batch=([0-9a-f]{32})/.exec(window.location.hash);
  if (batch) openBatch(batch[1]);
}

start();
