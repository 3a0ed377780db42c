// hooked-llava explorers: draws the views of analyses.viz from the JSON each one carries.
// Every number shown was computed in Python; this file only decodes (inflate, scale) and draws.
(function () {
  "use strict";
  if (window.__hlvExplorers) { window.__hlvExplorers.renderAll(); return; }
  const H = {};
  window.__hlvExplorers = H;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Inflate a deflated, base64-encoded array of 8- or 16-bit codes; value i is
  // offset + span * (code / levels) ** gamma (analyses.viz.page.encode_array).
  async function decode(d) {
    const bin = atob(d.b64);
    const packed = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) packed[i] = bin.charCodeAt(i);
    const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("deflate"));
    const buffer = await new Response(stream).arrayBuffer();
    const codes = d.bits === 16 ? new Uint16Array(buffer) : new Uint8Array(buffer);
    return { shape: d.shape, at: (i) => d.offset + d.span * Math.pow(codes[i] / d.levels, d.gamma) };
  }

  const fmt = (v) => (v === null || v === undefined ? "" : String(Number(v.toPrecision(6))));
  const frac = (v, max) => Math.min(1, Math.max(0, v / max));
  // Text: the warmer, the larger. Image patches: the dimmer, the smaller (the image stays readable).
  const shade = (v, max) => (v === null || !(max > 0) ? "" : `rgba(230,60,20,${frac(v, max) * 0.85})`);
  const dim = (v, max) => (v === null || !(max > 0) ? "rgba(0,0,0,0.8)" : `rgba(0,0,0,${(1 - frac(v, max)) * 0.8})`);
  const label = (t) => t.replace(/\n/g, "⏎").replace(/ /g, "·");

  function select(testid, options, onChange) {
    const s = el("select", { "data-testid": testid });
    for (const [value, text] of options) s.appendChild(el("option", { value: String(value) }, text));
    s.addEventListener("change", onChange);
    return s;
  }

  function legend(name, caption, image) {
    const box = el("div", { class: "hlv-legend", "data-testid": `scale-${name}` });
    box.appendChild(el("span", { class: "hlv-legend-cap" }, caption));
    const lo = el("span", { "data-testid": `scale-${name}-min` }, "0");
    const hi = el("span", { "data-testid": `scale-${name}-max` }, "1");
    box.append(lo, el("span", { class: image ? "hlv-bar hlv-bar-dim" : "hlv-bar" }), hi);
    return { box, set: (a, b) => { lo.textContent = fmt(a); hi.textContent = fmt(b); } };
  }

  // The image with one absolutely placed cell per patch: cells[r][c].
  function imagePanel(src, grid, px) {
    const box = el("div", { class: "hlv-image", style: `width:${px}px;height:${px}px` });
    box.appendChild(el("img", { src, alt: "image", width: px, height: px }));
    const cells = [];
    const side = px / grid;
    for (let r = 0; r < grid; r++) {
      cells.push([]);
      for (let c = 0; c < grid; c++) {
        const cell = el("div", {
          class: "hlv-cell", "data-testid": `patch-${r}-${c}`, "data-row": r, "data-col": c,
          style: `left:${c * side}px;top:${r * side}px;width:${side}px;height:${side}px;font-size:${Math.max(7, Math.min(14, side / 4.2))}px`,
        });
        box.appendChild(cell);
        cells[r].push(cell);
      }
    }
    return { box, cells };
  }

  function hoverLine(root) {
    const line = el("div", { class: "hlv-hover", "data-testid": "hover-info" }, "hover over a patch or a token for its exact value");
    root.addEventListener("mouseover", (e) => {
      const t = e.target.closest("[data-hover]");
      if (t && root.contains(t)) line.textContent = t.getAttribute("data-hover");
    });
    return line;
  }

  function setValue(node, v, max, what) {
    node.setAttribute("data-value", fmt(v));
    node.style.background = node.classList.contains("hlv-cell") ? dim(v, max) : shade(v, max);
    const text = what + (v === null ? ": —" : `: ${fmt(v)}`);
    node.setAttribute("title", text);
    node.setAttribute("data-hover", text);
  }

  // ---- attention ----------------------------------------------------------------------------
  H.attention = async function (root, P) {
    const A = await decode(P.attention);
    const [, nHead, nQuery, nKey] = A.shape;
    const qOf = new Map(P.queries.map((k, i) => [k, i]));
    const state = { layer: 0, head: 0, mode: "query", at: P.queries[P.queries.length - 1] };
    const get = (q, k) => A.at(((state.layer * nHead + state.head) * nQuery + q) * nKey + k);
    const body = root.querySelector(".hlv-body");
    body.textContent = "";
    const layerSel = select("layer-select", P.layers.map((l, i) => [i, `layer ${l}`]), (e) => { state.layer = +e.target.value; update(); });
    const headSel = select("head-select", P.heads.map((h, i) => [h === "mean" ? "mean" : h, h === "mean" ? "mean of heads" : `head ${h}`]),
      (e) => { state.head = e.target.value === "mean" ? 0 : +e.target.value + 1; update(); });
    const patchesAreQueries = P.cells.some((c, k) => c[0] >= 0 && qOf.has(k));
    const modeSel = select("patch-mode", [["key", "patch click: what attends to it"], ["query", "patch click: where it looks"]], () => {});
    if (!patchesAreQueries) modeSel.disabled = true;
    const controls = el("div", { class: "hlv-controls" });
    controls.append(layerSel, headSel, modeSel);
    const status = el("div", { class: "hlv-status", "data-testid": "selection" });
    const px = Math.min(576, Math.max(320, P.grid * 14));
    const img = imagePanel(P.image, P.grid, px);
    const imgLegend = legend("image", "image patches", true);
    const textLegend = legend("text", "text tokens");
    const strip = el("div", { class: "hlv-tokens" });
    const keyNodes = new Array(nKey).fill(null);
    for (let k = 0; k < nKey; k++) {
      const [r, c] = P.cells[k];
      if (r >= 0) { keyNodes[k] = img.cells[r][c]; continue; }
      const tok = el("span", { class: "hlv-token" + (qOf.has(k) ? " hlv-q" : ""), "data-testid": `token-${P.positions[k]}`, "data-key": k }, label(P.tokens[k]));
      strip.appendChild(tok);
      keyNodes[k] = tok;
    }
    // image positions collapse into one marker in the token strip
    const firstImage = P.cells.findIndex((c) => c[0] >= 0);
    if (firstImage >= 0) {
      const marker = el("span", { class: "hlv-imgrun" }, `[image: ${P.cells.filter((c) => c[0] >= 0).length} patches]`);
      const after = keyNodes.slice(firstImage).find((n) => n && n.classList.contains("hlv-token"));
      strip.insertBefore(marker, after || null);
    }
    for (let k = 0; k < nKey; k++) {
      const [r] = P.cells[k];
      keyNodes[k].addEventListener("click", () => {
        const asQuery = r < 0 ? qOf.has(k) : modeSel.value === "query" && qOf.has(k);
        state.mode = asQuery ? "query" : "key";
        state.at = k;
        update();
      });
    }
    const left = el("div", { class: "hlv-col" });
    left.append(img.box, imgLegend.box);
    const right = el("div", { class: "hlv-col hlv-wide" });
    right.append(strip, textLegend.box);
    const main = el("div", { class: "hlv-main" });
    main.append(left, right);
    body.append(controls, status, main, hoverLine(root));

    function update() {
      const values = new Array(nKey).fill(null);
      if (state.mode === "query") {
        const q = qOf.get(state.at);
        for (let k = 0; k < nKey; k++) values[k] = get(q, k);
      } else {
        for (const [k, q] of qOf) values[k] = get(q, state.at);
      }
      const isImage = (k) => P.cells[k][0] >= 0;
      const maxOf = (pred) => Math.max(0, ...values.filter((v, k) => v !== null && pred(k)));
      const imgMax = maxOf(isImage), textMax = maxOf((k) => !isImage(k));
      imgLegend.set(0, imgMax);
      textLegend.set(0, textMax);
      const verb = state.mode === "query" ? "attention from the selected query to" : "attention to the selected key from";
      for (let k = 0; k < nKey; k++) {
        const where = `position ${P.positions[k]} ${P.tokens[k]}`;
        setValue(keyNodes[k], values[k], isImage(k) ? imgMax : textMax, `${verb} ${where}`);
        keyNodes[k].classList.toggle("hlv-selected", k === state.at);
      }
      const headName = state.head === 0 ? "mean of heads" : `head ${state.head - 1}`;
      const hook = P.hook.replace("{l}", P.layers[state.layer]);
      status.textContent = `${state.mode === "query" ? "query" : "key"}: position ${P.positions[state.at]} ${P.tokens[state.at]} — ${hook}, ${headName}`;
      status.setAttribute("data-position", P.positions[state.at]);
      status.setAttribute("data-mode", state.mode);
    }
    update();
  };

  // ---- logit lens on the patches ------------------------------------------------------------
  H.lens = async function (root, P) {
    const body = root.querySelector(".hlv-body");
    body.textContent = "";
    let li = P.layers.length - 1;
    const name = (l) => (l === P.n_layers ? `readout ${l} (final resid_post)` : `readout ${l} (resid_pre ${l})`);
    const layerSel = select("layer-select", P.layers.map((l, i) => [i, name(l)]), (e) => { li = +e.target.value; update(); });
    layerSel.value = String(li);
    const px = Math.min(760, Math.max(400, P.grid * 56));
    const img = imagePanel(P.image, P.grid, px);
    const leg = legend("prob", "top-1 probability", true);
    leg.set(0, 1);
    const controls = el("div", { class: "hlv-controls" });
    controls.append(layerSel);
    body.append(controls, img.box, leg.box, hoverLine(root));
    function update() {
      for (let r = 0; r < P.grid; r++) {
        for (let c = 0; c < P.grid; c++) {
          const cell = img.cells[r][c], i = r * P.grid + c;
          const ids = P.ids[li][i], probs = P.probs[li][i];
          const top = P.vocab[ids[0]];
          cell.textContent = label(top);
          cell.classList.add("hlv-lens");
          cell.setAttribute("data-top-token", top);
          cell.setAttribute("data-prob", fmt(probs[0]));
          cell.style.background = dim(probs[0], 1);
          const lines = ids.map((id, j) => `${P.vocab[id]} ${fmt(probs[j])}`);
          const text = `patch (${r}, ${c}), ${name(P.layers[li])}: ` + lines.join(", ");
          cell.setAttribute("title", text);
          cell.setAttribute("data-hover", text);
        }
      }
    }
    update();
  };

  // ---- SAE / transcoder features ------------------------------------------------------------
  H.features = async function (root, P) {
    const A = await decode(P.acts);
    const [, nScene, width] = A.shape;
    const body = root.querySelector(".hlv-body");
    body.textContent = "";
    let fi = 0;
    const featSel = select("feature-select", P.features.map((f, i) => [i, `feature ${f}`]), (e) => { fi = +e.target.value; update(); });
    const controls = el("div", { class: "hlv-controls" });
    controls.append(featSel);
    const labelLine = el("div", { class: "hlv-status", "data-testid": "feature-label" });
    const leg = legend("feature", "activation", true);
    const row = el("div", { class: "hlv-scenes" });
    const px = Math.min(320, Math.max(160, P.grid * 12));
    const scenes = P.scenes.map((S, s) => {
      const box = el("div", { class: "hlv-scene", "data-testid": `scene-${s}` });
      const img = imagePanel(S.image, P.grid, px);
      const strip = el("div", { class: "hlv-tokens hlv-small", style: `max-width:${Math.max(px, 220)}px` });
      const nodes = S.cells.map(([r, c], i) => {
        if (r >= 0) return img.cells[r][c];
        const tok = el("span", { class: "hlv-token", "data-testid": `token-${S.positions[i]}` }, label(S.tokens[i]));
        strip.appendChild(tok);
        return tok;
      });
      box.append(el("div", { class: "hlv-cap" }, `scene ${s}`), img.box, strip);
      row.appendChild(box);
      return nodes;
    });
    const table = el("table", { class: "hlv-top", "data-testid": "top-list" });
    body.append(controls, labelLine, leg.box, row, table, hoverLine(root));
    function update() {
      const at = (s, i) => A.at((fi * nScene + s) * width + i);
      let max = 0;
      P.scenes.forEach((S, s) => S.positions.forEach((p, i) => { max = Math.max(max, at(s, i)); }));
      leg.set(0, max);
      P.scenes.forEach((S, s) => S.positions.forEach((p, i) => {
        setValue(scenes[s][i], at(s, i), max, `scene ${s}, position ${p} ${S.tokens[i]}: feature ${P.features[fi]}`);
      }));
      const lab = P.labels[fi];
      labelLine.textContent = lab
        ? `feature ${P.features[fi]} at ${P.hook}: ground truth ${lab.attribute} (precision ${fmt(lab.precision)}, recall ${fmt(lab.recall)} on these ${nScene} scenes)`
        : `feature ${P.features[fi]} at ${P.hook}: no ground-truth label (not active on these scenes' patches, or not Shapes scenes)`;
      labelLine.setAttribute("data-attribute", lab ? lab.attribute : "");
      table.textContent = "";
      const head = el("tr");
      for (const h of ["scene", "position", "token / patch", "activation"]) head.appendChild(el("th", {}, h));
      table.appendChild(head);
      for (const t of P.top[fi]) {
        const tr = el("tr", { "data-scene": t.scene, "data-position": t.position });
        const where = t.r >= 0 ? `patch (${t.r}, ${t.c})` : label(t.token);
        for (const v of [t.scene, t.position, where, fmt(t.value)]) tr.appendChild(el("td", {}, String(v)));
        table.appendChild(tr);
      }
    }
    update();
  };

  H.renderAll = function () {
    document.querySelectorAll(".hlv-root:not([data-ready])").forEach((root) => {
      root.setAttribute("data-ready", "pending");
      const P = JSON.parse(document.getElementById(root.id + "-data").textContent);
      H[root.dataset.kind](root, P)
        .then(() => root.setAttribute("data-ready", "1"))
        .catch((e) => {
          root.setAttribute("data-ready", "error");
          root.querySelector(".hlv-body").textContent = "explorer error: " + e;
          console.error(e);
        });
    });
  };
  H.renderAll();
})();
