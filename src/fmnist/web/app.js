// The fmnist page: one image in (upload, drop, paste or drawing), the model's answer out. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
let classes = [];

function percent(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1) + "%"; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function drawBars(prediction) {
  const best = prediction.top[0].class;
  $("bars").replaceChildren(...classes.map((name) => {
    const p = prediction.probabilities[name];
    const li = document.createElement("li");
    li.className = name === best ? "top" : "";
    li.dataset.class = name;
    li.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span>' +
      '<span class="value"></span>';
    li.querySelector(".name").textContent = name;
    li.querySelector(".value").textContent = percent(p);
    requestAnimationFrame(() => { li.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%"; });
    return li;
  }));
}

function drawSeen(pixels) {
  const context = $("seen").getContext("2d");
  const image = context.createImageData(28, 28);
  pixels.flat().forEach((value, i) => {
    image.data.set([value, value, value, 255], 4 * i);
  });
  context.putImageData(image, 0, 0);
}

function showPrediction(prediction) {
  const best = prediction.top[0];
  const answer = $("answer");
  answer.textContent = best.class + " ";
  const p = document.createElement("span");
  p.className = "p";
  p.textContent = percent(best.probability);
  answer.append(p);
  const flags = [];
  if (prediction.unsure) flags.push("unsure");
  if (prediction.unusual) flags.push("not like the training images");
  for (const flag of flags) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = flag;
    answer.append(badge);
  }
  answer.dataset.class = best.class;
  drawSeen(prediction.input);
  drawBars(prediction);
}

async function predict(blob, filename) {
  const form = new FormData();
  form.append("file", blob, filename);
  $("answer").textContent = "Thinking…";
  try {
    const upright = $("upright").checked ? "&upright=true" : "";
    const response = await fetch("/v1/predict?top=3&include_input=true" + upright, { method: "POST", body: form });
    const body = await response.json().catch(() => ({ error: "the server sent an unreadable answer" }));
    if (!response.ok) throw new Error(body.error || response.statusText);
    showError("");
    showPrediction(body.predictions[0]);
  } catch (error) {
    $("answer").textContent = "No answer";
    delete $("answer").dataset.class;
    $("bars").replaceChildren();
    showError(error.message);
  }
}

function predictFile(file) {
  if (!file) return;
  const original = $("original");
  if (original.src) URL.revokeObjectURL(original.src);
  original.src = URL.createObjectURL(file);
  $("original-figure").hidden = false;
  predict(file, file.name || "pasted.png");
}

// ---------------------------------------------------------------------------------------------- upload, drop, paste
const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
$("file").addEventListener("change", (event) => { predictFile(event.target.files[0]); event.target.value = ""; });
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  predictFile(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const item = [...event.clipboardData.items].find((entry) => entry.type.startsWith("image/"));
  if (item) predictFile(item.getAsFile());
});

// ---------------------------------------------------------------------------------------------- drawing pad
const pad = $("pad");
const ink = pad.getContext("2d");
let drawing = false;
let drawn = false;

function clearPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  drawn = false;
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  drawing = true;
  pad.setPointerCapture(event.pointerId);
  ink.strokeStyle = "#111";
  ink.lineWidth = 22;
  ink.lineCap = ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(...point(event));
  ink.lineTo(...point(event));
  ink.stroke();
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  ink.lineTo(...point(event));
  ink.stroke();
  drawn = true;
});
function finishStroke() {
  if (!drawing) return;
  drawing = false;
  if (!drawn) return;
  $("original-figure").hidden = true;
  pad.toBlob((blob) => predict(blob, "drawing.png"), "image/png");
}
pad.addEventListener("pointerup", finishStroke);
pad.addEventListener("pointercancel", finishStroke);
$("clear").addEventListener("click", clearPad);
clearPad();

// ---------------------------------------------------------------------------------------------- the model
fetch("/v1/model").then((response) => response.json()).then((model) => {
  classes = model.classes;
  const accuracy = typeof model.test_accuracy === "number" ? ` · test accuracy <b>${percent(model.test_accuracy)}</b>` : "";
  $("model").innerHTML = `model <b></b>${model.preset ? " · preset <b></b>" : ""}${accuracy}`;
  const bold = $("model").querySelectorAll("b");
  bold[0].textContent = model.name;
  if (model.preset) bold[1].textContent = model.preset;
}).catch(() => { $("model").textContent = "the model information could not be loaded"; });
