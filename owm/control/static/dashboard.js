// The owm dashboard: polls the daemon's JSON API and /metrics once a second and draws every
// volume, its generation chain as a timeline, and throughput/latency sparklines. Actions
// (preserve, cutover, release) are plain API calls carrying the control token when one was
// given; the metrics listener refuses them without it. No framework, no build step.
"use strict";

const POLL_MS = 1000;
const HISTORY = 60; // samples kept per sparkline
const history = new Map(); // volume -> [{t, read, write, latSum, latCount}]
const cards = new Map(); // volume -> {root, key}
let token = sessionStorage.getItem("owm-token") || "";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "onclick") node.addEventListener("click", value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function size(bytes) {
  const units = ["B", "K", "M", "G", "T", "P"];
  let n = Number(bytes) || 0;
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + units[i];
}

function seconds(s) {
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function say(text, ok = false) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = ok ? "ok" : "";
}

// -- metrics ---------------------------------------------------------------------------------

function parseMetrics(text) {
  // {volume: {read, write, latSum, latCount}} from the Prometheus text format.
  const out = {};
  const line = /^(owm_volume_request_bytes_total|owm_volume_request_seconds_sum|owm_volume_request_seconds_count)\{([^}]*)\} (\S+)$/;
  for (const raw of text.split("\n")) {
    const m = line.exec(raw);
    if (!m) continue;
    const labels = {};
    for (const pair of m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    const entry = (out[labels.volume] ||= { read: 0, write: 0, latSum: 0, latCount: 0 });
    const value = Number(m[3]);
    if (m[1] === "owm_volume_request_bytes_total") {
      if (labels.op === "read" || labels.op === "image_read") entry.read += value;
      else if (labels.op === "write" || labels.op === "zero") entry.write += value;
    } else if (labels.op !== "flush") {
      if (m[1].endsWith("_sum")) entry.latSum += value; else entry.latCount += value;
    }
  }
  return out;
}

function remember(counters, now) {
  for (const [volume, c] of Object.entries(counters)) {
    const samples = history.get(volume) || [];
    samples.push({ t: now, ...c });
    while (samples.length > HISTORY + 1) samples.shift();
    history.set(volume, samples);
  }
}

function rates(volume) {
  // Per interval: bytes/s read and written, mean latency in ms.
  const samples = history.get(volume) || [];
  const read = [], write = [], latency = [];
  for (let i = 1; i < samples.length; i += 1) {
    const a = samples[i - 1], b = samples[i];
    const dt = Math.max(0.001, (b.t - a.t) / 1000);
    read.push(Math.max(0, b.read - a.read) / dt);
    write.push(Math.max(0, b.write - a.write) / dt);
    const n = b.latCount - a.latCount;
    latency.push(n > 0 ? ((b.latSum - a.latSum) / n) * 1000 : 0);
  }
  return { read, write, latency };
}

function sparkline(title, series, format) {
  const width = 180, height = 36;
  const box = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}` });
  const top = Math.max(1e-9, ...series.flatMap(([, values]) => values));
  for (const [cls, values] of series) {
    const step = width / Math.max(1, HISTORY - 1);
    const offset = width - step * (values.length - 1);
    const points = values.map((v, i) =>
      `${(offset + i * step).toFixed(1)},${(height - 2 - (v / top) * (height - 4)).toFixed(1)}`);
    box.append(svg("polyline", { class: cls, points: points.join(" ") }));
  }
  const last = series.map(([, values]) => format(values.length ? values[values.length - 1] : 0));
  return el("div", { class: "spark" }, `${title}: ${last.join(" / ")}`, box);
}

// -- volumes ---------------------------------------------------------------------------------

async function act(method, path, body, what) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const response = await fetch(path, { method, headers, body: JSON.stringify(body || {}) });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      say(answer.error || `${what} was refused (${response.status})`);
    } else {
      say(`${what}: done${answer.image ? ` (${answer.image})` : ""}`, true);
    }
  } catch (error) {
    say(`${what} failed: ${error}`);
  }
  poll();
}

function timeline(volume, now) {
  // Two lanes over the same time axis: the generation chain (generation k from the preserve
  // before it to its own preserve, coloured by its image's state; the live one in blue) and,
  // below it, each image's drain (from its preserve until no session held it any more).
  const created = Date.parse(volume.created_at) || now;
  const images = volume.images || [];
  const start = Math.min(created, ...images.map((i) => Date.parse(i.preserved_at) || now));
  const span = Math.max(1000, now - start);
  const pct = (t) => Math.min(100, Math.max(0, ((t - start) / span) * 100));
  const place = (seg, from, to) => {
    seg.style.left = `${pct(from).toFixed(2)}%`;
    seg.style.width = `${Math.max(0.3, pct(to) - pct(from)).toFixed(2)}%`;
    return seg;
  };
  const chain = el("div", { class: "timeline chain", title: "generation chain" });
  const drains = el("div", { class: "timeline drains", title: "drain of each image" });
  let from = created;
  for (const image of images) {
    const preserved = Date.parse(image.preserved_at) || now;
    const drained = image.drained_at ? Date.parse(image.drained_at) : now;
    const label = `${image.name} ${image.state}`;
    chain.append(place(el("div", { class: `seg ${image.state}`, title: label },
      `gen ${image.generation}`), from, preserved));
    drains.append(place(el("div", {
      class: `seg ${image.state}`, "data-image": image.name,
      title: `${label}, ${image.consistency}: drained in ${seconds((drained - preserved) / 1000)}`,
    }, image.state === "draining" ? `${image.name} draining` : image.name), preserved, drained));
    from = preserved;
  }
  chain.append(place(el("div", { class: "seg live", title: "live generation" },
    `gen ${volume.live_generation} (live)`), from, now));
  return el("div", { class: "lanes" }, chain, drains);
}

function imageRow(volume, image, now) {
  const facts = [image.consistency];
  if (image.state === "draining") {
    const held = (now - (Date.parse(image.preserved_at) || now)) / 1000;
    facts.push(`${image.sessions_left} session(s) holding it for ${seconds(held)}`);
  }
  if (image.unclean_sessions) facts.push(`${image.unclean_sessions} unclean`);
  if (image.broken_reason) facts.push(image.broken_reason);
  facts.push(size(image.bytes_on_disk));
  const row = el("li", { class: "image", "data-image": image.name, "data-state": image.state },
    el("strong", {}, image.name),
    el("span", { class: `badge ${image.state}` }, image.state),
    el("span", { class: "dim" }, facts.join(" · ")));
  if (image.state === "draining") {
    row.append(el("button", {
      class: "cutover", "data-image": image.name, textContent: "cut over",
      onclick: () => act("POST", `/v1/images/${encodeURIComponent(image.name)}/cutover`,
        null, `cut over ${image.name}`),
    }));
  } else if (image.state !== "releasing") {
    row.append(el("button", {
      class: "release", "data-image": image.name, textContent: "release",
      onclick: () => act("POST", `/v1/images/${encodeURIComponent(image.name)}/release`,
        null, `release ${image.name}`),
    }));
  }
  return row;
}

function volumeCard(volume, now) {
  const sessions = (volume.generations || [])
    .map((g) => `gen ${g.generation}: ${g.sessions.length}`).join(", ") || "no sessions";
  const card = el("section", { class: "volume", "data-volume": volume.name },
    el("h2", {}, volume.name,
      el("span", { class: "facts" },
        `${size(volume.size)} · ${volume.method} · live generation ${volume.live_generation}` +
        ` · ${sessions} · ${size(volume.bytes_on_disk)} on disk` +
        (volume.damaged ? ` · DAMAGED: ${volume.damaged}` : "")),
      el("button", {
        class: "preserve", "data-volume": volume.name, textContent: "preserve",
        onclick: () => act("POST", `/v1/volumes/${encodeURIComponent(volume.name)}/preserve`,
          { instant: false }, `preserve ${volume.name}`),
      })),
    el("div", { class: "row sparks" }),
    timeline(volume, now),
    el("ul", { class: "images" }, ...(volume.images || []).map((i) => imageRow(volume, i, now))));
  return card;
}

function render(volumes, now) {
  const main = document.getElementById("volumes");
  const seen = new Set();
  if (!volumes.length) {
    main.replaceChildren(el("p", { class: "empty" }, "No volumes yet: owm volume create NAME --size 1G"));
    cards.clear();
    return;
  }
  main.querySelector(".empty")?.remove();
  for (const volume of volumes) {
    seen.add(volume.name);
    // Rebuild a card only when its status changed (or once a second for the draining clock).
    const draining = (volume.images || []).some((i) => i.state === "draining");
    const key = JSON.stringify(volume) + (draining ? `@${Math.floor(now / 1000)}` : "");
    let card = cards.get(volume.name);
    if (!card || card.key !== key) {
      const root = volumeCard(volume, now);
      if (card) card.root.replaceWith(root); else main.append(root);
      card = { root, key };
      cards.set(volume.name, card);
    }
    const r = rates(volume.name);
    card.root.querySelector(".sparks").replaceChildren(
      sparkline("read / write", [["read", r.read], ["write", r.write]], (v) => `${size(v)}/s`),
      sparkline("latency", [["latency", r.latency]], (v) => `${v.toFixed(2)} ms`));
  }
  for (const [name, card] of cards) {
    if (!seen.has(name)) { card.root.remove(); cards.delete(name); }
  }
}

let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  try {
    const [health, volumes, metrics] = await Promise.all([
      fetch("/v1/health").then((r) => r.json()),
      fetch("/v1/volumes").then((r) => (r.ok ? r.json() : Promise.reject(new Error(r.status)))),
      fetch("/metrics").then((r) => (r.ok ? r.text() : "")),
    ]);
    const now = Date.now();
    remember(parseMetrics(metrics), now);
    document.getElementById("daemon").textContent =
      `pool ${health.pool} · owm ${health.version} · ${health.status}` +
      (token ? " · actions enabled" : " · read-only");
    render(volumes, now);
  } catch (error) {
    document.getElementById("daemon").textContent = `cannot reach the daemon (${error})`;
  } finally {
    polling = false;
  }
}

// -- backups of the repositories given to owm serve --backup-repo ---------------------------

const REPO_POLL_EVERY = 5; // volume polls per repository poll
const PAGE = 50; // backups shown per repository page (the API pages them, newest first)
const repoOffsets = new Map(); // repository index -> offset of the page shown
const repoKeys = new Map(); // repository index -> what its panel was drawn from
let repoTick = 0;

function when(text) {
  return text ? String(text).replace("T", " ").replace(/Z$/, "") : "-";
}

function backupRow(b) {
  if (b.state === "damaged") {
    return el("tr", { "data-backup": b.id, "data-label": "damaged" },
      el("td", {}, b.id), el("td", { colSpan: 8 },
        el("span", { class: "badge damaged" }, "damaged"), ` ${b.error || ""}`));
  }
  const label = el("span", { class: `badge ${b.label}` }, b.label);
  const state = b.state === "complete" ? null : el("span", { class: `badge ${b.state}` }, b.state);
  return el("tr", { "data-backup": b.id, "data-label": b.label },
    el("td", {}, b.id),
    el("td", {}, b.volume),
    el("td", {}, b.image),
    el("td", {}, when(b.preserved_at)),
    el("td", { class: "label" }, label, state ? " " : null, state),
    el("td", { class: "num" }, size(b.size)),
    el("td", { class: "num" }, b.stored_bytes === null ? "-" : size(b.stored_bytes)),
    el("td", {}, b.incremental ? `incremental of ${b.parent || "?"}` : "full"),
    el("td", { class: "verified" }, b.verified ? "checksummed" : "unverified"));
}

function repoPanel(page) {
  const facts = [`${page.count ?? "?"} backup(s)`];
  if (page.encrypted) facts.push(page.locked ? "encrypted, locked" : "encrypted");
  const panel = el("section", { class: "repo", "data-repo": String(page.index) },
    el("h2", {}, `Backups in ${page.path}`, el("span", { class: "facts" }, facts.join(" · "))));
  if (page.error) {
    panel.append(el("p", { class: "note error" }, page.error));
    return panel;
  }
  if (page.locked) {
    panel.append(el("p", { class: "note locked" },
      `${page.note || "encrypted, no key given"}: ${page.count ?? "?"} backup(s), ` +
      "not listed (owm serve --backup-key-file FILE shows them)"));
    return panel;
  }
  const rows = page.backups || [];
  if (!rows.length) {
    panel.append(el("p", { class: "note" }, "No backups yet: owm backup NAME@N --to " + page.path));
    return panel;
  }
  const head = ["id", "volume", "image", "preserved (UTC)", "label", "size", "stored",
    "parent", "manifest"];
  panel.append(el("table", { class: "backups" },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map(backupRow))));
  if (page.count > page.limit) {
    const last = Math.min(page.count, page.offset + rows.length);
    const turn = (offset) => { repoOffsets.set(page.index, Math.max(0, offset)); pollRepos(); };
    panel.append(el("div", { class: "pager" },
      el("button", { class: "newer", textContent: "newer", disabled: page.offset === 0,
        onclick: () => turn(page.offset - PAGE) }),
      `${page.offset + 1}–${last} of ${page.count}, newest first`,
      el("button", { class: "older", textContent: "older", disabled: last >= page.count,
        onclick: () => turn(page.offset + PAGE) })));
  }
  return panel;
}

let repoPolling = false;
async function pollRepos() {
  if (repoPolling) return;
  repoPolling = true;
  const section = document.getElementById("repos");
  try {
    const answer = await fetch("/v1/repos").then((r) => (r.ok ? r.json() : { repos: [] }));
    const repos = answer.repos || [];
    section.hidden = repos.length === 0;
    const pages = await Promise.all(repos.map(async (repo) => {
      if (repo.locked || repo.error) return repo;
      const offset = repoOffsets.get(repo.index) || 0;
      const r = await fetch(`/v1/repos/${repo.index}/backups?offset=${offset}&limit=${PAGE}`);
      const body = await r.json().catch(() => ({}));
      return r.ok ? body : { ...repo, error: body.error || `listing failed (${r.status})` };
    }));
    section.querySelector(":scope > p.note.error")?.remove();
    const seen = new Set();
    for (const page of pages) {
      seen.add(page.index);
      const key = JSON.stringify(page);
      if (repoKeys.get(page.index) === key) continue;
      repoKeys.set(page.index, key);
      const panel = repoPanel(page);
      const old = section.querySelector(`section.repo[data-repo="${page.index}"]`);
      if (old) old.replaceWith(panel); else section.append(panel);
    }
    for (const old of section.querySelectorAll("section.repo")) {
      const index = Number(old.getAttribute("data-repo"));
      if (!seen.has(index)) { old.remove(); repoKeys.delete(index); }
    }
  } catch (error) {
    section.hidden = false;
    section.replaceChildren(el("p", { class: "note error" }, `cannot list backups (${error})`));
    repoKeys.clear();
  } finally {
    repoPolling = false;
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value.trim();
  if (token) sessionStorage.setItem("owm-token", token); else sessionStorage.removeItem("owm-token");
  say(token ? "control token set for this tab" : "control token cleared", true);
  poll();
});
poll();
pollRepos();
setInterval(() => {
  poll();
  repoTick = (repoTick + 1) % REPO_POLL_EVERY;
  if (repoTick === 0) pollRepos();
}, POLL_MS);
