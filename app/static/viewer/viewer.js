// The viewer page: pick or drop images (or a folder of one series), ask a task, see the answer as it is
// written and each box drawn on its own image. Plain browser APIs only. The API key lives in the form field
// and in memory; nothing is stored.

const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7"]; // Okabe-Ito
const PREVIEWS_AT_ONCE = 3; // a series of 64 slices is read a few at a time, not in one burst
const THUMB_SIDE = 96;
const MAX_CAPTION_CHARS = 200; // the server's limit

const form = document.getElementById("ask");
const input = document.getElementById("image");
const folder = document.getElementById("folder");
const drop = document.getElementById("drop");
const limitNote = document.getElementById("limit");
const thumbs = document.getElementById("thumbs");
const canvas = document.getElementById("picture");
const shown = document.getElementById("shown");
const status = document.getElementById("status");
const answer = document.getElementById("answer");
const findings = document.getElementById("findings");
const raw = document.getElementById("raw");
const run = document.getElementById("run");

// The chosen images, in the order they are sent: {file, name, caption, bitmap, problem}.
// bitmap is the preview (the image as the service displays it); problem is why it could not be read.
let images = [];
let selected = 0;
let result = null; // the last task's JSON response; its image indexes count in `images`
let maxImages = null; // the server's limit, from /info once a key lets the page read it
let generation = 0; // bumped whenever the images change, so late previews of an old choice are dropped

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

function nameOf(index) {
  return images.length > 1 ? `Image ${index + 1} (${images[index].name})` : images[index].name;
}

// The multipart body: one `image` part per image and, when any is captioned, one `caption` per image in the
// same order (empty for an image without one), then the window and the task's fields.
function upload(chosen, fields = {}) {
  const body = new FormData();
  const captioned = chosen.some((image) => image.caption?.trim());
  for (const image of chosen) {
    body.append("image", image.file, image.name);
    if (captioned) body.append("caption", image.caption.trim());
  }
  const windowing = form.elements.window.value.trim();
  if (windowing) body.append("window", windowing);
  for (const [name, value] of Object.entries(fields)) {
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

// The server's image limit, read once; null while /info cannot be read (no key yet): the server then says.
async function limit() {
  if (maxImages !== null) return maxImages;
  try {
    const response = await fetch("/info", { headers: headers("application/json") });
    if (!response.ok) return null;
    maxImages = (await response.json()).limits.max_images;
    limitNote.textContent = `Up to ${maxImages} images per request; or drop files or a folder here.`;
  } catch {
    return null;
  }
  return maxImages;
}

// --- the large picture ---

// The findings of the last /ground on one image, in its displayed pixels, each with its place in the list.
function boxesOn(index) {
  if (result?.task !== "ground") return [];
  const { width, height } = images[index].bitmap;
  return result.findings
    .map((finding, order) => ({ finding, order }))
    .filter(({ finding }) => finding.image_index === index)
    .map(({ finding, order }) => ({
      order,
      label: finding.label ?? "finding",
      x: finding.box.x_min * width,
      y: finding.box.y_min * height,
      width: (finding.box.x_max - finding.box.x_min) * width,
      height: (finding.box.y_max - finding.box.y_min) * height,
    }));
}

function paint(picture, boxes) {
  const context = canvas.getContext("2d");
  context.drawImage(picture, 0, 0);
  const side = Math.min(canvas.width, canvas.height);
  const line = Math.max(2, Math.round(side / 300));
  const size = Math.max(12, Math.round(side / 40));
  context.lineWidth = line;
  context.font = `${size}px system-ui, sans-serif`;
  context.textBaseline = "top";
  for (const box of boxes) {
    const colour = PALETTE[box.order % PALETTE.length];
    // On whole pixels, so that the pixel under each edge is the stroke's own colour, not a blend.
    const [left, top, right, bottom] = [box.x, box.y, box.x + box.width, box.y + box.height].map(Math.round);
    context.strokeStyle = colour;
    context.strokeRect(left, top, right - left, bottom - top);
    const width = context.measureText(box.label).width + 2 * line;
    const height = size + 2 * line;
    const x = Math.max(0, Math.min(left, canvas.width - width));
    const y = top >= height ? top - height : top + line;
    context.fillStyle = colour;
    context.fillRect(x, y, width, height);
    context.fillStyle = "#000";
    context.fillText(box.label, x + line, y + line);
  }
}

function counted(findings) {
  return `${findings} finding${findings === 1 ? "" : "s"}`;
}

function showSelected() {
  const image = images[selected];
  for (const [index, button] of thumbs.querySelectorAll("button.pick").entries()) {
    button.setAttribute("aria-pressed", String(index === selected));
  }
  if (!image?.bitmap) {
    canvas.width = 0;
    canvas.height = 0;
    shown.hidden = true;
    return;
  }
  const boxes = boxesOn(selected);
  canvas.width = image.bitmap.width;
  canvas.height = image.bitmap.height;
  paint(image.bitmap, boxes);
  const grounded = result?.task === "ground";
  const where = images.length > 1 ? `Image ${selected + 1} of ${images.length}: ` : "";
  const size = `${image.bitmap.width} × ${image.bitmap.height}`;
  shown.textContent = `${where}${image.name}, ${size}${grounded ? `, ${counted(boxes.length)}` : ""}`;
  shown.hidden = images.length < 2;
  const drawn = grounded ? `, with its ${counted(boxes.length)} drawn` : "";
  canvas.setAttribute("aria-label", `${where}${image.name} as the service displays it${drawn}`);
}

function select(index) {
  selected = index;
  showSelected();
}

// --- the thumbnails ---

function thumbnail(image, index) {
  const item = document.createElement("li");
  item.className = "thumb";

  const pick = document.createElement("button");
  pick.type = "button";
  pick.className = "pick";
  pick.setAttribute("aria-pressed", String(index === selected));
  pick.addEventListener("click", () => select(index));
  const small = document.createElement("canvas");
  small.setAttribute("aria-hidden", "true");
  small.width = THUMB_SIDE;
  small.height = THUMB_SIDE;
  const words = document.createElement("span");
  words.className = "thumb-name";
  pick.append(small, words);

  const captionId = `caption-${index}`;
  const label = document.createElement("label");
  label.htmlFor = captionId;
  label.textContent = `Caption for image ${index + 1}`;
  const caption = document.createElement("input");
  caption.id = captionId;
  caption.type = "text";
  caption.maxLength = MAX_CAPTION_CHARS;
  caption.placeholder = "optional, e.g. frontal";
  caption.value = image.caption;
  caption.addEventListener("input", () => {
    image.caption = caption.value;
  });

  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "remove";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove image ${index + 1}, ${image.name}`);
  remove.addEventListener("click", () => removeImage(index));

  item.append(pick, label, caption, remove);
  drawThumbnail(item, image, index);
  return item;
}

function drawThumbnail(item, image, index) {
  const small = item.querySelector("canvas");
  const words = item.querySelector(".thumb-name");
  const context = small.getContext("2d");
  context.clearRect(0, 0, small.width, small.height);
  let state = "being read";
  if (image.bitmap) {
    const { width, height } = image.bitmap;
    const scale = Math.min(THUMB_SIDE / width, THUMB_SIDE / height);
    const [w, h] = [width * scale, height * scale];
    context.drawImage(image.bitmap, (THUMB_SIDE - w) / 2, (THUMB_SIDE - h) / 2, w, h);
    state = `${width} × ${height}`;
  } else if (image.problem) {
    state = "cannot be read";
  }
  words.textContent = `${index + 1}. ${image.name}`;
  words.title = image.name; // the whole name, where a long one is cut short
  item.classList.toggle("broken", Boolean(image.problem));
  item.querySelector("button.pick").setAttribute("aria-label", `Show image ${index + 1}, ${image.name}, ${state}`);
}

function renderThumbs() {
  thumbs.replaceChildren(...images.map(thumbnail));
  thumbs.hidden = images.length === 0;
}

function clearAnswer() {
  result = null;
  findings.replaceChildren();
  answer.textContent = "";
  raw.textContent = "";
}

function removeImage(index) {
  const [gone] = images.splice(index, 1);
  generation += 1; // any preview still on its way belongs to the list before
  clearAnswer(); // its image indexes counted the removed image
  selected = Math.min(selected > index ? selected - 1 : selected, Math.max(0, images.length - 1));
  renderThumbs();
  showSelected();
  const next = thumbs.querySelectorAll("button.pick")[Math.min(index, images.length - 1)];
  (next ?? input).focus();
  say(images.length ? `Removed ${gone.name}; ${images.length} left.` : "Choose an image to begin.");
  if (images.some((image) => !image.bitmap && !image.problem)) readPreviews(""); // those cut off by the removal
}

// --- choosing files ---

// Hidden files and a DICOMDIR are not images of the series.
function isSeriesFile(name) {
  return !name.startsWith(".") && name.toUpperCase() !== "DICOMDIR";
}

// A folder's files in path order, numbers compared as numbers (slice 2 before slice 10).
function inPathOrder(entries) {
  return entries
    .filter(({ file }) => isSeriesFile(file.name))
    .sort((a, b) => a.path.localeCompare(b.path, undefined, { numeric: true }))
    .map(({ file }) => file);
}

async function choose(files, from = "") {
  const current = ++generation;
  clearAnswer();
  const most = await limit();
  if (current !== generation) return; // chosen again meanwhile
  let note = "";
  if (most !== null && files.length > most) {
    note = `${files.length} files ${from || "chosen"}, but this server takes at most ${most} images per request: `
      + `only the first ${most} are used. `;
    files = files.slice(0, most);
  }
  images = files.map((file) => ({ file, name: file.name || "image", caption: "", bitmap: null, problem: null }));
  selected = 0;
  renderThumbs();
  showSelected();
  if (!images.length) {
    say(from ? `No files found ${from}.` : "Choose an image to begin.", Boolean(from));
    return;
  }
  readPreviews(note);
}

async function readPreview(image, index, current) {
  let bitmap = null;
  let trouble = null;
  try {
    const body = upload([{ file: image.file, name: image.name }]); // the picture only: no caption
    const response = await fetch("/preview", { method: "POST", headers: headers("image/png"), body });
    if (response.ok) bitmap = await createImageBitmap(await response.blob());
    else trouble = await problem(response);
  } catch (error) {
    trouble = `the request failed: ${error.message}`;
  }
  if (current !== generation) return;
  image.bitmap = bitmap;
  image.problem = trouble;
  const item = thumbs.children[index];
  if (item) drawThumbnail(item, image, index);
  if (index === selected) showSelected();
}

// Why images could not be read, or null: one reason said once when it is every image's (a wrong key).
function problems() {
  const broken = images.map((image, index) => ({ image, index })).filter(({ image }) => image.problem);
  if (!broken.length) return null;
  const reasons = new Set(broken.map(({ image }) => image.problem));
  if (reasons.size === 1 && broken.length === images.length) return broken[0].image.problem;
  return broken.map(({ image, index }) => `${nameOf(index)}: ${image.problem}`).join(" ");
}

// Every image through /preview (a browser cannot show DICOM), a few at a time, then one word on the outcome.
async function readPreviews(note) {
  const current = generation;
  const waiting = images
    .map((image, index) => ({ image, index }))
    .filter(({ image }) => !image.bitmap && !image.problem);
  say(`${note}Reading ${images.length === 1 ? "the image" : `${waiting.length} of ${images.length} images`}…`);
  const worker = async () => {
    for (let next = waiting.shift(); next; next = waiting.shift()) {
      await readPreview(next.image, next.index, current);
    }
  };
  await Promise.all(Array.from({ length: PREVIEWS_AT_ONCE }, worker));
  if (current !== generation) return;
  const trouble = problems();
  if (trouble) {
    say(note + trouble, true);
  } else if (images.length === 1) {
    const { width, height } = images[0].bitmap;
    say(`${note}${width} × ${height}: choose a task and run it.`);
  } else {
    say(`${note}${images.length} images: choose a task and run it; choose a thumbnail to see an image large.`);
  }
}

// --- asking ---

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

function findingItem(finding, order) {
  const image = images[finding.image_index];
  const { width, height } = image.bitmap;
  const corners = [
    finding.box.x_min * width,
    finding.box.y_min * height,
    finding.box.x_max * width,
    finding.box.y_max * height,
  ].map(Math.round);
  const item = document.createElement("li");
  item.dataset.image = String(finding.image_index);
  item.dataset.box = corners.join(",");
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  swatch.style.background = PALETTE[order % PALETTE.length];
  const words = `${finding.label ?? "finding"}: x ${corners[0]}–${corners[2]}, y ${corners[1]}–${corners[3]} px`;
  if (images.length === 1) {
    item.append(swatch, words);
    return item;
  }
  // With several images each finding says which it is on, and shows that image when chosen.
  const show = document.createElement("button");
  show.type = "button";
  show.className = "finding";
  show.append(swatch, `${nameOf(finding.image_index)}: ${words}`);
  show.addEventListener("click", () => select(finding.image_index));
  item.append(show);
  return item;
}

function show(response) {
  result = response;
  raw.textContent = JSON.stringify(response, null, 2);
  if (response.task === "vqa") answer.textContent = response.answer;
  if (response.task === "report") {
    const { findings: text, impression } = response.report;
    answer.textContent = impression ? `Findings\n${text}\n\nImpression\n${impression}` : text;
  }
  if (response.task === "ground") {
    findings.replaceChildren(...response.findings.map(findingItem));
    if (!response.findings.length) answer.textContent = "No findings boxed.";
  }
  showSelected();
}

// The text as it is written: with several images grounded side by side, each image's under its name.
function written(texts) {
  if (texts.size === 1 && texts.has(null)) return texts.get(null);
  return [...texts.keys()]
    .sort((a, b) => a - b)
    .map((index) => `${nameOf(index)}\n${texts.get(index)}`)
    .join("\n\n");
}

async function ask(event) {
  event.preventDefault();
  if (!images.length) {
    say("Choose an image first.", true);
    return;
  }
  const trouble = problems();
  if (trouble) {
    say(trouble, true);
    return;
  }
  if (images.some((image) => !image.bitmap)) {
    say("The images are still being read; run again in a moment.", true);
    return;
  }
  const name = task();
  const fields = {
    vqa: { question: form.elements.question.value },
    report: { modality: form.elements.modality.value, indication: form.elements.indication.value },
    ground: { target: form.elements.target.value, modality: form.elements.modality.value },
  }[name];
  run.disabled = true;
  clearAnswer();
  showSelected();
  const current = generation;
  say("Waiting for the model…");
  try {
    const response = await fetch(`/${name}`, {
      method: "POST",
      headers: headers("text/event-stream"),
      body: upload(images, fields),
    });
    if (!response.ok) {
      say(await problem(response), true);
      return;
    }
    const texts = new Map();
    for await (const { event: kind, data } of events(response)) {
      if (current !== generation) return; // the images changed while it ran: its answer is of others
      if (kind === "delta") {
        const index = data.image_index ?? null;
        texts.set(index, (texts.get(index) ?? "") + data.text);
        answer.textContent = written(texts);
        say("Writing…");
      } else if (kind === "result") {
        show(data);
        const boxed = data.task === "ground" ? `, ${counted(data.findings.length)}` : "";
        say(`Done in ${(data.timing.total_ms / 1000).toFixed(1)} s${boxed}.`);
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

// --- wiring ---

// Each way of choosing replaces the images chosen before, so the other picker is emptied.
input.addEventListener("change", () => {
  folder.value = "";
  choose([...input.files]);
});
folder.addEventListener("change", () => {
  input.value = "";
  const entries = [...folder.files].map((file) => ({ file, path: file.webkitRelativePath || file.name }));
  choose(inPathOrder(entries), "in the folder");
});
// Images are read again as displayed with another window, and those refused read again with another key.
function readAgain(which) {
  if (!images.some(which)) return;
  generation += 1;
  clearAnswer();
  for (const image of images.filter(which)) Object.assign(image, { bitmap: null, problem: null });
  renderThumbs();
  showSelected();
  readPreviews("");
}
form.elements.window.addEventListener("change", () => readAgain(() => true));
form.elements.key.addEventListener("change", () => readAgain((image) => image.problem));
for (const radio of form.elements.task) radio.addEventListener("change", () => showFieldsOf(task()));
form.addEventListener("submit", ask);

// A drop of files keeps their order; a drop of a folder reads every file in it, in path order.
async function filesOf(entry, into) {
  if (entry.isFile) {
    into.push({ file: await new Promise((resolve, reject) => entry.file(resolve, reject)), path: entry.fullPath });
    return;
  }
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) return;
    for (const child of batch) await filesOf(child, into);
  }
}

drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", async (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  input.value = "";
  folder.value = "";
  // Entries must be taken while the event is being handled: the transfer is emptied afterwards.
  const entries = [...(event.dataTransfer.items ?? [])].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.some((entry) => entry.isDirectory)) {
    choose([...event.dataTransfer.files]);
    return;
  }
  const found = [];
  try {
    for (const entry of entries) await filesOf(entry, found);
  } catch (error) {
    say(`The folder could not be read: ${error.message}`, true);
    return;
  }
  choose(inPathOrder(found), "in the dropped folder");
});
showFieldsOf(task());
