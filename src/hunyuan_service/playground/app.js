// The playground: one form per model type, talking to POST /infer with server-sent events.
// Plain browser JavaScript, no build step and no external origin (the page's CSP forbids both).
"use strict";

const KEY_STORAGE = "hunyuan-service-api-key";
const $ = (selector) => document.querySelector(selector);
let running = null; // the AbortController of the request in flight

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  return headers;
}

function showMessage(text, kind) {
  const box = $("#message");
  box.textContent = text;
  box.dataset.kind = kind || "error";
  box.hidden = !text;
}

function clearErrors(form) {
  showMessage("");
  for (const slot of form.querySelectorAll(".field-error")) slot.textContent = "";
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

// An error as the server worded it: next to its field when it names one, else in the banner.
function showError(form, error, status, retryAfter) {
  const message = (error && error.message) || "request failed (" + status + ")";
  const param = error && error.param ? String(error.param).split(/[.[]/)[0] : "";
  const slot = param ? form.querySelector('.field-error[data-for="' + param + '"]') : null;
  if (slot) {
    slot.textContent = message;
    const input = form.querySelector('[name="' + param + '"]');
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
    return;
  }
  if (status === 401) {
    $("#key-form").hidden = false;
    $("#api-key").focus();
  }
  const wait = retryAfter ? " Retry in " + retryAfter + " s." : "";
  showMessage(message + wait);
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // keep-alive comment
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}

// POSTs to /infer with streaming on, and calls on[event name](data) for each event.
async function streamInfer(form, body, on) {
  const controller = new AbortController();
  running = controller;
  try {
    const response = await fetch("infer", {
      method: "POST",
      headers: requestHeaders(),
      body: JSON.stringify({ ...body, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const payload = await response.json().catch(() => ({}));
      showError(form, payload.error, response.status, response.headers.get("Retry-After"));
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (!event) continue;
        if (event.name === "error") {
          showError(form, event.data.error, 0);
        } else if (on[event.name]) {
          on[event.name](event.data);
        }
      }
    }
  } catch (error) {
    if (controller.signal.aborted) showMessage("Stopped.", "info");
    else showMessage("The connection failed: " + error.message);
  } finally {
    running = null;
  }
}

const readAsDataUrl = (file) =>
  new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });

function setBusy(form, busy) {
  form.querySelector("button[type=submit]").disabled = busy;
  form.querySelector("button.stop").disabled = !busy;
  form.setAttribute("aria-busy", String(busy));
}

// -- text2image ---------------------------------------------------------------------------------

function setupTextToImage(config) {
  const form = $("#text2image");
  form.hidden = false;
  for (const name of ["width", "height"]) {
    const input = form.elements[name];
    input.min = config.min_image_side;
    input.max = config.max_image_side;
  }
  form.elements.num_inference_steps.max = config.max_inference_steps;
  const bar = $("#image-progress");
  const barText = $("#image-progress-text");
  const edit = setupEdit(form);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    $("#image-result").hidden = true;
    bar.max = 1;
    bar.value = 0;
    barText.textContent = "";
    const body = {
      prompt: form.elements.prompt.value,
      width: Number(form.elements.width.value),
      height: Number(form.elements.height.value),
      num_inference_steps: Number(form.elements.num_inference_steps.value),
    };
    const seed = form.elements.seed.value.trim();
    if (seed) body.seed = /^\d+$/.test(seed) ? Number(seed) : seed;
    Object.assign(body, await edit.fields());
    setBusy(form, true);
    await streamInfer(form, body, {
      queued: (data) => {
        barText.textContent = data.position > 1 ? "queued, position " + data.position : "queued";
      },
      started: () => {
        barText.textContent = "running";
      },
      progress: (data) => {
        bar.max = data.total;
        bar.value = data.step;
        barText.textContent = "step " + data.step + " of " + data.total;
        form.dataset.stepsSeen = String(data.step);
      },
      result: (data) => {
        const url = "data:image/" + data.format + ";base64," + data.image_base64;
        const image = $("#result-image");
        image.src = url;
        image.width = data.width;
        image.height = data.height;
        $("#result-seed").textContent = "seed " + data.seed;
        const link = $("#result-download");
        link.href = url;
        link.download = "hunyuan-" + data.seed + "." + data.format;
        $("#image-result").hidden = false;
        barText.textContent = "done";
      },
    });
    setBusy(form, false);
  });
  $("#cancel-image").addEventListener("click", () => running && running.abort());
}

// The image to edit, and its mask: painted on a canvas over the image, or uploaded as a file.
function setupEdit(form) {
  const canvas = $("#mask-canvas");
  const context = canvas.getContext("2d");
  let image = null; // the chosen image's data URL
  let painted = false;

  function clearMask() {
    context.fillStyle = "black";
    context.fillRect(0, 0, canvas.width, canvas.height);
    painted = false;
    canvas.dataset.painted = "false";
  }

  form.elements.image.addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    image = await readAsDataUrl(file);
    const preview = $("#edit-preview");
    preview.src = image;
    await preview.decode();
    canvas.width = preview.naturalWidth;
    canvas.height = preview.naturalHeight;
    clearMask();
    // The output takes the image's size, rounded down to multiples of 16, unless changed here.
    form.elements.width.value = Math.floor(preview.naturalWidth / 16) * 16;
    form.elements.height.value = Math.floor(preview.naturalHeight / 16) * 16;
    $("#mask-editor").hidden = false;
  });

  function paintAt(event) {
    const box = canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) * canvas.width) / box.width;
    const y = ((event.clientY - box.top) * canvas.height) / box.height;
    const radius = (Number($("#brush").value) * canvas.width) / box.width / 2;
    context.fillStyle = "white";
    context.beginPath();
    context.arc(x, y, radius, 0, 2 * Math.PI);
    context.fill();
    painted = true;
    canvas.dataset.painted = "true";
  }
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    paintAt(event);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (canvas.hasPointerCapture(event.pointerId)) paintAt(event);
  });
  $("#clear-mask").addEventListener("click", clearMask);
  $("#remove-image").addEventListener("click", () => {
    image = null;
    form.elements.image.value = "";
    form.elements.mask.value = "";
    $("#mask-editor").hidden = true;
  });

  // The request's edit fields: none without an image.
  return {
    async fields() {
      if (!image) return {};
      const fields = { image };
      const maskFile = form.elements.mask.files[0];
      if (maskFile) fields.mask = await readAsDataUrl(maskFile);
      else if (painted) fields.mask = canvas.toDataURL("image/png");
      const strength = form.elements.strength.value.trim();
      if (strength) fields.strength = Number(strength);
      return fields;
    },
  };
}

// -- image2text ---------------------------------------------------------------------------------

function setupImageToText(config) {
  const form = $("#image2text");
  form.hidden = false;
  form.elements.max_new_tokens.max = config.max_new_tokens_limit;
  const chosen = []; // File objects
  const list = $("#thumbnails");

  function render() {
    list.replaceChildren();
    chosen.forEach((file, index) => {
      const item = document.createElement("li");
      const image = document.createElement("img");
      image.src = URL.createObjectURL(file);
      image.alt = file.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", "remove " + file.name);
      remove.addEventListener("click", () => {
        chosen.splice(index, 1);
        render();
      });
      item.append(image, remove);
      list.append(item);
    });
  }

  function add(files) {
    for (const file of files) if (file.type.startsWith("image/")) chosen.push(file);
    render();
  }

  form.elements.images.addEventListener("change", (event) => {
    add(event.target.files);
    event.target.value = "";
  });
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    add(event.dataTransfer.files);
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const answer = $("#answer");
    answer.textContent = "";
    answer.dataset.pieces = "0";
    delete answer.dataset.done;
    const body = {
      prompt: form.elements.prompt.value,
      images: await Promise.all(chosen.map(readAsDataUrl)),
      max_new_tokens: Number(form.elements.max_new_tokens.value),
    };
    const video = form.elements.videos.files[0];
    if (video) body.videos = [await readAsDataUrl(video)];
    setBusy(form, true);
    await streamInfer(form, body, {
      token: (data) => {
        answer.textContent += data.text;
        answer.dataset.pieces = String(Number(answer.dataset.pieces) + 1);
      },
      result: (data) => {
        answer.dataset.streamed = answer.textContent;
        answer.textContent = data.text;
        answer.dataset.promptTokens = String(data.usage.prompt_tokens);
        answer.dataset.done = "true";
      },
    });
    setBusy(form, false);
  });
  $("#stop-text").addEventListener("click", () => running && running.abort());
}

// -- start --------------------------------------------------------------------------------------

async function waitUntilReady() {
  for (;;) {
    const health = await fetch("health").then((r) => r.json()).catch(() => null);
    if (health && health.state === "ready") {
      const demo = health.demo ? " (demo model: random weights, outputs are noise)" : "";
      $("#service-status").textContent = health.model_id + " on " + health.device + demo;
      return health;
    }
    const phase = health && health.phase ? health.phase : "starting";
    $("#service-status").textContent = "The service is " + phase + "…";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function main() {
  const config = await fetch("playground/config.json").then((r) => r.json());
  $("#key-form").hidden = !config.api_key_required || Boolean(apiKey());
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("#api-key").value);
    $("#key-form").hidden = true;
    showMessage("Key saved for this tab.", "info");
  });
  if (config.model_type === "text2image") setupTextToImage(config);
  else setupImageToText(config);
  const health = await waitUntilReady();
  const steps = $("#steps");
  if (health.default_steps && !steps.value) steps.value = health.default_steps;
  document.body.dataset.ready = "true";
}

main();
