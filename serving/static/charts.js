/* taoflow's own small SVG chart code: bundled with the package, so the dashboard needs no network. */
"use strict";
const NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const MARK_COLOR = { published: "#2563eb", promoted: "#16a34a", rolled_back: "#dc2626" };

function el(tag, attrs, parent) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

/* series: [{name, points: [{x: ISO time, y: number}]}]; marks: [{x: ISO time, label, kind}] */
function lineChart(container, series, opts) {
  opts = opts || {};
  const W = opts.width || 900, H = opts.height || 260, L = 48, R = 150, T = 12, B = 28;
  container.innerHTML = "";
  const svg = el("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "chart" }, container);
  const all = series.flatMap(s => s.points);
  const marks = opts.marks || [];
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent = "no data yet";
    return svg;
  }
  const xs = all.map(p => Date.parse(p.x)).concat(marks.map(m => Date.parse(m.x)));
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) { x0 -= 60000; x1 += 60000; }
  let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...all.map(p => p.y));
  let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...all.map(p => p.y));
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const sx = t => L + (W - L - R) * (Date.parse(t) - x0) / (x1 - x0);
  const sy = v => T + (H - T - B) * (1 - (v - y0) / (y1 - y0));
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, svg);
  el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }, svg);
  for (const v of [y0, (y0 + y1) / 2, y1]) {
    el("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end", class: "tick" }, svg).textContent = v.toFixed(2);
  }
  for (const t of [x0, (x0 + x1) / 2, x1]) {
    const label = new Date(t).toISOString().slice(5, 16).replace("T", " ");
    el("text", { x: L + (W - L - R) * (t - x0) / (x1 - x0), y: H - 8, "text-anchor": "middle", class: "tick" }, svg)
      .textContent = label;
  }
  for (const m of marks) {
    const x = sx(m.x);
    el("line", { x1: x, y1: T, x2: x, y2: H - B, stroke: MARK_COLOR[m.kind] || "#888", "stroke-dasharray": "4 3",
                 class: "mark", "data-kind": m.kind, "data-x": m.x, "data-label": m.label }, svg);
    el("text", { x: x + 3, y: T + 10, class: "marklabel", fill: MARK_COLOR[m.kind] || "#888" }, svg)
      .textContent = `${m.kind} ${m.label}`;
  }
  series.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    const pts = s.points.slice().sort((a, b) => Date.parse(a.x) - Date.parse(b.x));
    el("polyline", { points: pts.map(p => `${sx(p.x)},${sy(p.y)}`).join(" "), fill: "none", stroke: color,
                     "stroke-width": 2, class: "line" }, svg);
    for (const p of pts) {
      el("circle", { cx: sx(p.x), cy: sy(p.y), r: 2.5, fill: color, class: "point", "data-series": s.name,
                     "data-x": p.x, "data-y": p.y }, svg);
    }
    el("text", { x: W - R + 8, y: T + 14 + 16 * i, fill: color, class: "legend" }, svg).textContent = s.name;
  });
  return svg;
}

function table(container, rows, columns) {
  container.innerHTML = "";
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
