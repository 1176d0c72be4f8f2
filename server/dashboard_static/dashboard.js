// fedmeta dashboard: polls /api/status (the Admin service's snapshot as JSON) and draws it.
// Every peer-originated string (client ids, devices, refusal messages) goes through
// textContent, never innerHTML; charts are SVG elements built with createElementNS.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
let token = sessionStorage.getItem("fedmeta-admin-token") || "";

(function tokenFromHash() {
  const m = /^#token=(.+)$/.exec(window.location.hash);
  if (m) {
    token = decodeURIComponent(m[1]);
    sessionStorage.setItem("fedmeta-admin-token", token);
    history.replaceState(null, "", window.location.pathname);  // keep the token out of the address bar
  }
})();

function $(id) { return document.getElementById(id); }
function text(id, value) { $(id).textContent = value; }
function num(v) { const n = Number(v); return Number.isFinite(n) ? n : NaN; }
function fmt(v, digits) { const n = num(v); return Number.isFinite(n) ? n.toFixed(digits) : "–"; }
function bytes(v) {
  const n = num(v);
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0, x = n;
  while (x >= 1000 && i < units.length - 1) { x /= 1000; i++; }
  return (i === 0 ? x.toFixed(0) : x.toFixed(1)) + " " + units[i];
}
function duration(s) {
  const n = num(s);
  if (!Number.isFinite(n) || n < 0) return "–";
  if (n < 90) return n.toFixed(0) + " s";
  if (n < 5400) return (n / 60).toFixed(1) + " min";
  return (n / 3600).toFixed(1) + " h";
}

function el(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}

// A line chart of [x, y] points into an SVG of viewBox 400 x 160.
function chart(svg, points, cls, xlabel) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 400, H = 160, L = 44, R = 8, T = 8, B = 22;
  const pts = points.filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}));
  svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  if (pts.length === 0) {
    const t = el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"});
    t.textContent = "no data yet";
    svg.appendChild(t);
    return;
  }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = Math.min(...pts.map(p => p[1])), y1 = Math.max(...pts.map(p => p[1]));
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const [v, y] of [[y0, sy(y0)], [(y0 + y1) / 2, sy((y0 + y1) / 2)], [y1, sy(y1)]]) {
    const t = el("text", {x: L - 4, y: y + 3, "text-anchor": "end", class: "tick"});
    t.textContent = Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3);
    svg.appendChild(t);
  }
  for (const [v, anchor] of [[x0, "start"], [x1, "end"]]) {
    const t = el("text", {x: sx(v), y: H - 6, "text-anchor": anchor, class: "tick"});
    t.textContent = String(Math.round(v));
    svg.appendChild(t);
  }
  const label = el("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "tick"});
  label.textContent = xlabel;
  svg.appendChild(label);
  const d = pts.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
  svg.appendChild(el("polyline", {points: d, class: "line " + cls}));
  if (pts.length <= 40) {
    for (const p of pts) svg.appendChild(el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: cls}));
  }
}

function row(tbody, cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c.text;
    if (c.cls) td.className = c.cls;
    tr.appendChild(td);
  }
  tbody.appendChild(tr);
}

function render(s) {
  const run = s.run || {};
  text("run-id", run.run_id || "");
  text("run-what", (run.algorithm || "") + " on " + (run.task || ""));
  const done = num(run.rounds_done), total = num(run.rounds_total);
  text("round", String(done));
  text("rounds-total", String(total));
  $("progress").style.width = (total > 0 ? Math.min(100, 100 * done / total) : 0).toFixed(1) + "%";
  text("phase", run.phase || "–");
  text("open-round", num(run.open_round) >= 0
    ? "round " + run.open_round + ": " + run.open_answered + "/" + run.open_sampled + " answered, " + duration(run.open_round_age_s)
    : (run.stop_requested ? "stop requested" : ""));
  text("pace", num(run.rounds_per_minute) > 0 ? fmt(run.rounds_per_minute, num(run.rounds_per_minute) >= 100 ? 0 : 1) : "–");
  text("eta", "rounds per minute; " + (num(run.eta_s) >= 0 ? "ETA " + duration(run.eta_s) : "ETA unknown"));
  text("clients-live", String(run.clients_live) + " live");
  text("clients-more", run.clients_registered + " registered, " + run.clients_revoked + " revoked");
  text("policy", "quorum " + run.min_clients + "/" + run.clients_per_round);
  text("traffic", "deadline " + fmt(run.round_deadline_s, 1) + " s; sent " + bytes(run.bytes_sent) + ", received " + bytes(run.bytes_received));

  const rounds = s.rounds || [];
  chart($("loss-chart"), rounds.map(r => [num(r.round) + 1, num(r.meta_loss)]), "loss", "round");
  text("loss-last", rounds.length ? "last " + fmt(rounds[rounds.length - 1].meta_loss, 4) : "");
  const vals = s.validations || [];
  chart($("val-chart"), vals.map(v => [num(v.rounds_trained), num(v.value)]), "val", "rounds trained");
  text("val-last", vals.length ? vals[vals.length - 1].metric + " " + fmt(vals[vals.length - 1].value, 3) : "");
  const curve = s.adaptation_curve || [];
  chart($("adapt-chart"), curve.map((y, i) => [i, num(y)]), "adapt", "adaptation step");
  text("adapt-last", curve.length ? (s.adaptation_metric || "") + " by step; before " + fmt(s.eval_before, 3) + ", after " + fmt(s.eval_after, 3) : "(after the run)");

  const tbody = $("clients").tBodies[0];
  while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
  for (const c of s.clients || []) {
    const refusals = (c.refusals || []).map(r => r.reason + " ×" + r.count).join(", ");
    row(tbody, [
      {text: c.client_id}, {text: c.state, cls: "state-" + String(c.state).replace(/[^a-z]/g, "")},
      {text: num(c.last_seen_s) >= 0 ? duration(c.last_seen_s) + " ago" : "–", cls: "num"},
      {text: String(c.rounds_trained), cls: "num"}, {text: fmt(c.compute_s, 1) + " s", cls: "num"},
      {text: bytes(c.bytes_sent), cls: "num"}, {text: bytes(c.bytes_received), cls: "num"}, {text: refusals || "–"},
    ]);
  }
  const shown = (s.clients || []).length, all = num(s.clients_total);
  text("clients-count", shown < all ? "(first " + shown + " of " + all + ")" : "(" + all + ")");
  const rbody = $("refusals").tBodies[0];
  while (rbody.firstChild) rbody.removeChild(rbody.firstChild);
  for (const r of s.refusals || []) row(rbody, [{text: r.reason}, {text: String(r.count), cls: "num"}, {text: r.last_message}]);
  if (!(s.refusals || []).length) row(rbody, [{text: "none"}, {text: ""}, {text: ""}]);
}

async function poll() {
  const conn = $("conn");
  try {
    const headers = token ? {"Authorization": "Bearer " + token} : {};
    const r = await fetch("/api/status", {headers: headers, cache: "no-store"});
    if (r.status === 401) {
      $("token-form").hidden = false;
      conn.textContent = "the admin token is needed";
      conn.className = "conn bad";
    } else if (!r.ok) {
      conn.textContent = "status " + r.status;
      conn.className = "conn bad";
    } else {
      render(await r.json());
      conn.textContent = "updated " + new Date().toLocaleTimeString();
      conn.className = "conn";
    }
  } catch (e) {
    conn.textContent = "coordinator unreachable";
    conn.className = "conn bad";
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", ev => {
    ev.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem("fedmeta-admin-token", token);
    $("token-form").hidden = true;
  });
  poll();
});
