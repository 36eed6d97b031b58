// The labeling page: fetch a comparison, show it, send the labeler's choice, undo, show progress.
// Model and user text reaches the page only through textContent, never innerHTML: a story holding <script>
// shows as text. No libraries, no network beyond this server: the page works offline.
"use strict";

const state = { token: null, labeler: null, current: null, busy: false };
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch (e) { /* a non-JSON answer: reported by status below */ }
  if (!response.ok) {
    const error = new Error((data && data.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

function showProgress(stats) {
  if (!stats) return;
  const agreement = stats.agreement === null ? "agreement: not yet (needs 2 labels on one comparison)"
    : `agreement ${(100 * stats.agreement).toFixed(0)} % over ${stats.agreement_pairs} pair(s)`;
  $("progress").textContent = `done ${stats.done} / queued ${stats.queued}` +
    (stats.mine === undefined ? "" : ` · you: ${stats.mine} answered, ${stats.left_for_me} left`) +
    ` · ${agreement}`;
}

function show(comparison) {
  state.current = comparison;
  $("task").hidden = !comparison;
  $("empty").hidden = !!comparison;
  if (!comparison) return;
  $("prompt").textContent = comparison.prompt;
  const box = $("responses");
  box.replaceChildren();
  comparison.responses.forEach((text, i) => {
    const card = document.createElement("article");
    card.className = "response";
    card.dataset.index = String(i);
    const head = document.createElement("header");
    const title = document.createElement("h3");
    title.textContent = `Story ${i + 1}`;
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "pick";
    pick.textContent = "Best ";
    const key = document.createElement("kbd");
    key.textContent = String(i + 1);
    pick.append(key);
    pick.addEventListener("click", () => choose(i));
    head.append(title, pick);
    const body = document.createElement("div");
    body.className = "text";
    body.tabIndex = 0; // scrollable with the keyboard too
    body.textContent = text;
    card.append(head, body);
    box.append(card);
  });
}

async function loadNext() {
  const data = await api("GET", "/api/next?labeler=" + encodeURIComponent(state.labeler));
  show(data.comparison);
  showProgress(data.stats);
}

// One request at a time: a double key press can't send two labels (the server would refuse the second anyway).
async function run(action) {
  if (state.busy) return;
  state.busy = true;
  document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    await action();
  } catch (error) {
    say(error.message, true);
    // 409: someone else filled this comparison or it was already answered; 404: it is gone. Move on.
    if (error.status === 409 || error.status === 404) await loadNext().catch((e) => say(e.message, true));
  } finally {
    state.busy = false;
    document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  }
}

function choose(choice) {
  if (!state.current) return;
  const comparison = state.current;
  if (typeof choice === "number" && choice >= comparison.responses.length) return;
  run(async () => {
    await api("POST", "/api/label", { comparison_id: comparison.id, labeler: state.labeler, choice });
    say(typeof choice === "number" ? `Saved: story ${choice + 1} is best.` : `Saved: ${choice}.`);
    await loadNext();
  });
}

function undo() {
  run(async () => {
    const data = await api("POST", "/api/undo", { labeler: state.labeler });
    showProgress(data.stats);
    if (data.comparison) {
      show(data.comparison);
      say("Undone: choose again.");
    } else {
      say("Nothing to undo.");
    }
  });
}

function askName() {
  $("name-form").hidden = false;
  $("task").hidden = true;
  $("empty").hidden = true;
  $("who").hidden = true;
  $("name-input").value = state.labeler || "";
  $("name-input").focus();
}

function start(name) {
  state.labeler = name;
  localStorage.setItem("wprlhf-labeler", name);
  $("labeler-name").textContent = name;
  $("who").hidden = false;
  $("name-form").hidden = true;
  if (document.activeElement) document.activeElement.blur(); // the hidden name field must not keep the keys
  run(loadNext);
}

document.addEventListener("keydown", (event) => {
  // While the name form is open the keys are typing; afterwards they label, wherever the focus is.
  if (event.ctrlKey || event.metaKey || event.altKey || !state.labeler || !$("name-form").hidden) return;
  const key = event.key.toLowerCase();
  if (key >= "1" && key <= "4" && key.length === 1) choose(Number(key) - 1);
  else if (key === "t") choose("tie");
  else if (key === "s") choose("skip");
  else if (key === "u" || key === "backspace") { event.preventDefault(); undo(); }
  else return;
  event.preventDefault();
});

window.addEventListener("DOMContentLoaded", () => {
  // The token arrives once in the URL; keep it for this tab and take it out of the address bar and history.
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem("wprlhf-token", params.get("token"));
    history.replaceState(null, "", location.pathname);
  }
  state.token = sessionStorage.getItem("wprlhf-token");
  document.querySelectorAll("[data-choice]").forEach((b) => b.addEventListener("click", () => choose(b.dataset.choice)));
  $("undo").addEventListener("click", undo);
  $("undo-empty").addEventListener("click", undo);
  $("change-name").addEventListener("click", askName);
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name-input").value.trim();
    if (name) start(name);
  });
  const saved = localStorage.getItem("wprlhf-labeler");
  if (saved) start(saved); else askName();
});
