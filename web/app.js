// The fluxstream demo page: submit a job, watch its events, keep the finished images.
// A job survives a reload: its id sits in the URL hash and in localStorage, and the
// page reopens its event stream, which replays what was missed.

const $ = (id) => document.getElementById(id);
const STORE = {
  key: "fluxstream.apiKey",
  current: "fluxstream.currentJob",
  gallery: "fluxstream.gallery",
};
// OpenAI's default range tops out at 3; a server may allow fewer (see /health).
let partialImages = 3;
const GALLERY_MAX = 48;
const MAX_BLUR_PX = 6;
// A few chips, not a wall of them: the first ones the model offers.
const EXAMPLES_SHOWN = 4;
// For a model that offers no examples of its own (a real FLUX), or a server that cannot say.
const FALLBACK_EXAMPLES = [
  "a lighthouse at dusk, watercolor",
  "a red fox in fresh snow, morning light",
  "a bowl of ramen on a wooden table, seen from above",
  "a rainy city street at night, neon reflections",
];

class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const saved = {
  get(name, fallback) {
    try {
      const text = localStorage.getItem(name);
      return text === null ? fallback : JSON.parse(text);
    } catch {
      return fallback;
    }
  },
  set(name, value) {
    try {
      if (value === null) localStorage.removeItem(name);
      else localStorage.setItem(name, JSON.stringify(value));
    } catch {
      // Storage may be full or disabled; the page still works without it.
    }
  },
};

// ---- talking to the server -------------------------------------------------

function apiKey() {
  return saved.get(STORE.key, "");
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch {
    throw new ApiError("The server cannot be reached. Is it still running?", 0, null);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (body && body.error) || {};
    const message = error.message || `The server answered ${response.status}.`;
    throw new ApiError(message, response.status, error.code || null);
  }
  return body;
}

// EventSource cannot send headers, so the key travels as a query parameter here only.
function eventsUrl(job) {
  const url = new URL(new URL(job.events_url, location.href).pathname, location.href);
  if (apiKey()) url.searchParams.set("api_key", apiKey());
  return url.toString();
}

function jobPath(id) {
  return `/v1/images/jobs/${encodeURIComponent(id)}`;
}

// ---- the stage: preview, progress, elapsed time, messages -------------------

const ui = {
  setState(state) {
    $("stage").dataset.state = state;
    const busy = state === "queued" || state === "running";
    $("generate").disabled = busy;
    $("generate").textContent = busy ? "Generating…" : "Generate";
    $("cancel").hidden = !busy;
  },
  progress(step, total) {
    const percent = total ? Math.round((100 * step) / total) : 0;
    $("bar-fill").style.width = `${percent}%`;
    $("bar").setAttribute("aria-valuenow", String(percent));
    $("step-label").textContent = `step ${step} of ${total}`;
  },
  label(text) {
    $("step-label").textContent = text;
  },
  // A new job starts from an empty stage: the last image is not this job's, and the bar
  // without a width of its own pulses while the job waits.
  clear() {
    $("preview").removeAttribute("src");
    $("bar-fill").style.removeProperty("width");
    $("bar").removeAttribute("aria-valuenow");
  },
  image(src, kind, index, blur) {
    const img = $("preview");
    img.dataset.kind = kind;
    img.dataset.index = String(index);
    img.style.setProperty("--blur", `${blur}px`);
    img.src = src;
  },
  message(text, tone = "error") {
    const box = $("message");
    box.hidden = !text;
    box.textContent = text || "";
    box.className = `message ${tone === "info" ? "info" : ""}`;
  },
};

const clock = {
  timer: null,
  start(startedAt) {
    this.stop();
    const tick = () => {
      const seconds = Math.max(0, (Date.now() - startedAt) / 1000);
      $("elapsed").textContent = `${seconds.toFixed(1)} s`;
    };
    tick();
    this.timer = setInterval(tick, 100);
  },
  stop() {
    clearInterval(this.timer);
    this.timer = null;
  },
};

// ---- watching one job -------------------------------------------------------

let watching = null; // { id, source, settings, startedAt, totalSteps }

function remember(current) {
  saved.set(STORE.current, current);
  const hash = current ? `#job=${encodeURIComponent(current.id)}` : "";
  history.replaceState(null, "", `${location.pathname}${location.search}${hash}`);
}

function stopWatching() {
  if (watching && watching.source) watching.source.close();
  watching = null;
  clock.stop();
  remember(null);
}

function watch(job, settings, startedAt) {
  if (watching && watching.source) watching.source.close();
  watching = { id: job.id, settings, startedAt, totalSteps: null, source: null };
  remember({ id: job.id, settings, startedAt });
  ui.setState(job.status === "queued" ? "queued" : "running");
  ui.label(job.status === "queued" ? "queued" : "starting");
  if (job.progress) ui.progress(job.progress.step, job.progress.total_steps);
  clock.start(startedAt);
  connect(job);
}

function connect(job) {
  const current = watching;
  const source = new EventSource(eventsUrl(job));
  current.source = source;
  const on = (name, handler) =>
    source.addEventListener(name, (event) => {
      if (watching === current) handler(JSON.parse(event.data));
    });

  on("queued", () => ui.label("queued"));
  on("progress", ({ step, total_steps }) => {
    current.totalSteps = total_steps;
    ui.setState("running");
    ui.message("");
    ui.progress(step, total_steps);
  });
  on("partial_image", (p) => {
    const blur = Math.round(MAX_BLUR_PX * (1 - p.step / p.total_steps));
    ui.image(`data:image/${p.output_format};base64,${p.b64_json}`, "partial", p.partial_image_index, blur);
  });
  on("completed", (snapshot) => finished(snapshot));
  on("failed", (snapshot) => finished(snapshot));
  on("cancelled", (snapshot) => finished(snapshot));
  source.onerror = () => {
    if (watching !== current) return;
    if (source.readyState === EventSource.CLOSED) recover(current);
    else ui.message("Connection lost; reconnecting…", "info");
  };
}

// The stream closed for good (the server restarted, the job expired, a key is needed):
// ask for the job's state and either finish, reconnect, or explain.
async function recover(current) {
  try {
    const job = await api(jobPath(current.id));
    if (watching !== current) return;
    if (["completed", "failed", "cancelled"].includes(job.status)) finished(job);
    else setTimeout(() => watching === current && connect(job), 1000);
  } catch (error) {
    if (watching !== current) return;
    stopWatching();
    ui.setState("error");
    ui.label("lost");
    ui.message(explain(error, "The job could not be followed"));
  }
}

function finished(snapshot) {
  const current = watching;
  stopWatching();
  if (snapshot.status === "completed") {
    const entry = galleryEntry(snapshot, current);
    ui.image(entry.src, "final", 0, 0);
    ui.setState("done");
    ui.progress(entry.steps || 1, entry.steps || 1);
    ui.label(`done · ${entry.size} · seed ${entry.seed}`);
    gallery.add(entry);
    ui.message("");
  } else if (snapshot.status === "cancelled") {
    ui.setState("cancelled");
    ui.label("cancelled");
    ui.message("The job was cancelled.", "info");
  } else {
    ui.setState("error");
    ui.label("failed");
    ui.message(`The image could not be made: ${snapshot.error ? snapshot.error.message : "unknown error"}.`);
  }
}

function explain(error, what) {
  if (error.status === 401) {
    $("key-box").open = true;
    $("api-key").focus();
    return apiKey()
      ? "This server did not accept the API key: check it under “API key” at the top right."
      : "This server needs an API key: enter it under “API key” at the top right.";
  }
  if (error.status === 404 && error.code === "job_not_found") {
    return "That job is gone: the server restarted, or the job finished too long ago.";
  }
  if (error.status === 429) return "The server is busy. Try again in a few seconds.";
  return `${what}: ${error.message}`;
}

// ---- the gallery ------------------------------------------------------------

function galleryEntry(snapshot, current) {
  const result = snapshot.result;
  const item = result.data[0];
  const settings = (current && current.settings) || {};
  const src = item.url || `data:image/${result.output_format};base64,${item.b64_json}`;
  return {
    id: snapshot.id,
    src,
    format: result.output_format,
    prompt: item.revised_prompt || settings.prompt || "",
    seed: item.seed,
    size: result.size,
    steps: (snapshot.progress && snapshot.progress.total_steps) || (current && current.totalSteps),
    aspect: settings.aspect,
    resolution: settings.resolution,
    loras: settings.loras || [],
  };
}

const gallery = {
  entries: saved.get(STORE.gallery, []),
  add(entry) {
    this.entries = [entry, ...this.entries.filter((e) => e.id !== entry.id)].slice(0, GALLERY_MAX);
    this.save();
  },
  remove(id) {
    this.entries = this.entries.filter((e) => e.id !== id);
    this.save();
  },
  save() {
    saved.set(STORE.gallery, this.entries);
    this.render();
  },
  render() {
    const list = $("gallery");
    list.replaceChildren(...this.entries.map(card));
    $("empty").hidden = this.entries.length > 0;
    $("clear").hidden = this.entries.length === 0;
  },
};

function card(entry) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  node.dataset.job = entry.id;
  const img = node.querySelector("img");
  img.src = entry.src;
  img.alt = entry.prompt;
  // Url results expire on the server; a card whose file is gone removes itself.
  img.addEventListener("error", () => gallery.remove(entry.id), { once: true });
  node.querySelector(".thumb").href = entry.src;
  node.querySelector(".prompt").textContent = entry.prompt;
  node.querySelector(".prompt").title = entry.prompt;
  const steps = entry.steps ? ` · ${entry.steps} steps` : "";
  const loras = (entry.loras || []).map((lora) => ` · ${loraLabel(lora.path)} ×${lora.scale}`).join("");
  node.querySelector(".facts").textContent = `seed ${entry.seed} · ${entry.size}${steps}${loras}`;
  const download = node.querySelector(".download");
  download.href = entry.src;
  download.download = `fluxstream-${entry.seed}.${entry.format || "png"}`;
  node.querySelector(".reuse").addEventListener("click", () => reuse(entry));
  return node;
}

function reuse(entry) {
  $("prompt").value = entry.prompt;
  $("seed").value = entry.seed;
  if (entry.resolution) $("resolution").value = entry.resolution;
  if (entry.steps) setSteps(entry.steps);
  const aspect = document.querySelector(`input[name="aspect"][value="${entry.aspect}"]`);
  if (aspect) aspect.checked = true;
  setLoras(entry.loras || []);
  $("prompt").focus();
}

// ---- the form -----------------------------------------------------------------

function setSteps(value) {
  $("steps").value = String(value);
  $("steps-out").textContent = Number(value) > 0 ? String(value) : "auto";
}

function readSettings() {
  return {
    prompt: $("prompt").value.trim(),
    aspect: document.querySelector('input[name="aspect"]:checked').value,
    resolution: $("resolution").value,
    steps: Number($("steps").value),
    seed: $("seed").value.trim(),
    loras: chosenLoras(),
  };
}

function requestBody(settings) {
  const body = {
    prompt: settings.prompt,
    aspect_ratio: settings.aspect,
    partial_images: partialImages,
    response_format: "url",
  };
  // Without a tier the server draws at the model's own size (256 px on the embedded model).
  if (settings.resolution) body.resolution = settings.resolution;
  if (settings.steps > 0) body.num_inference_steps = settings.steps;
  if (settings.seed !== "") body.seed = Number(settings.seed);
  if (settings.loras && settings.loras.length) body.loras = settings.loras;
  return body;
}

async function generate(event) {
  event.preventDefault();
  // Ctrl+Enter submits even while the button is disabled: one job at a time.
  if ($("generate").disabled) return;
  const settings = readSettings();
  if (!settings.prompt) {
    ui.message("Write a prompt first.", "info");
    $("prompt").focus();
    return;
  }
  ui.message("");
  ui.setState("queued");
  ui.label("submitting");
  ui.clear();
  const startedAt = Date.now();
  try {
    const job = await api("/v1/images/jobs", {
      method: "POST",
      body: JSON.stringify(requestBody(settings)),
    });
    watch(job, settings, startedAt);
  } catch (error) {
    ui.setState("error");
    ui.label("not started");
    ui.message(explain(error, "The job was not accepted"));
  }
}

async function cancel() {
  if (!watching) return;
  const current = watching;
  $("cancel").disabled = true;
  try {
    const snapshot = await api(jobPath(current.id), { method: "DELETE" });
    // The job may have ended on its own meanwhile, and its events have shown it already.
    if (watching === current) finished(snapshot);
  } catch (error) {
    if (watching === current) ui.message(explain(error, "The job could not be cancelled"));
  } finally {
    $("cancel").disabled = false;
  }
}

// Reopen the job this tab was watching before a reload, if any.
async function resume() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("job");
  const stored = saved.get(STORE.current, null);
  const id = fromHash || (stored && stored.id);
  if (!id) return;
  const mine = stored && stored.id === id ? stored : null;
  try {
    const job = await api(jobPath(id));
    if (mine) $("prompt").value = mine.settings.prompt;
    watching = { id, settings: mine ? mine.settings : {}, totalSteps: null, source: null };
    if (["completed", "failed", "cancelled"].includes(job.status)) finished(job);
    else watch(job, watching.settings, mine ? mine.startedAt : job.created * 1000);
  } catch (error) {
    stopWatching();
    ui.message(explain(error, "The job could not be resumed"));
  }
}

async function showModel() {
  try {
    const health = await api("/health");
    $("model").textContent = health.model || "";
    $("model").title = `served model: ${health.model}`;
    partialImages = Math.min(partialImages, health.max_partial_images ?? partialImages);
  } catch {
    // The model badge is decoration; the page works without it.
  }
}

// ---- example prompts ----------------------------------------------------------

function exampleButton(text) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  button.title = text;
  // Fills the box only: the newcomer sees the prompt, and may change it, before generating.
  button.addEventListener("click", () => {
    $("prompt").value = text;
    $("prompt").focus();
  });
  return button;
}

// The served model's examples draw what it can draw (the small embedded model knows only
// its own grammar); without them, generic ones still give a first try something to draw.
async function showExamples() {
  let examples = [];
  try {
    const models = await api("/v1/models");
    examples = (models.data && models.data[0] && models.data[0].example_prompts) || [];
  } catch {
    // The fallback below serves as well when the server cannot be asked.
  }
  const shown = (examples.length ? examples : FALLBACK_EXAMPLES).slice(0, EXAMPLES_SHOWN);
  $("examples").append(...shown.map(exampleButton));
  $("examples").hidden = false;
}

// ---- LoRAs ----------------------------------------------------------------------

// "outline.safetensors" reads as "outline"; a folder's file as its folder.
function loraLabel(id) {
  return id.replace(/\/pytorch_lora_weights\.safetensors$/, "").replace(/\.safetensors$/, "");
}

function loraRow(id) {
  const row = document.createElement("div");
  row.className = "lora";
  row.dataset.lora = id;
  const label = document.createElement("label");
  const box = document.createElement("input");
  box.type = "checkbox";
  box.className = "lora-on";
  label.append(box, ` ${loraLabel(id)}`);
  label.title = id;
  const scale = document.createElement("input");
  scale.type = "number";
  scale.className = "lora-scale";
  scale.min = "-4";
  scale.max = "4";
  scale.step = "0.1";
  scale.value = "1";
  scale.setAttribute("aria-label", `${loraLabel(id)} scale`);
  row.append(label, scale);
  return row;
}

function chosenLoras() {
  return [...document.querySelectorAll("#loras .lora")]
    .filter((row) => row.querySelector(".lora-on").checked)
    .map((row) => {
      // An emptied scale box means the default, 1.
      const scale = Number(row.querySelector(".lora-scale").value || 1);
      return { path: row.dataset.lora, scale: Number.isFinite(scale) ? scale : 1 };
    });
}

function setLoras(loras) {
  for (const row of document.querySelectorAll("#loras .lora")) {
    const chosen = loras.find((lora) => lora.path === row.dataset.lora);
    row.querySelector(".lora-on").checked = Boolean(chosen);
    row.querySelector(".lora-scale").value = String(chosen ? chosen.scale : 1);
  }
}

// Only a server started with --lora-dir lists any; without them the picker stays hidden.
async function showLoras() {
  let listed = [];
  try {
    listed = (await api("/v1/loras")).data || [];
  } catch {
    // An older server, or one that needs a key first: the page works without LoRAs.
  }
  const usable = listed.filter((lora) => lora.valid !== false).map((lora) => lora.id);
  if (!usable.length) return;
  $("loras").replaceChildren(...usable.map(loraRow));
  $("lora-box").hidden = false;
}

function init() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("steps").addEventListener("input", () => setSteps($("steps").value));
  $("dice").addEventListener("click", () => {
    $("seed").value = String(Math.floor(Math.random() * 2 ** 32));
  });
  $("clear").addEventListener("click", () => {
    gallery.entries = [];
    gallery.save();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.metaKey || event.ctrlKey)) $("form").requestSubmit();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("key-box").open = false;
  });
  $("api-key").value = apiKey();
  $("api-key").addEventListener("input", () => saved.set(STORE.key, $("api-key").value.trim() || null));
  gallery.render();
  showModel();
  showExamples();
  showLoras();
  resume();
}

init();
