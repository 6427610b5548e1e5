/* New plan: start from an example, edit the JSON, submit. The API's 422 is shown at the field it
   names: its line is marked in the gutter and the field is selected in the editor. */
"use strict";
(() => {
  const { api, el, $, fieldPath } = TP;
  const examples = JSON.parse($("#examples").textContent);
  const editor = $("#spec"), gutter = $("#gutter"), errors = $("#spec-errors");
  let marks = new Map(); // line number -> message

  function lineOf(offset) { return editor.value.slice(0, offset).split("\n").length; }

  function paintGutter() {
    const count = editor.value.split("\n").length;
    const lines = [];
    for (let n = 1; n <= count; n++) {
      lines.push(marks.has(n) ? el("span", { class: "bad", title: marks.get(n) }, String(n)) : String(n), "\n");
    }
    gutter.replaceChildren(...lines);
    gutter.scrollTop = editor.scrollTop;
  }

  /* Where a path (["model", "layers", 2, "kernel_size"]) is in the JSON text: the key, or for an
     array item the item; a path that is not there (a missing field) lands on its deepest parent. */
  function locate(text, path) {
    let i = 0, best = { start: 0, end: 0 };
    const ws = () => { while (i < text.length && " \t\r\n".includes(text[i])) i++; };
    const skipString = () => { i++; while (i < text.length && text[i] !== '"') { if (text[i] === "\\") i++; i++; } i++; };
    function skipValue() {
      ws();
      const c = text[i];
      if (c === '"') return skipString();
      if (c === "{" || c === "[") {
        let depth = 0;
        do {
          const d = text[i];
          if (d === '"') { skipString(); continue; }
          if (d === "{" || d === "[") depth++;
          else if (d === "}" || d === "]") depth--;
          i++;
        } while (depth > 0 && i < text.length);
        return;
      }
      while (i < text.length && !",}] \t\r\n".includes(text[i])) i++;
    }
    function walk(rest) {
      ws();
      if (!rest.length) return;
      const c = text[i];
      if (c === "{" && typeof rest[0] === "string") {
        i++;
        for (;;) {
          ws();
          if (text[i] !== '"') return;
          const keyStart = i;
          skipString();
          const keyEnd = i;
          let key = null;
          try { key = JSON.parse(text.slice(keyStart, keyEnd)); } catch { return; }
          ws(); i++; // the colon
          if (key === rest[0]) { best = { start: keyStart, end: keyEnd }; return walk(rest.slice(1)); }
          skipValue(); ws();
          if (text[i] !== ",") return;
          i++;
        }
      }
      if (c === "[" && typeof rest[0] === "number") {
        i++;
        for (let index = 0; ; index++) {
          ws();
          if (text[i] === "]") return;
          if (index === rest[0]) {
            const start = i; skipValue(); best = { start, end: i }; i = start;
            return walk(rest.slice(1));
          }
          skipValue(); ws();
          if (text[i] !== ",") return;
          i++;
        }
      }
    }
    try { walk(path); } catch { /* a half-typed spec: keep what was found */ }
    return best;
  }

  function select(range) {
    editor.focus();
    editor.setSelectionRange(range.start, range.end);
    const line = lineOf(range.start);
    const lineHeight = parseFloat(getComputedStyle(editor).lineHeight) || 18;
    editor.scrollTop = Math.max(0, (line - 4) * lineHeight);
    paintGutter();
  }

  function showErrors(list, title) {
    marks = new Map();
    const items = list.map((e) => {
      const range = e.range || { start: 0, end: 0 };
      const line = lineOf(range.start);
      marks.set(line, [marks.get(line), e.msg].filter(Boolean).join("; "));
      return el("li", { "data-field": e.field, "data-line": String(line) },
        el("button", { type: "button", class: "link field", onclick: () => select(range) }, e.field || "spec"),
        ` (line ${line}): ${e.msg}`);
    });
    errors.replaceChildren(el("div", { class: "error" }, el("strong", {}, title), el("ul", {}, items)));
    paintGutter();
    if (list[0]?.range) select(list[0].range);
  }

  function clearErrors() { marks = new Map(); errors.replaceChildren(); paintGutter(); }

  function load(name) {
    editor.value = JSON.stringify(examples[name], null, 2);
    clearErrors();
    editor.focus();
    editor.setSelectionRange(0, 0);
    editor.scrollTop = 0;
  }

  function parsed() {
    try {
      return JSON.parse(editor.value);
    } catch (err) {
      const at = /position (\d+)/.exec(err.message);
      const lc = /line (\d+) column (\d+)/.exec(err.message);
      let start = at ? Number(at[1]) : 0;
      if (!at && lc) {
        const lines = editor.value.split("\n").slice(0, Number(lc[1]) - 1);
        start = lines.reduce((n, l) => n + l.length + 1, 0) + Number(lc[2]) - 1;
      }
      showErrors([{ field: "", msg: err.message, range: { start, end: start + 1 } }], "Not valid JSON");
      return undefined;
    }
  }

  async function submit() {
    const spec = parsed();
    if (spec === undefined) return;
    if ($("#refresh").checked && spec && typeof spec === "object") spec.refresh = true;
    const button = $("#submit");
    button.disabled = true;
    try {
      const { data } = await api("/v1/plans", { method: "POST", body: spec });
      location.assign(`/plans/${data.id}`);
    } catch (err) {
      button.disabled = false;
      const problem = err.problem || {};
      if (err.status === 422 && Array.isArray(problem.errors)) {
        const list = problem.errors.map((e) => {
          const path = (e.loc || []).filter((p, i) => !(i === 0 && p === "body"));
          return { field: fieldPath(e.loc), msg: e.msg, range: locate(editor.value, path) };
        });
        showErrors(list, problem.title || "The spec is invalid");
      } else {
        showErrors([{ field: "", msg: err.message }], `Not submitted (HTTP ${err.status})`);
      }
    }
  }

  for (const button of document.querySelectorAll("button.example")) {
    button.addEventListener("click", () => load(button.dataset.example));
  }
  $("#format").addEventListener("click", () => { const v = parsed(); if (v !== undefined) { editor.value = JSON.stringify(v, null, 2); clearErrors(); } });
  $("#submit").addEventListener("click", submit);
  editor.addEventListener("input", () => { if (marks.size) { marks = new Map(); } paintGutter(); });
  editor.addEventListener("scroll", () => { gutter.scrollTop = editor.scrollTop; });
  editor.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") { event.preventDefault(); submit(); }
  });
  // The default example only where nothing was typed yet (a fast typist, or the browser
  // restoring the field, must not lose their text to it).
  if (!editor.value.trim()) load(Object.keys(examples)[1] || Object.keys(examples)[0]);
  else paintGutter();
})();
