/* The GPU catalogue, sortable by any column (click or Enter on its heading; aria-sort says how). */
"use strict";
(() => {
  const { api, el, $, bytes, num } = TP;
  const table = $("#gpus"), body = $("#gpus tbody");
  let rows = [];
  let sort = { key: "name", dir: 1 };

  function value(gpu, key) {
    if (key in (gpu.tflops || {})) return gpu.tflops[key];
    return gpu[key];
  }

  function render() {
    const { key, dir } = sort;
    const type = table.querySelector(`th[data-key="${key}"]`).dataset.type;
    const sorted = [...rows].sort((a, b) => {
      const x = value(a, key), y = value(b, key);
      if (x == null) return 1;
      if (y == null) return -1;
      return dir * (type === "num" ? x - y : String(x).localeCompare(String(y)));
    });
    body.replaceChildren(...sorted.map((g) => el("tr", {},
      el("th", { scope: "row" }, g.name),
      el("td", { class: "num" }, bytes(g.memory_bytes)),
      ...["bf16", "fp16", "tf32", "fp32"].map((p) => el("td", { class: "num" }, g.tflops[p] == null ? "—" : num(g.tflops[p]))),
      el("td", { class: "num" }, num(g.bandwidth_gbs, 4)),
      el("td", {}, `${g.architecture} (${g.compute_capability})`))));
    for (const th of table.querySelectorAll("th[data-key]")) {
      th.setAttribute("aria-sort", th.dataset.key === key ? (dir > 0 ? "ascending" : "descending") : "none");
    }
  }

  for (const th of table.querySelectorAll("th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      sort = { key: th.dataset.key, dir: sort.key === th.dataset.key ? -sort.dir : (th.dataset.type === "num" ? -1 : 1) };
      render();
    });
  }
  api("/v1/gpus").then(({ data }) => { rows = data.items; render(); })
    .catch((err) => body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "error" }, err.message))));
})();
