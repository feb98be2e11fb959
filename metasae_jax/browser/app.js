// MetaSAE latent browser: renders the inlined page data. Routes: #joint/ID, #solo/ID, #splits, #splits/I.
// Token text is only ever set through textContent, so tokens such as "<script>" show as text.
"use strict";

const DATA = JSON.parse(document.getElementById("page-data").textContent);
const SAES = ["joint", "solo"];
const state = {listSae: "joint", search: "", sort: "frequency"};
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return String(Number(x.toPrecision(digits)));
}
const pct = (x) => (x === null || x === undefined) ? "–" : fmt(100 * x) + " %";
const other = (sae) => sae === "joint" ? "solo" : "joint";
const latent = (sae, id) => DATA.saes[sae].latents[String(id)];
const hasScores = SAES.some((s) => Object.values(DATA.saes[s].latents).some((l) => l.fuzz_spearman !== undefined));

function latentLink(sae, id, cls) {
  const known = latent(sae, id) !== undefined;
  const label = [el("span", {class: "badge " + sae, text: sae}), " #" + id];
  return known ? el("a", {href: `#${sae}/${id}`, class: cls, "data-sae": sae, "data-id": id}, label)
               : el("span", {class: "muted", title: "not included in this page (raise --num_latents)"}, label);
}

// ---- header and summary ----
function renderHeader() {
  const m = DATA.meta;
  $("run-title").textContent = "· " + DATA.title;
  const src = m.source || {};
  $("run-info").textContent = [
    `model ${src.model || "?"}, layer ${src.layer ?? "?"} ${src.site || ""}`,
    `${m.num_tokens.toLocaleString()} held-out tokens streamed for this page ` +
      (m.skip_first_positions > 0 ? `(its examples leave out the first ${m.skip_first_positions} position(s) of each context)`
                                  : "(every position)"),
    `firing: joint ${m.firing_rule.joint}, solo ${m.firing_rule.solo}`,
    `width ${m.widths.joint} / ${m.widths.solo}`,
  ].join(" · ");
}

function renderSummary() {
  const s = DATA.summary, box = $("summary");
  if (!s) { box.append(el("p", {class: "muted", text: "No report.json yet: run experiments.evaluate for the summary."})); return; }
  const lowerIsBetter = new Set(["fvu", "mse", "dead_fraction", "mean_abs_phi", "meta_fve", "delta_ce_pct"]);
  const higherIsBetter = new Set(["ce_recovered", "autointerp fuzz_spearman", "autointerp fuzz_balanced_accuracy"]);
  const rows = s.rows.map(([key, j, so]) => {
    let rel = "–", cls = null;
    if (typeof j === "number" && typeof so === "number" && so !== 0) {
      const d = (j - so) / Math.abs(so);
      rel = (d >= 0 ? "+" : "") + fmt(100 * d) + " %";
      if (lowerIsBetter.has(key)) cls = d < 0 ? "better" : d > 0 ? "worse" : null;
      if (higherIsBetter.has(key)) cls = d > 0 ? "better" : d < 0 ? "worse" : null;
    }
    return el("tr", {}, el("td", {text: key}), el("td", {text: fmt(j, 4)}), el("td", {text: fmt(so, 4)}),
              el("td", {class: cls, text: rel}));
  });
  box.append(el("table", {id: "summary-table"},
    el("thead", {}, el("tr", {}, el("th", {text: "metric"}), el("th", {text: "joint"}), el("th", {text: "solo"}),
                    el("th", {text: "joint vs solo"}))),
    el("tbody", {}, rows)));
  const chips = [];
  const c = s.comparison || {}, mt = s.matching || {}, info = s.info || {};
  if (info.num_tokens !== undefined && info.num_tokens !== null) {
    chips.push(`evaluation: ${info.num_tokens.toLocaleString()} tokens, ${info.skip || "positions as recorded in report.json"}`);
  }
  if (c.welch_p !== undefined) chips.push(`mean |φ| Welch p = ${fmt(c.welch_p)}`);
  if (mt.num_pairs !== undefined) chips.push(`${mt.num_pairs} matched pairs, mean decoder cos ${fmt(mt.mean_cosine)}`);
  if (mt["fraction_cosine_above_0.9"] !== undefined) chips.push(`cos > 0.9: ${pct(mt["fraction_cosine_above_0.9"])}`);
  if (mt.num_solo_latents_shared_by_2plus !== undefined) chips.push(`${mt.num_solo_latents_shared_by_2plus} solo latents shared by ≥ 2 joint latents`);
  if (DATA.meta.autointerp_llm) chips.push(`autointerp LLM: ${DATA.meta.autointerp_llm}`);
  for (const n of s.notes || []) chips.push(n);
  box.append(el("div", {class: "chips"}, chips.map((t) => el("span", {class: "chip", text: t}))));
}

// ---- latent list ----
function sortedLatents() {
  const q = state.search.trim().toLowerCase();
  let items = Object.values(DATA.saes[state.listSae].latents);
  if (q) {
    items = items.filter((l) => String(l.id) === q.replace(/^#/, "") ||
                                (l.explanation || "").toLowerCase().includes(q));
  }
  const key = state.sort;
  const val = (l) => key === "id" ? -l.id : (l[key] ?? -Infinity);
  return items.sort((a, b) => val(b) - val(a) || a.id - b.id);
}

function renderList() {
  for (const b of document.querySelectorAll(".sae-switch button")) b.classList.toggle("active", b.dataset.sae === state.listSae);
  const items = sortedLatents(), list = $("latent-list");
  list.replaceChildren(...items.map((l) => el("li", {"data-sae": state.listSae, "data-id": l.id},
    el("a", {href: `#${state.listSae}/${l.id}`},
      el("div", {class: "row"}, el("span", {class: "lid", text: "#" + l.id}),
         el("span", {class: "num", text: pct(l.frequency)}),
         l.fuzz_spearman !== undefined ? el("span", {class: "num", text: "ρ " + fmt(l.fuzz_spearman, 2)}) : null),
      l.explanation ? el("div", {class: "expl", text: l.explanation}) : null))));
  const total = Object.keys(DATA.saes[state.listSae].latents).length;
  $("list-count").textContent = `${items.length} of ${total} ${state.listSae} latents on this page (width ${DATA.saes[state.listSae].width})`;
  markSelected();
}

function markSelected() {
  const [sae, id] = location.hash.slice(1).split("/");
  for (const li of $("latent-list").children) li.classList.toggle("selected", li.dataset.sae === sae && li.dataset.id === id);
}

// ---- contexts and histogram ----
function shownText(piece) { return piece.replace(/\n/g, "↵").replace(/\t/g, "⇥"); }

function contextRow(ctx, maxAct) {
  const toks = el("span", {class: "toks"});
  ctx.tokens.forEach((t, i) => {
    const a = ctx.acts[i] || 0;
    const span = el("span", {class: "tok" + (i === ctx.focus ? " focus" : ""), title: `${JSON.stringify(DATA.vocab[t] ?? "")} · ${fmt(a)}`});
    span.textContent = shownText(DATA.vocab[t] ?? "?");
    if (a > 0) span.style.background = `rgba(var(--hot), ${Math.min(1, 0.06 + 0.94 * a / (maxAct || 1)).toFixed(3)})`;
    toks.append(span);
  });
  return el("div", {class: "ctx"}, el("span", {class: "val", text: fmt(ctx.acts[ctx.focus])}), toks);
}

function contextList(contexts, maxAct, limit, emptyText) {
  const shown = limit ? contexts.slice(0, limit) : contexts;
  if (!shown.length) return el("p", {class: "empty", text: emptyText || "no firing tokens in the streamed text"});
  return el("div", {class: "contexts"}, shown.map((c) => contextRow(c, maxAct)));
}

function histogram(h) {
  const W = 420, H = 110, pad = 22, n = h.counts.length, top = Math.max(1, ...h.counts);
  const NS = "http://www.w3.org/2000/svg", svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("role", "img");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node); return node;
  };
  const bw = (W - 2 * pad) / n;
  h.counts.forEach((c, i) => {
    const bh = (H - 2 * pad) * c / top;
    add("rect", {x: pad + i * bw + 0.5, y: H - pad - bh, width: Math.max(1, bw - 1), height: bh})
      .append(Object.assign(document.createElementNS(NS, "title"), {textContent: `${c} sampled firings`}));
  });
  add("line", {x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, stroke: "#d0d7de"});
  add("text", {x: pad, y: H - 6}, "0");
  add("text", {x: W - pad, y: H - 6, "text-anchor": "end"}, fmt(h.hi));
  add("text", {x: W / 2, y: H - 6, "text-anchor": "middle"}, "activation");
  add("text", {x: pad, y: 12}, `max bin ${top}`);
  return el("div", {class: "hist"}, svg,
            el("div", {class: "muted", text: `Activation histogram of a uniform sample of ${h.sampled} firings`}));
}

// ---- latent view ----
function renderLatent(sae, id) {
  const view = $("latent-view"), l = latent(sae, id);
  if (!l) { view.replaceChildren(el("p", {class: "empty", text: `${sae} latent ${id} is not on this page.`})); return; }
  const stats = el("div", {class: "stats"},
    el("span", {text: `fires on ${pct(l.frequency)} of tokens (${l.count.toLocaleString()}×)`}),
    el("span", {text: `max activation ${fmt(l.max_act)}`}),
    l.partner !== null && l.partner !== undefined
      ? el("span", {}, "matched ", latentLink(other(sae), l.partner, "partner-link"), ` (decoder cos ${fmt(l.partner_cosine)})`)
      : el("span", {text: "no matched partner"}));
  const parts = [el("h2", {}, el("span", {class: "badge " + sae, text: sae}), ` latent #${l.id}`), stats];
  if (l.explanation !== undefined) {
    parts.push(el("div", {class: "explanation"}, el("div", {class: "expl-text", text: l.explanation}),
      el("div", {class: "scores", text: `fuzz Spearman ρ ${fmt(l.fuzz_spearman)} · fuzz balanced accuracy ${fmt(l.fuzz_balanced_accuracy)}`})));
  } else if (hasScores) {
    parts.push(el("p", {class: "muted", text: "Not scored by autointerp."}));
  }
  parts.push(histogram(l.histogram), el("h3", {text: "Top activations"}), contextList(l.top, l.max_act));
  parts.push(el("h3", {text: "Samples across the firing distribution"}));
  for (const q of l.quantiles) {
    parts.push(el("h4", {text: `${q.label} (activation ${fmt(q.lo)} – ${fmt(q.hi)})`}), contextList(q.contexts, l.max_act, 0,
      q.lo === null ? "no firings sampled" : "all sampled firings of this range are among the top activations above"));
  }
  view.replaceChildren(...parts);
  view.dataset.sae = sae; view.dataset.id = id;
}

// ---- splits ----
function renderSplitList() {
  const list = $("split-list");
  if (!DATA.splits.length) { list.replaceChildren(el("li", {class: "empty", text: "No split candidates (run experiments.evaluate)."})); return; }
  list.replaceChildren(...DATA.splits.map((s, i) => el("li", {"data-index": i},
    el("a", {href: `#splits/${i}`},
      el("div", {class: "row"}, el("span", {class: "lid", text: "solo #" + s.solo_latent}),
         el("span", {class: "num", text: "→ " + s.joint_partners.map((p) => "#" + p.joint_latent).join(", ")})),
      el("div", {class: "expl", text: `coverage ${pct(s.coverage)} · fires on ${pct(s.solo_frequency)}`})))));
}

function splitColumn(sae, id, note) {
  const l = latent(sae, id);
  const col = el("div", {class: "split-col", "data-sae": sae, "data-id": id}, el("h4", {}, latentLink(sae, id), note ? " " + note : ""));
  if (!l) return col;
  col.append(el("div", {class: "muted", text: `fires on ${pct(l.frequency)} · max ${fmt(l.max_act)}`}));
  if (l.explanation) col.append(el("div", {class: "expl-text", text: l.explanation}));
  col.append(contextList(l.top, l.max_act, 6));
  return col;
}

function renderSplit(i) {
  const view = $("split-view"), s = DATA.splits[i];
  for (const li of $("split-list").children) li.classList.toggle("selected", li.dataset.index === String(i));
  if (!s) { view.replaceChildren(el("p", {class: "muted", text: DATA.splits.length ? "Pick a split candidate on the left." : ""})); return; }
  const head = el("div", {class: "stats"},
    el("span", {text: `coverage ${pct(s.coverage)} of the solo latent's firings by its joint partners`}),
    s.matched_joint_latent !== null && s.matched_joint_latent !== undefined
      ? el("span", {}, "decoder match ", latentLink("joint", s.matched_joint_latent), ` (cos ${fmt(s.matched_cosine)})`) : null);
  const cols = [splitColumn("solo", s.solo_latent, "")].concat(
    s.joint_partners.map((p) => splitColumn("joint", p.joint_latent, `cross-φ ${fmt(p.cross_phi)}`)));
  view.replaceChildren(el("h2", {text: `Split candidate: solo #${s.solo_latent}`}), head, el("div", {class: "split-cols"}, cols));
}

// ---- routing ----
function route() {
  const [a, b] = location.hash.slice(1).split("/");
  const splits = a === "splits";
  $("latents-pane").hidden = splits; $("splits-pane").hidden = !splits;
  $("tab-latents").classList.toggle("active", !splits); $("tab-splits").classList.toggle("active", splits);
  if (splits) { renderSplit(b === undefined ? 0 : Number(b)); return; }
  if (SAES.includes(a) && b !== undefined) {
    if (state.listSae !== a) { state.listSae = a; renderList(); }
    renderLatent(a, b); markSelected();
    return;
  }
  const first = sortedLatents()[0];
  if (first) renderLatent(state.listSae, first.id);
}

function init() {
  renderHeader(); renderSummary();
  if (!hasScores) for (const o of $("sort").options) if (o.value.startsWith("fuzz")) o.disabled = true;
  for (const b of document.querySelectorAll(".sae-switch button")) {
    b.addEventListener("click", () => { state.listSae = b.dataset.sae; renderList(); });
  }
  $("search").addEventListener("input", (e) => { state.search = e.target.value; renderList(); });
  $("sort").addEventListener("change", (e) => { state.sort = e.target.value; renderList(); });
  renderList(); renderSplitList();
  window.addEventListener("hashchange", () => {
    route();
    const view = location.hash.startsWith("#splits") ? $("split-view") : $("latent-view");
    if (view.getBoundingClientRect().top < 0) view.scrollIntoView({block: "start"});
  });
  route();
}

init();
