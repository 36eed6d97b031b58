// The labeling page: open a session, lease a comparison, show it, send the labeler's choice, undo, show progress.
// Model and user text reaches the page only through textContent or Text nodes, never innerHTML: a story holding
// <script> shows as text. No libraries, no network beyond this server: the page works offline.
// Leases: the server keeps the shown comparison for this page for 60 s. The page renews it while it is visible
// and its labeler active, and gives it back when hidden or closed, so nobody who walks away holds up the queue.
// A held-down key labels once (auto-repeat is ignored), and no answer is sent before the item has been on screen
// for the server's min_read_seconds (the server refuses earlier ones too). The tab keeps its session across
// reloads, so undo still reaches the last label; with an invite link the name is the invite's and undo follows the
// person. Labelers are never shown agreement: it would tell them whether they matched the others.
"use strict";

const HEARTBEAT_MS = 20_000; // well inside the server's 60 s lease
const POLL_MS = 10_000; // an empty or waiting queue asks again this often
const IDLE_MS = 5 * 60_000; // no key, tap or scroll for this long: give the comparison back to the queue
const CHOSEN_MS = 350; // the chosen story stays highlighted this long before the next item replaces it
const VIEWS = ["token-form", "name-form", "guidelines", "task", "empty", "paused"];
const NAME_KEY = "wprlhf-labeler", TOKEN_KEY = "wprlhf-token", SEEN_KEY = "wprlhf-guidelines-seen";
const SESSION_KEY = "wprlhf-session"; // sessionStorage: this tab's {session, labeler}, kept across reloads
const BAD_TOKEN = "That access code was not accepted. Check the link you were given, or ask the person who sent it.";

const state = {
  token: null, labeler: null, session: null, current: null, busy: false, view: null, instructions: null,
  pollTimer: null, lastActivity: Date.now(), shownAt: 0, minReadMs: 0, invited: false,
};
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const withSession = (body = {}) => ({ session: state.session, ...body });

// keepalive: a release sent while the page closes still reaches the server (and, unlike sendBeacon, can carry
// the token and the JSON content type the server requires of every state change).
async function api(method, path, body, keepalive = false) {
  const headers = {};
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, keepalive, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) { // the browser's own words ("Failed to fetch") say nothing about what to do
    throw new Error(`Could not reach the labeling server (${error.message}); nothing was saved. ` +
      "Check the connection and try again.");
  }
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

// Exactly one of the page's parts shows at a time.
function view(name) {
  state.view = name;
  for (const id of VIEWS) $(id).hidden = id !== name;
  const asking = name === "token-form" || name === "name-form";
  $("who").hidden = !state.session || asking;
  $("actions").hidden = name !== "task";
  $("change-name").hidden = state.invited; // the invite's name is the person's
  $("show-guidelines").hidden = !state.instructions || !state.session || asking || name === "guidelines";
  if (name !== "empty") clearTimeout(state.pollTimer);
}

function showProgress(stats) {
  if (!stats) return;
  let mine = "";
  if (stats.mine !== undefined) { // skips are not answers, so they get their own count
    mine = ` · you: ${stats.mine} answered` + (stats.my_skips ? `, ${stats.my_skips} skipped` : "") +
      `, ${stats.left_for_me} left` + (stats.held_by_others ? ` (+${stats.held_by_others} on others' screens)` : "");
  }
  $("progress").textContent = `done ${stats.done} / queued ${stats.queued}${mine}`;
}

// ------------------------------------------------------------------------------------------ showing an item

function responseCard(text, i) {
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
  body.dir = "auto"; // Arabic or Hebrew text runs right to left, whatever the page's language
  body.tabIndex = 0; // scrollable with the keyboard too
  // A policy that ends its turn at once writes nothing; say so rather than show a blank box.
  const empty = !text.trim();
  body.textContent = empty ? "(empty response)" : text;
  body.classList.toggle("empty", empty);
  card.append(head, body);
  return card;
}

function show(comparison, stats) {
  state.current = comparison;
  if (!comparison) return showEmpty(stats);
  view("task");
  state.shownAt = performance.now();
  $("prompt").textContent = comparison.prompt;
  $("responses").replaceChildren(...comparison.responses.map(responseCard));
  // On a phone the stories stack and the page scrolls: each item starts at its top, not where the last one ended.
  window.scrollTo(0, 0);
  document.querySelectorAll(".response .text").forEach((box) => { box.scrollTop = 0; });
}

function showEmpty(stats) {
  view("empty");
  const held = stats ? stats.held_by_others : 0;
  $("empty-text").textContent = held > 0
    ? `Waiting: ${held} comparison${held === 1 ? " is" : "s are"} open on other labelers' screens. Any they ` +
      "leave come back here; this page checks every 10 seconds."
    : "Nothing is left for you to label right now. Thank you! This page checks for new comparisons every 10 seconds.";
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(poll, POLL_MS);
}

function poll() {
  if (state.view !== "empty") return;
  state.pollTimer = setTimeout(poll, POLL_MS); // keeps polling even if this check fails (a server restarting)
  if (document.visibilityState === "visible") run(loadNext);
}

async function loadNext() {
  const data = await api("POST", "/api/next", withSession());
  showProgress(data.stats);
  show(data.comparison, data.stats);
}

// ------------------------------------------------------------------------------------------ answering

// One request at a time: a double key press can't send two labels (the server would refuse the second anyway).
async function run(action) {
  if (state.busy) return;
  state.busy = true;
  document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    await action();
  } catch (error) {
    await recover(error);
  } finally {
    state.busy = false;
    document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  }
}

async function recover(error) {
  if (error.status === 401) return askToken(BAD_TOKEN);
  if (error.status === 403 && state.session && /session/.test(error.message)) {
    // expired, or replaced by a newer page of this person's: open a fresh one and carry on
    sessionStorage.removeItem(SESSION_KEY);
    state.session = null;
    say("Your session had expired; continuing in a new one.");
    return openSession(state.labeler);
  }
  say(error.message, true);
  // 409: someone else filled this comparison or it was already answered; 404: it is gone. Move on.
  if ((error.status === 409 || error.status === 404) && state.session) {
    await loadNext().catch((e) => say(e.message, true));
  }
}

// A moment to see which story counted before the next item replaces it.
async function highlight(choice) {
  if (choice === "skip") return;
  document.querySelectorAll(".response").forEach((card, i) => {
    if (choice === "tie" || choice === i) card.classList.add("chosen");
  });
  await sleep(CHOSEN_MS);
}

function choose(choice) {
  if (!state.current || state.view !== "task") return;
  const comparison = state.current;
  if (typeof choice === "number" && choice >= comparison.responses.length) return;
  if (performance.now() - state.shownAt < state.minReadMs) {
    say(`Read the stories first: answers count after ${state.minReadMs / 1000} s on screen.`);
    return;
  }
  run(async () => {
    const data = await api("POST", "/api/label", withSession({ comparison_id: comparison.id, choice }));
    showProgress(data.stats);
    say(typeof choice === "number" ? `Saved: story ${choice + 1} is best.` : `Saved: ${choice}.`);
    await highlight(choice);
    await loadNext();
  });
}

function undo() {
  if (!state.session) return;
  run(async () => {
    const data = await api("POST", "/api/undo", withSession());
    showProgress(data.stats);
    if (data.comparison) {
      show(data.comparison, data.stats);
      say("Undone: choose again.");
    } else {
      say("Nothing to undo.");
    }
  });
}

// ------------------------------------------------------------------------------------------ leases

function release() { // fire and forget: the page may be closing
  if (state.session) api("POST", "/api/release", withSession(), true).catch(() => {});
}

async function keepLease() {
  const id = state.current.id;
  const data = await api("POST", "/api/renew", withSession({ comparison_id: id }));
  if (data.held || !state.current || state.current.id !== id) return;
  state.current = null; // someone else took it while this page was away
  if (state.view === "task") {
    say("That comparison went to someone else while you were away; here is the next one.");
    run(loadNext);
  }
}

function heartbeat() {
  if (!state.current || state.busy || document.visibilityState !== "visible") return;
  if (state.view === "task" && Date.now() - state.lastActivity > IDLE_MS) return pause();
  if (state.view === "task" || state.view === "guidelines") keepLease().catch((e) => say(e.message, true));
}

function pause() {
  release();
  view("paused");
}

// Back on the page: keep the same comparison if it is still ours, else show the next.
function resume() {
  state.lastActivity = Date.now();
  run(async () => {
    const id = state.current && state.current.id;
    if (id && (await api("POST", "/api/renew", withSession({ comparison_id: id }))).held) view("task");
    else await loadNext();
  });
}

// ------------------------------------------------------------------------------------------ guidelines

// A tiny Markdown subset (#-headings, -, * or 1. list items, paragraphs, **bold**) built from elements and Text
// nodes: the file can't add markup, and anything else shows as typed.
function inline(tag, text) {
  const node = document.createElement(tag);
  node.dir = "auto"; // Hebrew or Arabic guidelines run right to left, each paragraph by its own first letters
  text.split(/\*\*(.+?)\*\*/).forEach((part, i) => {
    if (i % 2 === 0) { node.append(part); return; }
    const strong = document.createElement("strong");
    strong.textContent = part;
    node.append(strong);
  });
  return node;
}

function renderGuidelines(text) {
  const blocks = [];
  let paragraph = null, list = null;
  for (const line of text.replace(/\r\n?/g, "\n").split("\n")) {
    const heading = /^(#{1,3})\s+(.*)$/.exec(line);
    const item = /^\s*([-*+]|\d+[.)])\s+(.*)$/.exec(line);
    if (!line.trim()) {
      paragraph = list = null;
    } else if (heading) {
      blocks.push(inline(`h${heading[1].length + 2}`, heading[2]));
      paragraph = list = null;
    } else if (item) {
      const tag = /\d/.test(item[1]) ? "ol" : "ul";
      if (!list || list.tagName.toLowerCase() !== tag) {
        blocks.push(list = document.createElement(tag));
        list.dir = "auto";
      }
      list.append(inline("li", item[2]));
      paragraph = null;
    } else if (paragraph) {
      paragraph.append("\n", ...inline("span", line).childNodes); // kept as a line break (white-space: pre-line)
    } else {
      blocks.push(paragraph = inline("p", line));
      list = null;
    }
  }
  $("guidelines-text").replaceChildren(...blocks);
}

function showGuidelines(first) {
  $("guidelines-close").textContent = first ? "Start labelling" : "Back to labelling";
  view("guidelines");
}

function closeGuidelines() {
  sessionStorage.setItem(SEEN_KEY, "1");
  if (state.current) view("task");
  else run(loadNext);
}

// ------------------------------------------------------------------------------------------ starting

function askToken(message) {
  view("token-form");
  say(message || "");
  $("token-input").value = "";
  $("token-input").focus();
}

function tokenFrom(text) { // the whole link, or the code alone
  try {
    const url = new URL(text.trim());
    if (url.searchParams.has("token")) return url.searchParams.get("token");
  } catch (e) { /* not a link: the code itself */ }
  return text.trim();
}

function askName() {
  view("name-form");
  $("name-input").value = state.labeler || "";
  $("name-input").focus();
}

// Each tab (and each name change) gets its own session: labels, leases and undo belong to it. A reload keeps the
// tab's session, so its leased item and its undo survive; a session the server no longer knows is replaced.
async function openSession(name) {
  const kept = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
  if (kept && kept.labeler === name) {
    state.session = kept.session;
  } else {
    release(); // a name change: the old session's comparison goes back to the queue
    const data = await api("POST", "/api/session", state.invited ? {} : { labeler: name });
    state.session = data.session;
    name = data.labeler;
    sessionStorage.setItem(SESSION_KEY, JSON.stringify({ session: data.session, labeler: name }));
  }
  Object.assign(state, { labeler: name, current: null });
  if (!state.invited) localStorage.setItem(NAME_KEY, name);
  $("labeler-name").textContent = name;
  say("");
  if (state.instructions && !sessionStorage.getItem(SEEN_KEY)) showGuidelines(true);
  else await loadNext();
}

function start(name) {
  if (document.activeElement) document.activeElement.blur(); // a hidden form field must not keep the keys
  run(() => openSession(name));
}

async function boot() {
  let me;
  try {
    me = await api("GET", "/api/me");
    if (me.role === "lead") return location.replace("/lead"); // the lead's link opens the lead's view
    state.instructions = (await api("GET", "/api/instructions")).instructions;
  } catch (error) {
    if (error.status === 401) askToken(state.token ? BAD_TOKEN : "");
    else say(error.message, true);
    return;
  }
  state.minReadMs = 1000 * me.min_read_seconds;
  state.invited = me.role === "labeler";
  if (state.instructions) renderGuidelines(state.instructions);
  const saved = state.invited ? me.labeler : localStorage.getItem(NAME_KEY);
  if (saved) start(saved); else askName();
}

document.addEventListener("keydown", (event) => {
  // Keys act only on a shown comparison (or undo from the empty queue): in forms they type, over guidelines they don't.
  if (event.ctrlKey || event.metaKey || event.altKey || (state.view !== "task" && state.view !== "empty")) return;
  if (event.repeat) { // a key held down: one answer, not one per auto-repeat
    event.preventDefault();
    return;
  }
  const key = event.key.toLowerCase();
  const action = key === "u" || key === "backspace" ? undo
    : state.view !== "task" ? null
    : key.length === 1 && key >= "1" && key <= "4" ? () => choose(Number(key) - 1)
    : key === "t" ? () => choose("tie")
    : key === "s" ? () => choose("skip")
    : null;
  if (!action) return;
  event.preventDefault();
  action();
});

for (const type of ["keydown", "pointerdown", "wheel", "touchstart", "scroll"]) {
  document.addEventListener(type, () => { state.lastActivity = Date.now(); }, { capture: true, passive: true });
}

document.addEventListener("visibilitychange", () => {
  if (!state.session) return;
  if (document.visibilityState === "hidden") release();
  else if (state.view === "task" || state.view === "empty") resume();
});
window.addEventListener("pagehide", release);

window.addEventListener("DOMContentLoaded", () => {
  // The token arrives once in the URL; keep it for this tab and take it out of the address bar and history.
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    history.replaceState(null, "", location.pathname);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY);
  document.querySelectorAll("[data-choice]").forEach((button) => {
    button.addEventListener("click", () => choose(button.dataset.choice));
  });
  $("undo").addEventListener("click", undo);
  $("undo-empty").addEventListener("click", undo);
  $("check-now").addEventListener("click", () => run(loadNext));
  $("resume").addEventListener("click", resume);
  $("change-name").addEventListener("click", askName);
  $("show-guidelines").addEventListener("click", () => showGuidelines(false));
  $("guidelines-close").addEventListener("click", closeGuidelines);
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name-input").value.trim();
    if (name) start(name);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = tokenFrom($("token-input").value);
    if (!token) return;
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    say("");
    boot();
  });
  setInterval(heartbeat, HEARTBEAT_MS);
  boot();
});
