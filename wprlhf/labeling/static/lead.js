// The lead's view: progress and speed per labeler, agreement (Cohen's kappa per pair, Fleiss' kappa overall, raw
// agreement with counts), items leased / skipped / stuck, and the review queue where the lead records an answer to
// each disagreement. Text reaches the page only through textContent, as on the labeling page.
"use strict";

const TOKEN_KEY = "wprlhf-lead-token";
const REFRESH_MS = 30_000;
const $ = (id) => document.getElementById(id);
let token = null;
let readOnly = false; // a file written by `wprlhf label status --html`: the report is embedded, nothing is sent

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  return data;
}

const number = (x, digits = 3) => (x === null || x === undefined ? "n/a" : x.toFixed(digits));
const choiceText = (choice) => (choice === "tie" ? "tie" : `story ${choice + 1}`);

function table(headings, rows) {
  const node = document.createElement("table");
  const head = node.createTHead().insertRow();
  for (const text of headings) head.append(Object.assign(document.createElement("th"), { textContent: text }));
  const body = node.createTBody();
  for (const row of rows) {
    const line = body.insertRow();
    for (const cell of row) {
      const td = line.insertCell();
      td.dir = "auto";
      td.textContent = String(cell);
    }
  }
  return node;
}

function reviewCard(item) {
  const card = document.createElement("article");
  card.className = "review";
  card.dataset.comparison = String(item.comparison_id);
  const prompt = Object.assign(document.createElement("p"), { className: "prompt", dir: "auto" });
  prompt.textContent = `#${item.comparison_id}: ${item.prompt}`;
  const stories = document.createElement("ol");
  for (const text of item.responses) stories.append(Object.assign(document.createElement("li"), { textContent: text, dir: "auto" }));
  const answers = Object.entries(item.answers).map(([who, choice]) => `${who}: ${choiceText(choice)}`).join(" · ");
  const given = Object.assign(document.createElement("p"), { className: "answers", textContent: answers });
  const decided = Object.assign(document.createElement("p"), { className: "decided" });
  decided.textContent = item.adjudication
    ? `Adjudicated by ${item.adjudication.lead}: ${choiceText(item.adjudication.choice)}` : "Not adjudicated yet";
  card.append(prompt, stories, given, decided);
  if (readOnly) return card;
  const buttons = document.createElement("p");
  const choices = [...item.responses.map((_, i) => i), "tie"];
  for (const choice of choices) {
    const button = Object.assign(document.createElement("button"), { type: "button", textContent: choiceText(choice) });
    button.dataset.choice = String(choice);
    button.addEventListener("click", () => adjudicate(item.comparison_id, choice));
    buttons.append(button);
  }
  card.append(buttons);
  return card;
}

function render(report) {
  const s = report.stats;
  $("progress").textContent = `done ${s.done} / queued ${s.queued} · ${s.labels} answers, ${s.skips} skips`;
  $("labelers").replaceChildren(table(
    ["labeler", "answers", "skips", "sessions", "median s on screen", "labels per hour"],
    report.labelers.map((r) => [r.labeler, r.answers, r.skips, r.sessions, number(r.median_seconds, 1), number(r.per_hour, 1)]),
  ));
  const o = report.agreement.overall;
  $("overall").textContent = o.items
    ? `Overall: Fleiss' kappa ${number(o.kappa)}, raw agreement ${number(o.raw)} (${o.agree} of ${o.pairs} pairs of answers) over ${o.items} comparisons labeled by more than one person.`
    : "Overall: no comparison has answers from two people yet.";
  $("pairs").replaceChildren(table(
    ["labeler", "labeler", "shared items", "agree", "raw agreement", "Cohen's kappa"],
    report.agreement.pairs.map((p) => [p.a, p.b, p.items, p.agree, number(p.raw), number(p.kappa)]),
  ));
  const ids = (list) => (list.length ? list.join(", ") : "none");
  $("items").textContent = `Leased now: ${ids(report.leased.map((l) => `#${l.comparison_id} (${l.labeler})`))}. ` +
    `Skipped: ${ids(report.skipped.map((k) => `#${k.comparison_id} ×${k.skips}`))}. ` +
    `Stuck (too few labelers left to finish): ${ids(report.stuck.map((c) => `#${c}`))}.`;
  $("review").replaceChildren(...(report.review.length ? report.review.map(reviewCard)
    : [Object.assign(document.createElement("p"), { textContent: "No disagreements." })]));
  $("report").hidden = false;
}

async function load() {
  try {
    render(await api("GET", "/api/lead/report"));
    $("message").textContent = "";
  } catch (error) {
    $("message").textContent = error.message;
  }
}

async function adjudicate(comparisonId, choice) {
  try {
    await api("POST", "/api/lead/adjudicate", { comparison_id: comparisonId, choice });
    $("message").textContent = `Saved: #${comparisonId} is ${choiceText(choice)}.`;
  } catch (error) {
    $("message").textContent = error.message;
  }
  await load();
}

window.addEventListener("DOMContentLoaded", () => {
  const embedded = document.getElementById("report-data");
  if (embedded) {
    readOnly = true;
    $("refresh").hidden = true;
    render(JSON.parse(embedded.textContent));
    return;
  }
  const params = new URLSearchParams(location.search);
  if (params.has("token")) { // like the labeling page: keep it for this tab, out of the address bar and history
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    history.replaceState(null, "", location.pathname);
  }
  token = sessionStorage.getItem(TOKEN_KEY) || sessionStorage.getItem("wprlhf-token");
  $("refresh").addEventListener("click", load);
  setInterval(load, REFRESH_MS);
  load();
});
