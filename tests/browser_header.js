// Runs the browser's app.js against a minimal stand-in DOM; prints #run-info and the summary chips as JSON.
// Used by tests/test_browser_data.py where no Chromium is installed (the Chromium test covers the real page).
const fs = require("fs"), vm = require("vm");
const [appPath, dataPath] = process.argv.slice(2);
class Node {
  constructor(tag) { this.tag = tag; this.children = []; this._text = ""; this.options = []; this.classList = {toggle() {}, add() {}, remove() {}};
                     this.dataset = {}; this.style = {}; }
  set textContent(v) { this._text = String(v); this.children = []; }
  get textContent() { return this._text + this.children.map((c) => c.textContent).join(""); }
  append(...cs) { this.children.push(...cs); }
  replaceChildren(...cs) { this.children = cs; this._text = ""; }
  setAttribute(k, v) { this[k] = v; }
  addEventListener() {}
  querySelectorAll() { return []; }
  getBoundingClientRect() { return {top: 0}; }
  scrollIntoView() {}
}
const byId = {};
const document = {
  getElementById(id) {
    if (id === "page-data") return {textContent: fs.readFileSync(dataPath, "utf8")};
    return byId[id] || (byId[id] = new Node("#" + id));
  },
  createElement: (t) => new Node(t), createTextNode: (t) => { const n = new Node("#text"); n._text = String(t); return n; },
  querySelectorAll: () => [],
};
const context = {document, Node, window: {addEventListener() {}}, location: {hash: ""}, console};
vm.createContext(context);
try { vm.runInContext(fs.readFileSync(appPath, "utf8"), context); } catch (e) { /* the list and routes need more DOM */ }
const chips = [];
const walk = (n) => { if (n.className === "chip") chips.push(n.textContent); (n.children || []).forEach(walk); };
walk(byId["summary"] || new Node("x"));
console.log(JSON.stringify({header: (byId["run-info"] || {}).textContent, chips}));
