/* The plans list: filters and cursor paging kept in the URL (so a view can be linked), and the
   live status of queued and running plans, re-read every 2 s while the page shows any. */
"use strict";
(() => {
  const { api, el, $, badge, int, when } = TP;
  const params = new URLSearchParams(location.search);
  const trail = (params.get("trail") || "").split(",").filter(Boolean); // cursors of earlier pages
  const form = $("#filters"), body = $("#plans tbody"), note = $("#plans-status");
  $("#status-filter").value = params.get("status") || "";
  $("#model-filter").value = params.get("model") || "";
  let timer = null;

  function query(extra = {}) {
    const q = new URLSearchParams();
    for (const key of ["status", "model", "cursor", "limit"]) {
      const value = key in extra ? extra[key] : params.get(key);
      if (value) q.set(key, value);
    }
    if (extra.trail !== undefined ? extra.trail : trail.length) q.set("trail", extra.trail ?? trail.join(","));
    return q;
  }

  function row(plan) {
    return el("tr", { "data-id": plan.id, "data-status": plan.status },
      el("td", {}, el("a", { href: `/plans/${plan.id}`, class: "mono" }, plan.id.slice(0, 8))),
      el("td", {}, plan.model),
      el("td", {}, badge(plan.status)),
      el("td", { class: "num" }, int(plan.max_micro_batch_size)),
      el("td", { title: plan.created_at }, when(plan.created_at)));
  }

  async function load() {
    const q = query();
    q.delete("trail");
    q.set("limit", /^\d{1,3}$/.test(params.get("limit") || "") ? params.get("limit") : "25");
    try {
      const { data } = await api(`/v1/plans?${q}`);
      body.replaceChildren(...data.items.map(row));
      const seen = new Set([...document.querySelectorAll("#models option")].map((o) => o.value));
      for (const plan of data.items) {  // the filter suggests the models seen so far (exact match)
        if (!seen.has(plan.model)) { seen.add(plan.model); $("#models").append(el("option", { value: plan.model })); }
      }
      if (!data.items.length) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No plans here yet.")));
      note.textContent = "";
      $("#older").disabled = !data.next_cursor;
      $("#older").dataset.cursor = data.next_cursor || "";
      $("#newest").disabled = !params.get("cursor");
      const live = data.items.some((p) => p.status === "queued" || p.status === "running");
      clearTimeout(timer);
      if (live) timer = setTimeout(load, 2000);
    } catch (err) {
      note.textContent = `Could not load plans: ${err.message}`;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const q = new URLSearchParams();
    const status = $("#status-filter").value, model = $("#model-filter").value.trim();
    if (status) q.set("status", status);
    if (model) q.set("model", model);
    location.assign(`/?${q}`);
  });
  $("#older").addEventListener("click", () => {
    const current = params.get("cursor") || "";
    location.assign(`/?${query({ cursor: $("#older").dataset.cursor, trail: [...trail, current || "0"].join(",") })}`);
  });
  $("#newest").addEventListener("click", () => location.assign(`/?${query({ cursor: "", trail: "" })}`));
  load();
})();
