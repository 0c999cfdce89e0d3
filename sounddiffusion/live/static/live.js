// The live page: pictures from the WebSocket stream, numbers and meters from /status, controls to
// POST /settings. No framework, nothing loaded from elsewhere.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const query = token ? "?token=" + encodeURIComponent(token) : "";
const picture = document.getElementById("picture");
const form = document.getElementById("controls");
const message = document.getElementById("message");
let shownUrl = null;

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/ws" + query);
  ws.binaryType = "blob";
  ws.onopen = () => setLink(true);
  ws.onmessage = (event) => {
    const url = URL.createObjectURL(new Blob([event.data], { type: "image/jpeg" }));
    const previous = shownUrl;
    shownUrl = url;
    picture.src = url;
    if (previous) setTimeout(() => URL.revokeObjectURL(previous), 1000);
  };
  ws.onclose = () => { setLink(false); setTimeout(connect, 1000); };
}

function setLink(on) {
  const link = document.getElementById("link");
  link.className = on ? "on" : "off";
  link.title = on ? "pictures are streaming" : "reconnecting";
}

// the child of box whose data-KEY is value: made the first time (a div of className holding html,
// labelled with value in its element matching label), found again after
function childFor(box, key, value, className, html, label) {
  let child = box.querySelector(`[data-${key}="${CSS.escape(value)}"]`);
  if (!child) {
    child = document.createElement("div");
    child.className = className;
    child.dataset[key] = value;
    child.innerHTML = html;
    child.querySelector(label).textContent = value;
    box.appendChild(child);
  }
  return child;
}

function meters(box, envelopes) {
  for (const [name, value] of Object.entries(envelopes)) {
    const meter = childFor(box, "name", name, "meter", '<div class="bar"><div class="fill"></div></div><span></span>', "span");
    meter.querySelector(".fill").style.height = Math.round(100 * value) + "%";
  }
}

// one row of meters per control track (--control NAME=FILE), labelled with its name
function trackMeters(tracks) {
  const box = document.getElementById("tracks");
  for (const [name, envelopes] of Object.entries(tracks)) {
    const row = childFor(box, "track", name, "track", '<span class="name"></span><div class="meters"></div>', ".name");
    meters(row.querySelector(".meters"), envelopes);
  }
}

function fillControls(controls) {
  for (const [name, value] of Object.entries(controls)) {
    const input = form.elements[name];
    if (input && document.activeElement !== input) input.value = value;
    const slider = form.elements[name + "_slider"];
    if (slider && document.activeElement !== slider && !isNaN(Number(value))) slider.value = value;
  }
}

async function poll() {
  try {
    const response = await fetch("/status" + query, { cache: "no-store" });
    if (response.ok) {
      const status = await response.json();
      document.getElementById("fps").textContent = status.fps.toFixed(1);
      document.getElementById("latency").textContent = Math.round(status.latency_ms);
      document.getElementById("frames").textContent = status.frames;
      document.getElementById("bpm").textContent = status.bpm ? Math.round(status.bpm) : "–";
      document.getElementById("beat").textContent = status.bpm ? status.beat_in_bar + 1 : "–";
      meters(document.getElementById("meters"), status.envelopes);
      trackMeters(status.tracks);
      fillControls(status.controls);
    }
  } catch (error) {
    // the server is gone or restarting: try again on the next tick
  }
}

async function send(changes) {
  const response = await fetch("/settings" + query, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(changes),
  });
  const text = await response.text();
  message.className = response.ok ? "ok" : "";
  message.textContent = response.ok ? "applied" : text.trim();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const seed = form.elements.seed.value.trim();
  const changes = {
    prompt: form.elements.prompt.value,
    textstrength: form.elements.textstrength.value.trim(),
    strength: form.elements.strength.value.trim(),
  };
  if (seed !== "") changes.seed = Number(seed);
  send(changes);
});

let sliderTimer = null;
for (const slider of form.querySelectorAll("input[type=range]")) {
  slider.addEventListener("input", () => {
    form.elements[slider.dataset.for].value = slider.value;
    clearTimeout(sliderTimer);
    sliderTimer = setTimeout(() => send({ [slider.dataset.for]: Number(slider.value) }), 80);
  });
}

document.getElementById("fullscreen").addEventListener("click", () => {
  document.documentElement.requestFullscreen().catch(() => {});
});
document.addEventListener("keydown", (event) => {
  if (event.key === "f" && !(event.target instanceof HTMLInputElement)) {
    document.documentElement.requestFullscreen().catch(() => {});
  }
});

connect();
poll();
setInterval(poll, 500);
