/* The dashboard page: fetches /dashboard/data and draws it with plotly.js (served from the installed `plotly`
   package by the dashboard itself, so the page needs no network). Times are shown in UTC. */
"use strict";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
                 "#4b5563", "#65a30d", "#7c3aed", "#0d9488"];
const MARKS = {
  published: { color: "#2563eb", symbol: "triangle-down", label: "published" },
  promoted: { color: "#16a34a", symbol: "star", label: "promoted" },
  rolled_back: { color: "#dc2626", symbol: "x", label: "rolled back" },
};
const CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
const colors = new Map();  // one colour per adapter or operator on every panel, kept across refreshes

function colorOf(name) {
  if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
  return colors.get(name);
}

/* "2026-01-01T10:00:00+00:00" or a zoneless UTC time -> "2026-01-01 10:00:00" (plotly's dates carry no zone) */
function utc(x) {
  if (x === null || x === undefined) return null;
  const s = String(x);
  const d = new Date(/[zZ]|[+-]\d\d(:?\d\d)?$/.test(s) ? s : s + "Z");
  return Number.isNaN(d.getTime()) ? s : d.toISOString().slice(0, 19).replace("T", " ");
}

function fmt(v, digits) {
  return v === null || v === undefined ? "-" : Number(v).toFixed(digits === undefined ? 3 : digits);
}

function layout(title, extra) {
  return Object.assign({
    title: { text: title, font: { size: 14 }, x: 0.01, xanchor: "left" },
    margin: { l: 52, r: 16, t: 36, b: 8 },
    xaxis: { type: "date", automargin: true, title: { text: "UTC", font: { size: 11 } } },
    yaxis: { automargin: true, zeroline: false },
    legend: { orientation: "h", x: 0, xanchor: "left", y: -0.22, yanchor: "top", font: { size: 11 } },
    hovermode: "closest",
    paper_bgcolor: "#fff",
    plot_bgcolor: "#fff",
    uirevision: title,  // zoom and hidden legend entries survive the refresh
  }, extra || {});
}

/* adapter events: a dotted vertical line each, and one hoverable symbol per event on an overlaid 0..1 axis,
   one trace per kind so the legend explains the symbols and can hide them */
function markers(events) {
  const shapes = events.map(e => ({
    type: "line", xref: "x", yref: "paper", x0: utc(e.ts), x1: utc(e.ts), y0: 0, y1: 1, layer: "below",
    line: { color: (MARKS[e.action] || {}).color || "#888", width: 1, dash: "dot" },
  }));
  const traces = Object.entries(MARKS).map(([kind, m]) => {
    const ev = events.filter(e => e.action === kind);
    return {
      name: m.label, type: "scatter", mode: "markers", yaxis: "y2", legendgroup: "marks:" + kind,
      x: ev.map(e => utc(e.ts)), y: ev.map(() => 0.96), text: ev.map(e => e.adapter),
      marker: { symbol: m.symbol, size: 11, color: m.color, line: { width: 1, color: "#fff" } },
      hovertemplate: `${m.label} %{text}<br>%{x}<extra></extra>`, visible: ev.length ? true : "legendonly",
      meta: "marker",
    };
  }).filter(t => t.x.length);
  return { shapes, traces };
}

/* mean reward per bucket with its 95% interval: a band (one closed polygon per run of buckets with traffic)
   under a line with points; null points break both */
function rewardTraces(series) {
  const out = [];
  for (const s of series) {
    const c = colorOf(s.name);
    const bx = [], by = [];
    let run = [];
    const flush = () => {
      if (run.length) {
        if (bx.length) { bx.push(null); by.push(null); }
        for (const p of run) { bx.push(utc(p.x)); by.push(p.ci_high); }
        for (const p of run.slice().reverse()) { bx.push(utc(p.x)); by.push(p.ci_low); }
      }
      run = [];
    };
    for (const p of s.points) { if (p.y === null) flush(); else run.push(p); }
    flush();
    out.push({
      name: s.name + " 95%", type: "scatter", mode: "lines", x: bx, y: by, fill: "toself", fillcolor: c + "22",
      line: { width: 0 }, hoverinfo: "skip", showlegend: false, legendgroup: s.name, meta: "band",
    });
    out.push({
      name: s.name, type: "scatter", mode: "lines+markers", legendgroup: s.name, connectgaps: false,
      x: s.points.map(p => utc(p.x)), y: s.points.map(p => p.y),
      customdata: s.points.map(p => [p.n, fmt(p.ci_low), fmt(p.ci_high)]),
      line: { color: c, width: 2 }, marker: { color: c, size: 5 },
      hovertemplate: `${s.name}<br>%{x}<br>reward %{y:.3f} [%{customdata[1]}, %{customdata[2]}]` +
        `<br>n = %{customdata[0]}<extra></extra>`,
      meta: "reward",
    });
  }
  return out;
}

function empty(container, text) {
  if (!container.querySelector(".empty")) {
    container.replaceChildren();
    const div = document.createElement("div");
    div.className = "card empty";
    div.textContent = text;
    container.appendChild(div);
  }
}

/* one plot per key in `container`, created on first sight and updated in place afterwards */
function panels(container, keys) {
  container.querySelector(".empty")?.remove();
  const have = new Map([...container.querySelectorAll(".plot")].map(d => [d.dataset.key, d]));
  for (const [k, div] of have) if (!keys.includes(k)) { Plotly.purge(div); div.parentElement.remove(); }
  return keys.map(k => {
    if (have.has(k)) return have.get(k);
    const card = document.createElement("div");
    card.className = "card";
    const div = document.createElement("div");
    div.className = "plot";
    div.dataset.key = k;
    card.appendChild(div);
    container.appendChild(card);
    return div;
  });
}

function timeRange(d) {
  const xs = [];
  for (const p of d.reward_panels) for (const s of p.series) for (const q of s.points) xs.push(utc(q.x));
  for (const e of d.adapter_events) xs.push(utc(e.ts));
  if (!xs.length) return undefined;
  xs.sort();
  const pad = d.bucket_seconds * 500;  // half a bucket either side, in ms
  return [utc(new Date(Date.parse(xs[0] + "Z") - pad).toISOString()),
          utc(new Date(Date.parse(xs[xs.length - 1] + "Z") + pad).toISOString())];
}

function drawRewards(d, marks, range) {
  const container = document.getElementById("reward");
  if (!d.reward_panels.length) { empty(container, "no rewarded interactions yet"); return; }
  const divs = panels(container, d.reward_panels.map(p => p.task_type));
  d.reward_panels.forEach((p, i) => {
    const n = p.series.reduce((a, s) => a + s.points.reduce((b, q) => b + (q.n || 0), 0), 0);
    Plotly.react(divs[i], [...rewardTraces(p.series), ...structuredClone(marks.traces)], layout(`${p.task_type} · ${n} rewards`, {
      shapes: structuredClone(marks.shapes),
      xaxis: { type: "date", range, automargin: true },
      yaxis: { title: { text: "mean reward" }, automargin: true, zeroline: false },
      yaxis2: { overlaying: "y", range: [0, 1], visible: false, fixedrange: true },
    }), CONFIG);
  });
}

function drawUtilities(d, marks, range) {
  const container = document.getElementById("utilities");
  const tasks = [...new Set(d.utility_series.map(s => s.task_type))];
  if (!tasks.length) { empty(container, "no utility updates yet"); return; }
  const divs = panels(container, tasks);
  tasks.forEach((t, i) => {
    const traces = d.utility_series.filter(s => s.task_type === t).map(s => ({
      name: s.operator, type: "scatter", mode: "lines+markers", line: { shape: "hv", color: colorOf("op:" + s.operator), width: 2 },
      marker: { size: 4, color: colorOf("op:" + s.operator) }, x: s.points.map(p => utc(p.x)), y: s.points.map(p => p.y),
      hovertemplate: `${t}/${s.operator}<br>%{x}<br>utility %{y:.3f}<extra></extra>`, meta: "utility",
    }));
    Plotly.react(divs[i], [...traces, ...structuredClone(marks.traces)], layout(`${t}: operator utilities`, {
      shapes: structuredClone(marks.shapes),
      xaxis: { type: "date", range, automargin: true },
      yaxis: { title: { text: "utility" }, automargin: true, zeroline: false },
      yaxis2: { overlaying: "y", range: [0, 1], visible: false, fixedrange: true },
    }), CONFIG);
  });
}

/* an empty plot says so instead of drawing bare axes over a made-up range */
function nothing(traces, text) {
  if (traces.some(t => t.x.length)) return {};
  return {
    xaxis: { visible: false }, yaxis: { visible: false },
    annotations: [{ text, showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5, font: { color: "#888" } }],
  };
}

function drawRounds(d) {
  const traces = d.round_series.map((s, i) => ({
    name: s.name, type: "scatter", mode: "lines+markers", x: s.points.map(p => utc(p.x)), y: s.points.map(p => p.y),
    line: { color: i ? "#16a34a" : "#9ca3af", width: 2 }, marker: { size: 7 },
    hovertemplate: `${s.name}<br>%{x}<br>%{y:.3f}<extra></extra>`,
  }));
  Plotly.react(document.getElementById("rounds-chart"), traces, layout("TAO rounds: held-out reward", {
    yaxis: { title: { text: "held-out reward" }, automargin: true, zeroline: false },
    legend: { orientation: "h", x: 0, y: -0.3, yanchor: "top" },
    ...nothing(traces, "no TAO rounds yet"),
  }), CONFIG);
}

function drawThroughput(d) {
  const traces = d.throughput_series.map((s, i) => ({
    name: s.name, type: "bar", x: s.points.map(p => utc(p.x)), y: s.points.map(p => p.y),
    marker: { color: i ? "#dc2626" : "#2563eb" }, hovertemplate: `${s.name}<br>%{x}<br>%{y}<extra></extra>`,
  }));
  Plotly.react(document.getElementById("throughput"), traces,
    layout(`Stream throughput (rows landed per ${d.bucket_seconds}s)`, {
      barmode: "group", bargap: 0.1,
      yaxis: { title: { text: "rows" }, automargin: true, rangemode: "tozero" },
      legend: { orientation: "h", x: 0, y: -0.3, yanchor: "top" },
      ...nothing(traces, "no interactions landed yet"),
    }), CONFIG);
}

function table(container, rows, columns) {
  container.replaceChildren();
  const t = document.createElement("table");
  const head = t.insertRow();
  for (const c of columns) { const th = document.createElement("th"); th.textContent = c[1]; head.appendChild(th); }
  for (const r of rows) {
    const tr = t.insertRow();
    for (const c of columns) {
      const v = r[c[0]];
      tr.insertCell().textContent = v === null || v === undefined ? "-" : (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : v);
    }
  }
  container.appendChild(t);
}

function drawTables(d) {
  table(document.getElementById("rounds"), d.rounds, [["round_id", "round"], ["decision", "decision"],
    ["prompts", "prompts"], ["reward_before", "before"], ["reward_after", "after"], ["gain_lower_bound", "gain (lower bound)"],
    ["seconds", "seconds"], ["adapter", "adapter"]]);
  table(document.getElementById("health"), d.dead_letters, [["source_topic", "topic"], ["accepted", "accepted"],
    ["dead_letters", "dead letters"], ["rate", "rate"]]);
  table(document.getElementById("freshness"), d.freshness, [["table_name", "table"], ["rows", "rows"],
    ["seconds_since_landing", "seconds since last landing"]]);
  document.getElementById("lag").textContent = d.stream
    ? `lander consumer lag: ${d.stream.lag_records} records · last batch landed in ${(d.stream.last_batch_seconds * 1000).toFixed(1)} ms`
    : "no lander running (no stream worker): lag unknown";
  table(document.getElementById("decisions"), d.release_decisions, [["adapter", "adapter"], ["action", "decision"],
    ["ts", "when"], ["n_challenger", "n (adapter)"], ["n_reference", "n (reference)"], ["mean_challenger", "mean"],
    ["mean_reference", "reference mean"], ["diff", "difference"], ["lower", "95% lower"], ["upper", "95% upper"],
    ["reason", "reason"]]);
  table(document.getElementById("leaderboard"), d.leaderboard, [["task_type", "task type"], ["rank", "#"],
    ["operator", "operator"], ["utility", "utility"], ["utility_n", "n"], ["selection_share", "share"],
    ["mean_reward", "reward"]]);
  table(document.getElementById("sessions"), d.sessions, [["task_type", "task type"], ["operator", "operator"],
    ["adapter", "adapter"], ["sessions", "sessions"], ["mean_steps", "steps (mean)"], ["mean_reward", "reward"],
    ["ci_low", "95% low"], ["ci_high", "95% high"], ["mean_duration_s", "duration (s)"]]);
}

async function refresh() {
  const status = document.getElementById("status");
  let d;
  try {
    const r = await fetch("dashboard/data", { credentials: "same-origin" });
    if (!r.ok) { status.textContent = `error ${r.status}: ${await r.text()}`; return; }
    d = await r.json();
  } catch (e) { status.textContent = `cannot reach the server: ${e}`; return; }
  if (typeof Plotly === "undefined") { status.textContent = "plotly.js did not load from dashboard/plotly.min.js"; return; }
  const marks = markers(d.adapter_events);
  const range = timeRange(d);
  drawRewards(d, marks, range);
  drawUtilities(d, marks, range);
  drawRounds(d);
  drawThroughput(d);
  drawTables(d);
  status.textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC · ${d.rewards} rewarded interactions · ` +
    `buckets of ${d.bucket_seconds}s · refreshes every ${d.refresh_seconds}s`;
  document.body.setAttribute("data-loaded", "1");
}

document.addEventListener("DOMContentLoaded", () => {
  refresh();
  setInterval(refresh, 5000);
});
