import cytoscape from "cytoscape";
import elk from "cytoscape-elk";
import dagre from "cytoscape-dagre";
import fcose from "cytoscape-fcose";
cytoscape.use(elk); cytoscape.use(dagre); cytoscape.use(fcose);
const LAYOUTS = {
  elk: { name: "elk", animate: false, elk: { algorithm: "layered", "elk.direction": "DOWN",
         "elk.hierarchyHandling": "INCLUDE_CHILDREN" } },
  dagre: { name: "dagre", animate: false, rankDir: "TB" },
  fcose: { name: "fcose", animate: false, quality: "default" },
};
window.runLayout = (elements, which) => new Promise((resolve) => {
  document.body.innerHTML = '<div id="cy" style="width:1200px;height:900px"></div>';
  const cy = cytoscape({ container: document.getElementById("cy"), elements,
    style: [{ selector: "node", style: { label: "data(id)", width: "data(w)", height: "data(h)",
      "font-size": 8, shape: "round-rectangle", "text-valign": "center" } },
      { selector: ":parent", style: { "text-valign": "top", "background-opacity": 0.2 } },
      { selector: "edge", style: { "curve-style": "bezier", "target-arrow-shape": "triangle" } }] });
  const t0 = performance.now();
  const l = cy.layout(LAYOUTS[which]);
  l.one("layoutstop", () => {
    const ms = performance.now() - t0;
    // quality: overlapping leaf boxes, and leaves drawn outside their parent's box
    const leaves = cy.nodes().filter((n) => !n.isParent());
    let overlaps = 0, outside = 0;
    const bb = leaves.map((n) => n.boundingBox({ includeLabels: false }));
    for (let i = 0; i < bb.length; i++) for (let j = i + 1; j < bb.length; j++) {
      const a = bb[i], b = bb[j];
      if (a.x1 < b.x2 - 1 && b.x1 < a.x2 - 1 && a.y1 < b.y2 - 1 && b.y1 < a.y2 - 1) overlaps++;
    }
    // edges pointing upward (against the dataflow direction)
    let upward = 0;
    cy.edges().forEach((e) => { if (e.target().position().y < e.source().position().y - 1) upward++; });
    resolve({ ms, overlaps, upward, nodes: cy.nodes().length, edges: cy.edges().length });
  });
  l.run();
});
