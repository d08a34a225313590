// Pruning Explorer graph component: Cytoscape.js (compound nodes) laid out by ELK (layered).
//
// Receives the view model of explorer/render/view.py (`ViewModel.to_component()`): every node
// with its parent box and initial expansion, and op-level edges. Expansion is local: an edge
// whose endpoint is hidden moves to the outermost collapsed box around it, exactly like
// `ViewModel.visible()` in Python. A click selects a node and returns
// {node, group, n} to Python; a double click (or the Expand button) opens or closes a box.
//
// Test hooks: `window.peGraph` (positions, state) and the #pe-state element's data attributes.
import cytoscape from "cytoscape";
import elk from "cytoscape-elk";

cytoscape.use(elk);

const HIGHLIGHT = "#f28e2b";
const CHAIN = "#d62728";
const READABLE = 0.9; // the least zoom a selected chain is shown at
const PAD = 10; // a box's padding around its children
const TITLE_PAD = 18; // room for a box's title, above its children, inside the box

let cy = null;
let view = null; // the last view model
let modelKey = null;
let toggled = new Map(); // box id -> opened (user choice, kept across reruns of one model)
let selectedId = null;
let clicks = 0;
let searchText = "";
let layoutMs = 0;
let lastText = "";

// -- Streamlit protocol (the component API, without streamlit-component-lib) ---------------
function send(type, data) {
  window.parent.postMessage({ isStreamlitMessage: true, type, ...data }, "*");
}
function setValue(value) {
  send("streamlit:setComponentValue", { value, dataType: "json" });
}
function setHeight(h) {
  send("streamlit:setFrameHeight", { height: h });
}

window.addEventListener("message", (event) => {
  const msg = event.data;
  if (!msg || msg.type !== "streamlit:render") return;
  render(msg.args);
});

// -- the view model -----------------------------------------------------------------------
function opened() {
  const out = new Set();
  for (const n of view.nodes) {
    if (n.kind !== "module") continue;
    const user = toggled.get(n.id);
    if (user === true || (user === undefined && n.expanded)) out.add(n.id);
  }
  return out;
}

function representatives(open) {
  const rep = new Map();
  for (const n of view.nodes) {
    // parents come before children in the view model
    const p = n.parent;
    if (p === null) rep.set(n.id, n.id);
    else if (rep.get(p) !== p) rep.set(n.id, rep.get(p));
    else if (!open.has(p)) rep.set(n.id, p);
    else rep.set(n.id, n.id);
  }
  return rep;
}

function nodeText(n, isOpen) {
  if (n.kind === "module" && isOpen) return n.label;
  const lines = [n.label];
  if (n.kind === "module") lines.push(...n.detail);
  if (n.pins) lines.push("pins an axis");
  if (n.unsafe && (n.kind !== "module" || !isOpen)) lines.push("unsafe: " + n.unsafe);
  return lines.join("\n");
}

function textSize(text) {
  const lines = text.split("\n");
  const w = Math.max(...lines.map((l) => l.length));
  return { w: Math.max(40, w * 6.3 + 16), h: lines.length * 13 + 12 };
}

function elements() {
  const open = opened();
  const rep = representatives(open);
  const group = view.group;
  const els = [];
  for (const n of view.nodes) {
    if (rep.get(n.id) !== n.id) continue;
    const isOpen = n.kind === "module" && open.has(n.id);
    const text = nodeText(n, isOpen);
    const size = textSize(text);
    const cls = [n.kind];
    if (isOpen) cls.push("open");
    else if (n.kind === "module") cls.push("closed");
    if (group !== null && n.group_ids.includes(group)) cls.push("member");
    if (n.chain) cls.push("chain");
    if (n.pins) cls.push("pins");
    if (n.unsafe) cls.push("unsafe");
    if (n.found) cls.push("found");
    if (searchText && matches(n)) cls.push("hit");
    if (n.copies > 1) cls.push("folded");
    const data = { id: n.id, text, w: size.w, h: size.h, group: n.primary_group };
    if (isOpen) data.w = measure(text, TITLE_FONT).w;  // a box is as wide as its title
    if (n.parent !== null) data.parent = n.parent;
    els.push({ group: "nodes", data, classes: cls.join(" ") });
  }
  const seen = new Map();
  for (const e of view.edges) {
    const a = rep.get(e.source);
    const b = rep.get(e.target);
    if (a === b) continue;
    const key = a + "->" + b;
    const hot = group !== null && e.group_ids.includes(group);
    const old = seen.get(key);
    if (old) {
      if (hot && !old.hot) { old.hot = true; old.label = e.label; }
      continue;
    }
    seen.set(key, { a, b, label: e.label, hot });
  }
  // An edge's label is a node of its own on the edge (a -> label -> b), in the innermost box
  // holding both ends: ELK places it like any node, so it never lands on a node or on the
  // title of a box the edge enters or leaves (those titles sit in the box's top padding).
  const parentOf = new Map(els.map((x) => [x.data.id, x.data.parent ?? null]));
  let i = 0;
  for (const { a, b, label, hot } of seen.values()) {
    const cls = hot ? "hot" : "";
    if (!label) {
      els.push({ group: "edges", data: { id: "e" + i++, source: a, target: b }, classes: cls });
      continue;
    }
    const id = "label:" + i;
    const size = measure(label, LABEL_FONT);
    const data = { id, text: label, w: size.w, h: size.h };
    const box = commonBox(a, b, parentOf);
    if (box !== null) data.parent = box;
    els.push({ group: "nodes", data, classes: ("elabel " + cls).trim(), selectable: false,
               grabbable: false });
    els.push({ group: "edges", data: { id: "e" + i + "a", source: a, target: id },
               classes: ("tolabel " + cls).trim() });
    els.push({ group: "edges", data: { id: "e" + i++, source: id, target: b }, classes: cls });
  }
  return els;
}

function commonBox(a, b, parentOf) {
  const up = new Set();
  for (let p = parentOf.get(a); p; p = parentOf.get(p)) up.add(p);
  for (let p = parentOf.get(b); p; p = parentOf.get(p)) if (up.has(p)) return p;
  return null;
}

const LABEL_FONT = "8px Helvetica, Arial, sans-serif";
const TITLE_FONT = "bold 10px Helvetica, Arial, sans-serif";
let ctx2d = null;

function measure(text, font) {  // the drawn size of one line of text, with a little room
  ctx2d = ctx2d || document.createElement("canvas").getContext("2d");
  ctx2d.font = font;
  return { w: Math.ceil(ctx2d.measureText(text).width) + 4, h: Math.ceil(parseFloat(font
    .replace(/^bold /, "")) * 1.25) + 2 };
}

function matches(n) {
  const q = searchText.toLowerCase();
  return n.label.toLowerCase().includes(q) || (n.module || "").toLowerCase().includes(q);
}

const STYLE = [
  { selector: "node", style: {
    "shape": "round-rectangle", "label": "data(text)", "text-wrap": "wrap",
    "text-valign": "center", "text-halign": "center", "font-size": 10,
    "font-family": "Helvetica, Arial, sans-serif", "width": "data(w)", "height": "data(h)",
    "background-color": "#eef2f7", "border-width": 1, "border-color": "#8896a8" } },
  { selector: "node.op", style: { "background-color": "#ffffff", "font-size": 9 } },
  { selector: "node.input, node.output", style: {
    "shape": "ellipse", "background-color": "#e3f1e3", "border-color": "#5a8f5a" } },
  { selector: "node.closed", style: { "background-color": "#dde6f3", "border-width": 1.5 } },
  { selector: "node.folded", style: { "border-style": "double", "border-width": 4 } },
  { selector: "node.open", style: {
    // the title inside the box, in the top padding ELK reserves (TITLE_PAD) and nothing else
    // uses: edge labels are nodes placed outside it, edges only cross it
    "text-valign": "top", "text-halign": "center", "background-opacity": 0.35,
    "text-margin-y": TITLE_PAD - 2, "padding": PAD, "font-weight": "bold",
    "min-width": "data(w)", "min-height-bias-top": "100%", "min-height-bias-bottom": "0%" } },
  { selector: "node.member", style: { "background-color": HIGHLIGHT, "background-opacity": 1 } },
  { selector: "node.open.member", style: { "background-color": "#fde3c8",
    "background-opacity": 0.6 } },
  { selector: "node.chain", style: { "border-color": CHAIN, "border-width": 2.5 } },
  { selector: "node.pins", style: { "shape": "cut-rectangle", "border-color": "#7b1fa2",
    "border-width": 3.5 } },
  { selector: "node.unsafe", style: { "border-style": "dashed", "border-color": "#b71c1c",
    "border-width": 3 } },
  { selector: "node.found, node.hit", style: { "border-color": "#d62728", "border-width": 3.5,
    "underlay-color": "#ffeb3b", "underlay-opacity": 0.6, "underlay-padding": 4 } },
  { selector: "node:selected", style: { "overlay-color": "#1f77b4", "overlay-opacity": 0.25,
    "overlay-padding": 4 } },
  { selector: "node.elabel", style: {  // an edge's label: text on the line, not a box
    "shape": "rectangle", "background-color": "#fff", "background-opacity": 0.85,
    "border-width": 0, "font-size": 8, "color": "#555", "events": "no",
    "text-valign": "center", "text-halign": "center" } },
  { selector: "node.elabel.hot", style: { "color": CHAIN, "font-weight": "bold" } },
  { selector: "edge", style: {
    "curve-style": "bezier", "target-arrow-shape": "triangle", "width": 1.2,
    "line-color": "#999", "target-arrow-color": "#999" } },
  { selector: "edge.tolabel", style: { "target-arrow-shape": "none" } },
  { selector: "edge.hot", style: { "line-color": CHAIN, "target-arrow-color": CHAIN,
    "width": 3 } },
];

const BOX_PADDING = `[top=${PAD + TITLE_PAD},left=${PAD},bottom=${PAD},right=${PAD}]`;

const LAYOUT = {
  name: "elk", fit: true, padding: 20, animate: false, nodeDimensionsIncludeLabels: false,
  // an open box: room for its title above its children, and at least as wide as the title
  nodeLayoutOptions: (n) => (n.isParent() ? { "elk.padding": BOX_PADDING,
    "elk.nodeSize.constraints": "[MINIMUM_SIZE]",
    "elk.nodeSize.minimum": `(${n.data("w") + 2 * PAD}, 0)` } : {}),
  elk: {
    "algorithm": "layered", "elk.direction": "DOWN",
    "elk.hierarchyHandling": "INCLUDE_CHILDREN",
    "elk.layered.spacing.nodeNodeBetweenLayers": 10, "elk.spacing.nodeNode": 18,
    "elk.padding": BOX_PADDING,
    "elk.layered.nodePlacement.strategy": "BRANDES_KOEPF",
  },
};

function draw(fit) {
  const t0 = performance.now();
  const pan = cy ? { zoom: cy.zoom(), pan: cy.pan() } : null;
  cy.elements().remove();
  cy.add(elements());
  if (selectedId && cy.getElementById(selectedId).nonempty()) {
    cy.getElementById(selectedId).select();
  }
  const layout = cy.layout({ ...LAYOUT, fit });
  layout.one("layoutstop", () => {
    roomForTitles();
    if (!fit && pan) { cy.zoom(pan.zoom); cy.pan(pan.pan); }
    const chain = cy.nodes(".chain, .member").filter((n) => !n.hasClass("open"));
    if (fit && chain.nonempty() && chain.length < cy.nodes().length) {
      cy.fit(chain, 30);  // a selected group: zoom to its chain, readable, from its start
      if (cy.zoom() < READABLE) {
        const bb = chain.boundingBox();
        cy.zoom(READABLE);
        cy.pan({ x: cy.width() / 2 - READABLE * (bb.x1 + bb.x2) / 2,
                 y: 20 - READABLE * bb.y1 });
      }
    }
    layoutMs = performance.now() - t0;
    publish();
  });
  layout.run();
}

function roomForTitles() {
  // Each open box is drawn as ELK sized it: its top where ELK put it, TITLE_PAD above its
  // children (Cytoscape pads children evenly), and its title there, at the left.
  const elkTop = (n) => n.ancestors().reduce((y, p) => y + p.scratch("elk").y,
                                             n.scratch("elk").y);
  const boxes = cy.nodes(".open").sort((a, b) => b.ancestors().length - a.ancestors().length);
  cy.batch(() => boxes.forEach((n) => {
    const bb = n.children().boundingBox({ includeLabels: true, includeOverlays: false });
    n.style("min-height", bb.h + Math.max(0, bb.y1 - PAD - elkTop(n)));
    n.updateCompoundBounds(true);
    const w = n.boundingBox({ includeLabels: false, includeOverlays: false }).w;
    n.style("text-margin-x", -(w / 2 - PAD - n.data("w") / 2));
  }));
}

function shown() {  // the drawn nodes of the model (not the edges' labels)
  return cy.nodes().not(".elabel");
}

function overlaps() {
  // Every edge label whose box meets a box title, a node or another label, and every box
  // title that meets a node (graph pixels).
  const box = (ele, opts) => ele.boundingBox({ includeOverlays: false, ...opts });
  const at = (b) => [b.x1, b.y1, b.x2, b.y2].map(Math.round);
  const meet = (a, b) => a.x1 < b.x2 && b.x1 < a.x2 && a.y1 < b.y2 && b.y1 < a.y2;
  const titles = cy.nodes(".open").map((n) =>
    ["title of " + n.id(), box(n, { includeNodes: false, includeLabels: true })]);
  const nodes = cy.nodes().not(".open").map((n) => [n.id(), box(n, {})]);
  const out = [];
  cy.nodes(".elabel").forEach((l) => {
    const b = box(l, {});
    for (const [id, o] of [...titles, ...nodes]) {
      if (id !== l.id() && meet(b, o)) out.push([l.data("text"), id, at(b), at(o)]);
    }
  });
  for (const [t, b] of titles) {
    for (const [id, o] of nodes) if (meet(b, o)) out.push([t, id, at(b), at(o)]);
  }
  return { labels: cy.nodes(".elabel").length, titles: titles.length, overlaps: out };
}

function publish() {
  const el = document.getElementById("pe-state");
  const group = view ? view.group : null;
  el.dataset.selected = selectedId || "";
  el.dataset.group = group === null ? "" : String(group);
  el.dataset.visible = String(shown().length);
  el.dataset.highlighted = cy.nodes(".member").map((n) => n.id()).join(" ");
  el.dataset.layoutMs = String(Math.round(layoutMs));
  el.dataset.ready = "1";
  document.getElementById("pe-info").textContent = info();
}

function info() {
  const open = cy.nodes(".open").length;
  const group = view.group === null ? "no group selected" : `group ${view.group} selected`;
  return `${shown().length} nodes, ${open} open boxes, ${group} · click: select · ` +
    "double-click: open/close · wheel: zoom · drag: pan";
}

function toggle(id) {
  const n = view.nodes.find((x) => x.id === id);
  if (!n || n.kind !== "module") return;
  toggled.set(id, !opened().has(id));
  draw(false);
}

function select(id) {
  selectedId = id;
  const n = view.nodes.find((x) => x.id === id);
  clicks += 1;
  setValue({ node: id, group: n ? n.primary_group : null, n: clicks });
  publish();
}

function openAncestorsOf(pred) {
  const byId = new Map(view.nodes.map((n) => [n.id, n]));
  for (const n of view.nodes) {
    if (!pred(n)) continue;
    let p = n.parent;
    while (p !== null) { toggled.set(p, true); p = byId.get(p).parent; }
  }
}

function setup() {
  document.body.innerHTML = `
    <style>#pe-bar button{font:12px Helvetica,Arial;padding:2px 8px;border:1px solid #bbb;
      border-radius:4px;background:#f7f7f9;cursor:pointer;white-space:nowrap}
      #pe-bar input{font:12px Helvetica,Arial;padding:3px 6px;border:1px solid #bbb;
      border-radius:4px}</style>
    <div id="pe-bar" style="display:flex;gap:6px;align-items:center;font:12px Helvetica,Arial;
      height:26px;overflow:hidden">
      <input id="pe-search" placeholder="search ops and modules" style="width:220px">
      <button id="pe-fit">Fit</button>
      <button id="pe-toggle">Expand/collapse selected</button>
      <button id="pe-expand-all">Expand all</button>
      <button id="pe-collapse-all">Collapse all</button>
      <span id="pe-info" style="color:#555"></span>
    </div>
    <div id="pe-cy" style="position:absolute;top:30px;bottom:0;left:0;right:0;
      border:1px solid #ddd;border-radius:4px"></div>
    <div id="pe-state" style="display:none"></div>`;
  document.body.style.margin = "0";
  cy = cytoscape({ container: document.getElementById("pe-cy"), style: STYLE,
                   minZoom: 0.05, maxZoom: 4,
                   selectionType: "single", boxSelectionEnabled: false });
  cy.on("onetap", "node", (evt) => select(evt.target.id()));  // not the first of a double
  cy.on("dbltap", "node", (evt) => toggle(evt.target.id()));
  document.getElementById("pe-fit").onclick = () => cy.fit(undefined, 20);
  document.getElementById("pe-toggle").onclick = () => selectedId && toggle(selectedId);
  document.getElementById("pe-expand-all").onclick = () => {
    for (const n of view.nodes) if (n.kind === "module") toggled.set(n.id, true);
    draw(true);
  };
  document.getElementById("pe-collapse-all").onclick = () => {
    for (const n of view.nodes) if (n.kind === "module") toggled.set(n.id, false);
    draw(true);
  };
  document.getElementById("pe-search").addEventListener("change", (evt) => {
    searchText = evt.target.value.trim();
    if (searchText) openAncestorsOf(matches);
    draw(true);
  });
  window.peGraph = {
    // test hooks: rendered boxes (iframe pixels), state, and the same actions as the mouse
    box: (id) => {  // in the iframe's pixels, for a real mouse click
      const n = cy.getElementById(id);
      if (n.empty()) return null;
      const b = n.renderedBoundingBox();
      const c = cy.container().getBoundingClientRect();
      return { x1: b.x1 + c.left, x2: b.x2 + c.left, y1: b.y1 + c.top, y2: b.y2 + c.top,
               title: n.hasClass("open") ? 18 : 0 };
    },
    visible: () => shown().map((n) => n.id()),
    overlaps,
    info: (id) => {
      const n = view.nodes.find((x) => x.id === id);
      return n ? { label: n.label, classes: cy.getElementById(id).classes() } : null;
    },
    isOpen: (id) => cy.getElementById(id).hasClass("open"),
    toggle,
    fit: () => cy.fit(undefined, 20),
    layoutMs: () => layoutMs,
  };
}

function render(args) {
  if (!cy) setup();
  const height = args.height || 650;
  document.body.style.height = height + "px";
  setHeight(height);
  const key = args.model_key || "";
  const fresh = view === null || key !== modelKey;
  if (key !== modelKey) { toggled = new Map(); selectedId = null; }
  modelKey = key;
  const prevGroup = view ? view.group : null;
  const text = JSON.stringify(args.view);
  if (args.selected) selectedId = args.selected;
  if (!fresh && text === lastText) { publish(); return; }  // a rerun with the same graph
  lastText = text;
  view = args.view;
  if (view.group !== prevGroup) toggled = new Map();  // a new group opens what it needs
  draw(fresh || view.group !== prevGroup);
}

send("streamlit:componentReady", { apiVersion: 1 });
