// The node's web page: the network and jobs, live over Server-Sent Events; a job's page; a chat box.
// It reads only the node's /ui/api routes.  No framework, no build step.
"use strict";

const $ = (selector) => document.querySelector(selector);
const FINAL = new Set(["succeeded", "failed", "timed_out", "cancelled"]);
const view = { session: null, network: null, jobs: [], jobStream: null, openJob: null, chatting: false };

// --- small helpers -----------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(value < 10 ? 2 : 1)} s`;
}

function ago(timestamp) {
  const s = Math.max(0, Date.now() / 1000 - timestamp);
  return s < 60 ? `${Math.round(s)} s ago` : `${Math.round(s / 60)} min ago`;
}

function clock(timestamp) {
  return new Date(timestamp * 1000).toLocaleTimeString();
}

function statusBadge(status) {
  return el("span", { class: `status ${status}` }, status.replace("_", " "));
}

async function call(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.method && options.method !== "GET") headers["X-CSRF-Token"] = view.session.csrf_token;
  const response = await fetch(path, { credentials: "same-origin", ...options, headers });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  return body;
}

function replaceRows(table, rows) {
  table.querySelector("tbody").replaceChildren(...rows);
}

// --- the overview: network and jobs, live ----------------------------------------------------------

function followLive() {
  const source = new EventSource("/ui/api/live");
  source.addEventListener("network", (event) => { view.network = JSON.parse(event.data); renderNetwork(); });
  source.addEventListener("jobs", (event) => { view.jobs = JSON.parse(event.data).jobs; renderJobs(); });
  source.onopen = () => setConnection("live", true);
  // A stream that fails to open (a session that ended) is not tried again by the browser.
  source.onerror = () => setConnection(source.readyState === EventSource.CLOSED ? "disconnected: reload the page" : "reconnecting…", false);
}

function setConnection(text, live) {
  const badge = $("#connection");
  badge.textContent = text;
  badge.classList.toggle("live", live);
}

function renderNetwork() {
  const n = view.network;
  $("#node-roles").replaceChildren(...(n.roles.length ? n.roles : ["unconfigured"]).map((r) => el("span", { class: "role" }, r)));
  const router = n.roles.includes("router") ? "This node is the router."
    : n.router ? `Router: ${n.router}${n.router_error ? ` (unreachable: ${n.router_error})` : ""}` : "No router set.";
  const own = n.models.length ? ` Serves ${n.models.join(", ")} with its own LLM (capacity ${n.capacity}).` : "";
  $("#router-line").textContent = router + own;
  $("#router-line").classList.toggle("error", Boolean(n.router_error));

  replaceRows($("#nodes"), n.nodes.map((node) => el("tr", { dataset: { node: node.name } },
    el("td", {}, node.name, node.name === n.node ? el("span", { class: "muted" }, " (this node)") : null),
    el("td", {}, node.roles.length ? node.roles.join(", ") : el("span", { class: "muted" }, "peer")),
  )));

  const now = Date.now() / 1000;
  replaceRows($("#drivers"), n.drivers.length ? n.drivers.map((d) => el("tr", { dataset: { driver: d.node } },
    el("td", {}, d.node, d.is_public ? null : el("span", { class: "muted" }, " (private)")),
    el("td", { class: "models" }, d.models.join(", ")),
    el("td", { class: "load" },
      el("span", { class: "figure" }, `${d.load}/${d.capacity}`),
      el("meter", { min: 0, max: d.capacity, value: d.load })),
    el("td", { class: "seen", dataset: { at: d.last_seen } }, ago(d.last_seen)),
    el("td", {}, d.cooled_down_until && d.cooled_down_until > now ? `${Math.round(d.cooled_down_until - now)} s more` : "–"),
  )) : [el("tr", {}, el("td", { colspan: 5, class: "muted" }, n.router_error ? "unknown" : "none"))]);

  const queues = Object.entries(n.queues);
  replaceRows($("#queues"), queues.length
    ? queues.map(([model, waiting]) => el("tr", { dataset: { model } }, el("td", {}, model), el("td", { class: "num" }, waiting)))
    : [el("tr", {}, el("td", { colspan: 2, class: "muted" }, "no job waits"))]);

  const select = $("#chat-model");
  const chosen = select.value;
  const models = n.reachable_models;
  if ([...select.options].map((o) => o.value).join() !== models.join()) {
    select.replaceChildren(...models.map((m) => el("option", { value: m }, m)));
    if (models.includes(chosen)) select.value = chosen;
  }
  updateSendButton();
}

function updateSendButton() {
  $("#chat-send").disabled = view.chatting || !view.network || view.network.reachable_models.length === 0;
}

function duration(job) {
  const end = job.finished_at ?? Date.now() / 1000;
  return end - job.created_at;
}

function renderJobs() {
  $("#no-jobs").hidden = view.jobs.length > 0;
  replaceRows($("#jobs"), view.jobs.map((job) => {
    const row = el("tr", { class: "job", dataset: { jobId: job.job_id, status: job.status } },
      el("td", {}, el("a", { href: `#/jobs/${job.job_id}` }, el("code", {}, job.job_id.slice(0, 8)))),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, job.model),
      el("td", { class: "client" }, job.client),
      el("td", {}, job.driver || "–"),
      el("td", { class: "num" }, job.first_token_at ? seconds(job.first_token_at - job.created_at) : "–"),
      el("td", { class: "num duration" }, seconds(duration(job))),
      el("td", { class: "num tokens" }, job.tokens ?? el("span", { class: "muted", title: "updates so far" }, `${job.chunks}`)),
      el("td", { class: "muted" }, clock(job.created_at)),
    );
    row.addEventListener("click", (event) => { if (!event.target.closest("a")) location.hash = `#/jobs/${job.job_id}`; });
    return row;
  }));
}

function tick() {
  for (const cell of document.querySelectorAll("#drivers .seen")) cell.textContent = ago(Number(cell.dataset.at));
  for (const row of document.querySelectorAll("#jobs tr.job")) {
    const job = view.jobs.find((j) => j.job_id === row.dataset.jobId);
    if (job && !job.finished_at) row.querySelector(".duration").textContent = seconds(duration(job));
  }
}

// --- a job's page --------------------------------------------------------------------------------

function route() {
  const match = location.hash.match(/^#\/jobs\/([0-9a-f]+)$/);
  closeJob();
  $("#overview").hidden = Boolean(match);
  $("#job-view").hidden = !match;
  if (match) openJob(match[1]);
}

function closeJob() {
  if (view.jobStream) view.jobStream.close();
  view.jobStream = null;
  view.openJob = null;
}

async function openJob(jobId) {
  view.openJob = jobId;
  $("#job-id").textContent = jobId;
  $("#job-text").replaceChildren();
  $("#job-error").hidden = true;
  await showRecord(jobId);
  const stream = new EventSource(`/ui/api/jobs/${jobId}/events`);
  view.jobStream = stream;
  stream.addEventListener("job_update", (event) => {
    const update = JSON.parse(event.data);
    if (update.delta) {
      const shade = $("#job-text").childElementCount % 2 ? "odd" : "even";
      $("#job-text").append(el("span", { class: `chunk ${shade}`, title: `update ${update.seq}` }, update.delta));
    }
    if (update.is_final) {
      stream.close();
      showRecord(jobId);
    } else if ($("#job-status").textContent !== "running") {
      showRecord(jobId);  // its first token: the driver and the time to it are known now
    }
  });
}

async function showRecord(jobId) {
  let record;
  try {
    record = await call(`/ui/api/jobs/${jobId}`);
  } catch (error) {
    $("#job-error").textContent = error.message;
    $("#job-error").hidden = false;
    return;
  }
  if (view.openJob !== jobId) return;
  $("#job-status").textContent = record.status;
  $("#job-status").className = `status ${record.status}`;
  $("#job-cancel").hidden = FINAL.has(record.status);
  const usage = record.usage ? `${record.usage.prompt_tokens} in, ${record.usage.completion_tokens} out` : "–";
  const facts = [["Model", record.model], ["Client", record.client], ["Router", record.router || "– (served here)"],
    ["Driver", record.driver || "–"], ["Finish reason", record.finish_reason || "–"], ["Tokens", usage]];
  if (record.queue_position !== null && record.queue_position !== undefined) facts.push(["Place in queue", record.queue_position]);
  $("#job-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  const start = record.created_at;
  const since = (t) => `+${seconds(t - start)}`;
  const steps = [[clock(start), `submitted by ${record.client}` + (record.router ? `, routed by ${record.router}` : ", served here")]];
  if (record.first_token_at) steps.push([since(record.first_token_at), `first token${record.driver ? ` from ${record.driver}` : ""}`]);
  if (record.finished_at) steps.push([since(record.finished_at), `${record.status.replace("_", " ")}${record.finish_reason ? ` (${record.finish_reason})` : ""}`]);
  else steps.push(["", `${record.status}…, deadline ${clock(record.deadline)}`]);
  $("#job-timeline").replaceChildren(...steps.map(([when, what]) => el("li", {}, el("time", {}, when), " ", what)));
  if (record.error) {
    $("#job-error").textContent = record.error;
    $("#job-error").hidden = false;
  }
}

async function cancelOpenJob() {
  try {
    await call(`/ui/api/jobs/${view.openJob}`, { method: "DELETE" });
  } catch (error) {
    $("#job-error").textContent = error.message;
    $("#job-error").hidden = false;
  }
}

// --- the chat box --------------------------------------------------------------------------------

const conversation = [];

async function sendChat(event) {
  event.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || $("#chat-send").disabled) return;
  $("#chat-error").hidden = true;
  conversation.push({ role: "user", content: text });
  $("#chat-hint")?.remove();
  $("#chat-log").append(el("div", { class: "message user" }, text));
  input.value = "";
  const answer = el("div", { class: "message assistant streaming" });
  const meta = el("div", { class: "message-meta muted" }, "sending…");
  $("#chat-log").append(answer, meta);
  view.chatting = true;
  updateSendButton();
  try {
    const created = await call("/ui/api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("#chat-model").value, messages: conversation }),
    });
    meta.replaceChildren(el("a", { href: `#/jobs/${created.job_id}` }, `job ${created.job_id.slice(0, 8)}`), el("span", {}, ` · ${created.status}`));
    const final = await streamAnswer(created.job_id, answer, meta);
    if (final.status === "succeeded") conversation.push({ role: "assistant", content: answer.textContent });
    else conversation.pop();
  } catch (error) {
    conversation.pop();
    answer.remove();
    meta.remove();
    $("#chat-error").textContent = error.message;
    $("#chat-error").hidden = false;
  } finally {
    view.chatting = false;
    updateSendButton();
  }
}

function streamAnswer(jobId, answer, meta) {
  return new Promise((resolve) => {
    const stream = new EventSource(`/ui/api/jobs/${jobId}/events`);
    stream.addEventListener("job_update", (event) => {
      const update = JSON.parse(event.data);
      if (update.delta) answer.append(update.delta);
      if (!update.is_final) {
        meta.lastChild.textContent = ` · streaming${update.driver ? ` from ${update.driver}` : ""}`;
        return;
      }
      stream.close();
      answer.classList.remove("streaming");
      const link = el("a", { href: `#/jobs/${jobId}` }, `job ${jobId.slice(0, 8)}`);
      meta.replaceChildren(link, el("span", {}, ` · ${update.status.replace("_", " ")}${update.driver ? ` · ${update.driver}` : ""}`));
      if (update.error) answer.append(el("span", { class: "error" }, update.error));
      resolve(update);
    });
    stream.onerror = () => {
      if (stream.readyState !== EventSource.CLOSED) return;  // the browser reconnects, with Last-Event-ID
      answer.classList.remove("streaming");
      meta.lastChild.textContent = " · the answer's stream failed: reload the page";
      resolve({ status: "lost" });
    };
  });
}

function sendOnEnter(event) {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("#chat-form").requestSubmit();
  }
}

// --- start ---------------------------------------------------------------------------------------

async function start() {
  view.session = await call("/ui/api/session");
  $("#node-name").textContent = view.session.node;
  document.title = `${view.session.node} · llm-provider`;
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-input").addEventListener("keydown", sendOnEnter);
  $("#job-cancel").addEventListener("click", cancelOpenJob);
  window.addEventListener("hashchange", route);
  route();
  followLive();
  setInterval(tick, 1000);
}

start().catch((error) => {
  setConnection(`not connected: ${error.message}`, false);
});
