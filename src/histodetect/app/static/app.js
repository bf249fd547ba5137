// The page's behaviour: upload patches (one /predict then one /explain request each) or a region (/slide), and
// show what comes back. No framework and nothing from the internet: the server ships this file.
"use strict";

const IN_FLIGHT = 4; // patches sent at once; the server gathers concurrent requests into one model call

async function post(path, field, file) {
  const form = new FormData();
  form.append(field, file, file.name);
  const response = await fetch(path, { method: "POST", body: form }); // same origin: the session cookie goes along
  let answer;
  try {
    answer = await response.json();
  } catch {
    answer = { error: `${response.status} ${response.statusText}` };
  }
  if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
  return answer;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

function figure(base64, caption) {
  const img = element("img", { src: `data:image/png;base64,${base64}`, alt: `${caption} of the patch` });
  return element("figure", {}, img, element("figcaption", {}, caption));
}

function showError(container, message) {
  container.append(element("p", { class: "error", role: "alert" }, message));
}

async function scorePatch(file, card) {
  const [result] = await post("/predict", "files", file);
  const shown = element("output", { class: "probability", "data-probability": String(result.probability) },
    result.probability.toFixed(4));
  const decision = element("span", { class: `decision ${result.label ? "positive" : "negative"}` },
    result.label ? "tumour" : "no tumour");
  card.append(element("p", {}, element("span", { class: "sr-label" }, "P(tumour) "), shown, decision));
  const explained = await post("/explain", "file", file);
  card.append(element("div", { class: "images" },
    figure(explained.patch_png, "patch"), figure(explained.overlay_png, "Grad-CAM")));
}

async function scorePatches(files) {
  const list = document.getElementById("results");
  const queue = [...files].map((file) => {
    const card = element("li", { class: "card" }, element("h3", {}, file.name));
    list.prepend(card);
    return [file, card];
  });
  async function worker() {
    while (queue.length) {
      const [file, card] = queue.shift();
      card.setAttribute("aria-busy", "true");
      try {
        await scorePatch(file, card);
      } catch (error) {
        showError(card, error.message);
      } finally {
        card.removeAttribute("aria-busy");
      }
    }
  }
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
}

async function scoreRegion(file) {
  const box = document.getElementById("region-result");
  box.replaceChildren(element("p", {}, `Scoring ${file.name}… (a large region takes a while)`));
  try {
    const { summary, heatmap_png: heatmap } = await post("/slide", "file", file);
    const facts = element("dl");
    const shown = {
      "size (pixels)": `${summary.width} x ${summary.height}`,
      "tissue cells scored": summary.cells_scored,
      [`cells at P >= ${summary.threshold}`]: summary.cells_at_or_above_threshold,
      "highest P": summary.max_probability === null ? "—" : summary.max_probability.toFixed(4),
      "seconds": summary.seconds,
    };
    for (const [key, value] of Object.entries(shown)) facts.append(element("dt", {}, key), element("dd", {}, value));
    const img = element("img", { src: `data:image/png;base64,${heatmap}`, alt: `Tumour heatmap over ${file.name}` });
    box.replaceChildren(element("h3", {}, file.name), img, facts);
  } catch (error) {
    box.replaceChildren();
    showError(box, `${file.name}: ${error.message}`);
  }
}

const HANDLERS = { patches: scorePatches, region: (files) => files.length && scoreRegion(files[0]) };

function wire() {
  for (const zone of document.querySelectorAll(".drop")) {
    const handle = HANDLERS[zone.dataset.target];
    const input = zone.querySelector("input[type=file]");
    input.addEventListener("change", () => {
      handle(input.files);
      input.value = "";
    });
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      handle(event.dataTransfer.files);
    });
  }
  fetch("/health").then((response) => response.json()).then((health) => {
    const models = health.models.map((m) => `${m.name} (${m.architecture})`).join(" + ");
    document.getElementById("model").textContent =
      `${models} · TTA ${health.tta} · ${health.precision} on ${health.device} · threshold ${health.threshold} · ` +
      `v${health.version}`;
  }).catch(() => { document.getElementById("model").textContent = "The server does not answer."; });
}

wire();
