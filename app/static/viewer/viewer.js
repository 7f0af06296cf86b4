// The viewer page: pick or drop an image, ask a task, see the answer as it is written and the boxes drawn.
// Plain browser APIs only. The API key lives in the form field and in memory; nothing is stored.

const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7"]; // Okabe-Ito

const form = document.getElementById("ask");
const input = document.getElementById("image");
const drop = document.getElementById("drop");
const canvas = document.getElementById("picture");
const status = document.getElementById("status");
const answer = document.getElementById("answer");
const findings = document.getElementById("findings");
const raw = document.getElementById("raw");
const run = document.getElementById("run");

let file = null;
let picture = null; // the preview, as an ImageBitmap

function task() {
  return form.elements.task.value;
}

function showFieldsOf(name) {
  for (const field of document.querySelectorAll(".field[data-task]")) {
    field.hidden = !field.dataset.task.split(" ").includes(name);
  }
}

function say(message, isError = false) {
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function headers(accept) {
  const result = { Accept: accept };
  const key = form.elements.key.value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

function upload(extra = {}) {
  const body = new FormData();
  body.append("image", file, file.name || "image");
  const windowing = form.elements.window.value.trim();
  if (windowing) body.append("window", windowing);
  for (const [name, value] of Object.entries(extra)) {
    if (value) body.append(name, value);
  }
  return body;
}

async function problem(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function paint(boxes = []) {
  const context = canvas.getContext("2d");
  context.drawImage(picture, 0, 0);
  const side = Math.min(canvas.width, canvas.height);
  const line = Math.max(2, Math.round(side / 300));
  const size = Math.max(12, Math.round(side / 40));
  context.lineWidth = line;
  context.font = `${size}px system-ui, sans-serif`;
  context.textBaseline = "top";
  boxes.forEach((box, index) => {
    const colour = PALETTE[index % PALETTE.length];
    context.strokeStyle = colour;
    context.strokeRect(box.x, box.y, box.width, box.height);
    const label = box.label ?? "finding";
    const width = context.measureText(label).width + 2 * line;
    const height = size + 2 * line;
    const x = Math.min(box.x, canvas.width - width);
    const y = box.y >= height ? box.y - height : box.y + line;
    context.fillStyle = colour;
    context.fillRect(x, y, width, height);
    context.fillStyle = "#000";
    context.fillText(label, x + line, y + line);
  });
}

async function preview() {
  findings.replaceChildren();
  answer.textContent = "";
  raw.textContent = "";
  if (!file) return;
  say("Reading the image…");
  const response = await fetch("/preview", { method: "POST", headers: headers("image/png"), body: upload() });
  if (!response.ok) {
    picture = null;
    say(await problem(response), true);
    return;
  }
  picture = await createImageBitmap(await response.blob());
  canvas.width = picture.width;
  canvas.height = picture.height;
  paint();
  say(`${picture.width} × ${picture.height}: choose a task and run it.`);
}

// Server-Sent Events over fetch (EventSource cannot POST): yields {event, data} as they arrive.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += value;
    let end;
    while ((end = pending.indexOf("\n\n")) >= 0) {
      const block = pending.slice(0, end);
      pending = pending.slice(end + 2);
      const fields = Object.fromEntries(
        block.split("\n").map((line) => [line.slice(0, line.indexOf(":")), line.slice(line.indexOf(":") + 2)]),
      );
      yield { event: fields.event, data: JSON.parse(fields.data) };
    }
  }
}

function show(result) {
  raw.textContent = JSON.stringify(result, null, 2);
  if (result.task === "vqa") answer.textContent = result.answer;
  if (result.task === "report") {
    const { findings: text, impression } = result.report;
    answer.textContent = impression ? `Findings\n${text}\n\nImpression\n${impression}` : text;
  }
  if (result.task === "ground") {
    const boxes = result.findings.map((finding) => ({
      label: finding.label,
      x: finding.box.x_min * canvas.width,
      y: finding.box.y_min * canvas.height,
      width: (finding.box.x_max - finding.box.x_min) * canvas.width,
      height: (finding.box.y_max - finding.box.y_min) * canvas.height,
    }));
    paint(boxes);
    findings.replaceChildren(
      ...boxes.map((box, index) => {
        const item = document.createElement("li");
        item.dataset.box = [box.x, box.y, box.x + box.width, box.y + box.height].map(Math.round).join(",");
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = PALETTE[index % PALETTE.length];
        item.append(swatch, `${box.label ?? "finding"}: x ${Math.round(box.x)}–${Math.round(box.x + box.width)}, `
          + `y ${Math.round(box.y)}–${Math.round(box.y + box.height)} px`);
        return item;
      }),
    );
    if (!boxes.length) answer.textContent = "No findings boxed.";
  }
}

async function ask(event) {
  event.preventDefault();
  if (!file || !picture) {
    say("Choose an image first.", true);
    return;
  }
  const name = task();
  const fields = {
    vqa: { question: form.elements.question.value },
    report: { modality: form.elements.modality.value, indication: form.elements.indication.value },
    ground: { target: form.elements.target.value, modality: form.elements.modality.value },
  }[name];
  run.disabled = true;
  answer.textContent = "";
  findings.replaceChildren();
  raw.textContent = "";
  paint();
  say("Waiting for the model…");
  try {
    const response = await fetch(`/${name}`, {
      method: "POST",
      headers: headers("text/event-stream"),
      body: upload(fields),
    });
    if (!response.ok) {
      say(await problem(response), true);
      return;
    }
    let written = "";
    for await (const { event: kind, data } of events(response)) {
      if (kind === "delta") {
        written += data.text;
        answer.textContent = written;
        say("Writing…");
      } else if (kind === "result") {
        show(data);
        say(`Done in ${(data.timing.total_ms / 1000).toFixed(1)} s.`);
      } else if (kind === "error") {
        say(data.error.message, true);
      }
    }
  } catch (error) {
    say(`The request failed: ${error.message}`, true);
  } finally {
    run.disabled = false;
  }
}

function choose(chosen) {
  file = chosen ?? null;
  preview();
}

input.addEventListener("change", () => choose(input.files[0]));
form.elements.window.addEventListener("change", () => preview());
for (const radio of form.elements.task) radio.addEventListener("change", () => showFieldsOf(task()));
form.addEventListener("submit", ask);
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  choose(event.dataTransfer.files[0]);
});
showFieldsOf(task());
