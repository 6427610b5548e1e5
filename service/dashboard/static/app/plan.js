/* One plan: summary, peak memory against batch size (every trial; the card's capacity and the
   headroom limit as lines; the answer and answer + 1 marked), the memory breakdown stacked, the
   what-ifs against the plan, warnings, configs, its completion webhooks, the spec. A queued or
   running plan follows its
   event stream trial by trial and can be cancelled. Charts keep fixed boxes: nothing moves while
   trials stream in. */
"use strict";
(() => {
  const { api, el, $, bytes, bytesText, int, num, when, copy, download, GiB } = TP;
  const root = $("#plan"), planId = root.dataset.planId;
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const COLORS = { fit: "#1a7f37", oom: "#cf222e", capacity: "#1b1f24", limit: "#9a6700", answer: "#1f4e79" };
  const PARTS = [
    ["parameters", "Parameters", "#1f4e79"], ["gradients", "Gradients", "#3b7dbf"],
    ["optimizer_state", "Optimizer state", "#7aa6d6"], ["adapter_parameters", "Adapters (LoRA)", "#9ecae1"],
    ["gathered_parameters", "Gathered parameters", "#6a51a3"], ["input_batch", "Input batch", "#e6550d"],
    ["activations", "Activations", "#fd8d3c"], ["temporary", "Temporaries", "#fdae6b"],
    ["workspace", "cuBLAS workspace", "#a1d99b"], ["communication", "Communication buckets", "#31a354"],
    ["overhead", "CUDA context + NCCL", "#636363"],
  ];
  const charts = (window.trainplanCharts = {}); // the browser tests read these
  window.trainplanTrialEvents = 0;
  let plan = null, trials = new Map(), capacity = null, headroom = 0, stream = null;

  Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
  Chart.defaults.animation = false;

  // -- the memory chart: one point per trial -------------------------------------------------
  function memoryChart() {
    const line = (label, color, dash) => ({ label, type: "line", data: [], borderColor: color, borderDash: dash,
      borderWidth: 1.5, pointRadius: 0, pointHitRadius: 0, showLine: true, fill: false });
    charts.memory = new Chart($("#memory-chart"), {
      type: "scatter",
      data: { datasets: [
        { label: "fits", data: [], backgroundColor: COLORS.fit, borderColor: COLORS.fit, pointStyle: "circle", pointRadius: 5 },
        { label: "out of memory", data: [], backgroundColor: COLORS.oom, borderColor: COLORS.oom, pointStyle: "crossRot", pointRadius: 7, borderWidth: 2 },
        line("capacity", COLORS.capacity, []),
        line("headroom limit", COLORS.limit, [6, 4]),
        { label: "answer (max micro-batch)", data: [], pointStyle: "rectRot", pointRadius: 11, borderColor: COLORS.answer, borderWidth: 2, backgroundColor: "transparent" },
        { label: "answer + 1", data: [], pointStyle: "rect", pointRadius: 10, borderColor: COLORS.oom, borderWidth: 2, backgroundColor: "transparent" },
      ] },
      options: {
        maintainAspectRatio: false,
        scales: {
          x: { type: "logarithmic", title: { display: true, text: "micro-batch size (log scale)" },
            ticks: { callback: logTick } },
          y: { beginAtZero: true, title: { display: true, text: "peak memory (GiB)" } },
        },
        plugins: {
          legend: { position: "bottom" },
          tooltip: { callbacks: { label: (ctx) => {
            const p = ctx.raw;
            if (p.bytes === undefined) return `${ctx.dataset.label}: ${bytesText(p.y * GiB)}`;
            return `batch ${int(p.x)}: ${bytesText(p.bytes)} (${Number(p.bytes).toLocaleString("en-US")} bytes), ${p.fits ? "fits" : "OOM"}`;
          } } },
        },
      },
    });
  }

  // A log axis labels its decades; over less than one (batches 1-3) every whole batch instead.
  function logTick(value) {
    const { min, max } = this.chart.scales.x;
    if (!Number.isInteger(value)) return "";
    if (max / Math.max(min, 1) < 20) return int(value);
    const mantissa = value / 10 ** Math.floor(Math.log10(value));
    return mantissa === 1 || mantissa === 2 || mantissa === 5 ? int(value) : "";
  }

  // -- the answer and answer + 1 on a linear axis: on the log chart they sit on one spot ------
  function answerChart() {
    charts.answer = new Chart($("#answer-chart"), {
      type: "scatter",
      data: { datasets: [
        { label: "answer (fits)", data: [], pointStyle: "rectRot", pointRadius: 9, borderColor: COLORS.answer, backgroundColor: COLORS.fit, borderWidth: 2 },
        { label: "answer + 1 (out of memory)", data: [], pointStyle: "crossRot", pointRadius: 9, borderColor: COLORS.oom, backgroundColor: COLORS.oom, borderWidth: 2 },
        { label: "headroom limit", type: "line", data: [], borderColor: COLORS.limit, borderDash: [6, 4], borderWidth: 1.5, pointRadius: 0, showLine: true, fill: false },
      ] },
      options: {
        maintainAspectRatio: false,
        scales: { x: { type: "linear", ticks: { stepSize: 1, callback: (v) => (Number.isInteger(v) ? int(v) : "") }, title: { display: true, text: "micro-batch size" } },
          y: { title: { display: true, text: "GiB" } } },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } },
          tooltip: { callbacks: { label: (ctx) => (ctx.raw.bytes === undefined ? ctx.dataset.label : `batch ${int(ctx.raw.x)}: ${bytesText(ctx.raw.bytes)}`) } } },
      },
    });
  }

  function drawAnswer(list, best, limitBytes) {
    const point = (t) => ({ x: t.batch_size, y: t.peak_bytes / GiB, bytes: t.peak_bytes });
    const at = (b) => list.filter((t) => t.batch_size === b && t.phase !== "breakdown").slice(-1).map(point);
    const [answer, next, limit] = charts.answer.data.datasets;
    answer.data = best ? at(best) : [];
    next.data = best ? at(best + 1) : [];
    const lo = Math.max(1, (best || 1) - 1), hi = (best || 1) + 2;
    charts.answer.options.scales.x.min = lo;
    charts.answer.options.scales.x.max = hi;
    limit.data = best && limitBytes ? [{ x: lo, y: limitBytes / GiB }, { x: hi, y: limitBytes / GiB }] : [];
    charts.answer.update("none");
    $("#answer-note").textContent = !best ? "" : next.data.length
      ? `${int(best)} fits, ${int(best + 1)} does not`
      : `${int(best)} fits (the search bound)`;
  }

  // The chance each probed micro-batch runs out of memory (log axes: from one in a million).
  const RISK_FLOOR = 1e-6;
  function riskChart(result) {
    const risk = result.risk;
    $("#risk-h").hidden = $("#risk-chart-box").hidden = !risk;
    charts.risk?.destroy();
    charts.risk = undefined;
    if (!risk) return;
    const points = risk.by_micro_batch.map((q) => ({ x: q.micro_batch, y: 100 * Math.max(RISK_FLOOR, q.oom_probability), p: q.oom_probability }));
    charts.risk = new Chart($("#risk-chart"), {
      type: "line",
      data: { datasets: [
        { label: "chance of running out of memory", data: points, borderColor: COLORS.oom, backgroundColor: COLORS.oom, pointRadius: 3, tension: 0 },
        { label: "recommended micro-batch", type: "scatter", data: points.filter((q) => q.x === result.micro_batch_size), pointStyle: "rectRot", pointRadius: 8, borderColor: COLORS.answer, backgroundColor: COLORS.fit, borderWidth: 2 },
      ] },
      options: {
        maintainAspectRatio: false,
        scales: { x: { type: "logarithmic", title: { display: true, text: "micro-batch size (log scale)" }, ticks: { callback: logTick } },
          y: { type: "logarithmic", min: 100 * RISK_FLOOR, max: 100, title: { display: true, text: "chance" },
            ticks: { callback: (v) => (Number.isInteger(Math.log10(v)) && Math.log10(v) % 2 === 0 ? `${v >= 1 ? v : v.toPrecision(1)}%` : "") } } },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } },
          tooltip: { callbacks: { label: (ctx) => `batch ${int(ctx.raw.x)}: ${percent(ctx.raw.p)}` } } },
      },
    });
    $("#risk-note").textContent = `${percent(risk.oom_probability)} at ${int(result.micro_batch_size)}, ${percent(risk.max_micro_batch_oom_probability)} at ${int(result.max_micro_batch_size)} (headroom ${Math.round(1000 * risk.headroom) / 10}%)`;
  }

  const PROBES_ELSEWHERE = new Set(["what_if", "scale_out", "sequence_length"]); // other cards, precisions, world sizes

  function drawTrials() {
    const list = [...trials.values()].filter((t) => !PROBES_ELSEWHERE.has(t.phase));
    const point = (t) => ({ x: t.batch_size, y: t.peak_bytes / GiB, bytes: t.peak_bytes, fits: t.fits });
    const [fits, oom, cap, limit, answer, next] = charts.memory.data.datasets;
    fits.data = list.filter((t) => t.fits).map(point);
    oom.data = list.filter((t) => !t.fits).map(point);
    const xs = list.map((t) => t.batch_size);
    const lo = Math.max(1, Math.min(1, ...xs)), hi = Math.max(2, ...xs) * 1.5;
    cap.data = capacity ? [{ x: lo, y: capacity / GiB }, { x: hi, y: capacity / GiB }] : [];
    limit.data = capacity && headroom > 0 ? [{ x: lo, y: (capacity * (1 - headroom)) / GiB }, { x: hi, y: (capacity * (1 - headroom)) / GiB }] : [];
    const best = plan?.result?.max_micro_batch_size;
    const at = (b) => list.filter((t) => t.batch_size === b && t.phase !== "breakdown").slice(-1).map(point);
    answer.data = best ? at(best) : [];
    next.data = best ? at(best + 1) : [];
    charts.memory.update("none");
    drawAnswer(list, best, capacity && capacity * (1 - headroom));
    $("#trial-count").textContent = `${list.length} trial${list.length === 1 ? "" : "s"}`;
    $("#trials tbody").replaceChildren(...list.map((t, i) => el("tr", { "data-fits": String(t.fits) },
      el("td", { class: "num" }, String(i + 1)), el("td", { class: "num" }, int(t.batch_size)),
      el("td", {}, t.fits ? "fits" : "OOM"), el("td", { class: "num" }, bytes(t.peak_bytes)),
      el("td", {}, t.scenario ? `${t.phase}: ${t.scenario}` : t.phase || "search"))));
  }

  function setTrials(list) {
    trials = new Map();
    list.forEach((t, i) => trials.set(t.index ?? i, t));
    drawTrials();
  }

  // -- what the plan's device can hold (known from the spec before the result) -----------------
  async function deviceCapacity(spec) {
    const device = spec.device || {};
    headroom = spec.search?.headroom ?? headroom;
    if (device.kind === "simulated" && device.memory_gib) return device.memory_gib * GiB;
    if (device.kind === "simulated" || !device.kind) {
      const gpu = device.gpu || "A100-80GB";
      try {
        const { data } = await api("/v1/gpus");
        return data.items.find((g) => g.name === gpu)?.memory_bytes ?? null;
      } catch { return null; }
    }
    return null;
  }

  // -- summary, breakdown, what-if, warnings, configs, spec -----------------------------------
  function card(id, ...content) { $(id).replaceChildren(...content); }
  function percent(p) { return p < 0.001 ? "<0.1%" : `${(100 * p).toFixed(1)}%`; }

  function summary(result) {
    card("#s-max", int(result.max_micro_batch_size), result.search_bound_reached ? " (bound)" : "");
    card("#s-micro", `${int(result.micro_batch_size)} × ${int(result.accumulation_steps)}${result.world_size > 1 ? ` × ${result.world_size} GPUs` : ""}`);
    card("#s-global", int(result.effective_global_batch_size));
    const scaling = result.lr_scaling;
    const reference = scaling.base_batch_size_from === "global_batch_size" ? "the global batch asked (no base_batch_size)" : "base_batch_size";
    card("#s-lr", el("span", { title: `${scaling.rule} rule from ${scaling.base_lr} at batch ${scaling.base_batch_size}, ${reference}` }, num(result.learning_rate)));
    card("#s-peak", bytes(result.memory.peak), el("span", { class: "muted small" }, ` of ${bytesText(result.memory.capacity)}`));
    const t = result.throughput;
    const band = t?.samples_per_second_band;
    const estimate = band ? ` est. (${Math.round(100 * t.band_coverage)}% band ${num(band[0])}–${num(band[1])})` : " est.";
    card("#s-speed", t ? `${num(t.samples_per_second)} samples/s` : "—", t && !t.measured ? el("span", { class: "muted small" }, estimate) : "");
    const risk = result.risk;
    $("#c-risk").hidden = !risk;
    if (risk) {
      const why = `Chance that micro-batch ${result.micro_batch_size} runs out of memory on the real card: ln(real / simulated peak) ~ N(${num(risk.log_ratio_mean)}, ${num(risk.log_ratio_sd)}), fitted on ${risk.calibration}`;
      card("#s-risk", el("span", { title: why }, percent(risk.oom_probability)),
        el("span", { class: "muted small" }, ` (${percent(risk.max_micro_batch_oom_probability)} at the max)`));
    }
    card("#s-steps", int(result.total_optimizer_steps), el("span", { class: "muted small" }, ` (${int(result.optimizer_steps_per_epoch)}/epoch)`));
    card("#s-device", `${result.device.name}`, el("span", { class: "muted small" }, ` ${result.device.backend}`));
  }

  function breakdown(memory) {
    const parts = PARTS.filter(([key]) => memory[key] > 0);
    const cached = memory.reserved != null ? memory.reserved - memory.peak : null;
    const datasets = parts.map(([key, label, color]) => ({ label, data: [memory[key] / GiB], bytes: memory[key], backgroundColor: color, stack: "m", category: key }));
    if (cached > 0) datasets.push({ label: "Allocator cache (reserved − allocated)", data: [cached / GiB], bytes: cached, backgroundColor: "#d0d7de", stack: "m", category: "allocator_cached" });
    charts.breakdown?.destroy();
    charts.breakdown = new Chart($("#breakdown-chart"), {
      type: "bar",
      data: { labels: ["at the chosen micro-batch"], datasets },
      options: {
        indexAxis: "y", maintainAspectRatio: false,
        scales: { x: { stacked: true, beginAtZero: true, title: { display: true, text: `GiB (the card holds ${bytesText(memory.capacity)})` } }, y: { stacked: true, display: false } },
        plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } },
          tooltip: { callbacks: { label: (ctx) => `${ctx.dataset.label}: ${bytesText(ctx.dataset.bytes)} (${ctx.dataset.bytes.toLocaleString("en-US")} bytes)` } } },
      },
    });
    const pct = (n) => `${((100 * n) / memory.peak).toFixed(1)}%`;
    const rows = parts.map(([key, label]) => el("tr", { class: "part", "data-category": key },
      el("th", { scope: "row" }, label), el("td", { class: "num" }, bytes(memory[key])), el("td", { class: "num muted" }, pct(memory[key]))));
    rows.push(el("tr", { class: "total", "data-category": "peak" }, el("th", { scope: "row" }, "Peak (allocated + overhead)"), el("td", { class: "num" }, bytes(memory.peak)), el("td", {})));
    if (memory.reserved != null) rows.push(el("tr", { "data-category": "reserved" }, el("th", { scope: "row" }, "Reserved by the allocator"), el("td", { class: "num" }, bytes(memory.reserved)), el("td", {})));
    rows.push(el("tr", { "data-category": "capacity" }, el("th", { scope: "row" }, "Capacity"), el("td", { class: "num" }, bytes(memory.capacity)), el("td", {})));
    $("#breakdown tbody").replaceChildren(...rows);
  }

  function whatIf(result) {
    const items = result.what_if || [];
    const value = (w) => (w.value === true ? "on" : w.value === false ? "off" : w.value);
    const short = { gradient_checkpointing: "checkpointing", precision: "", gpu: "" }; // fit a phone
    const label = (w) => `${short[w.change] ?? w.change.replaceAll("_", " ")} ${value(w)}`.trim();
    const labels = ["this plan", ...items.map(label)];
    const values = [result.max_micro_batch_size, ...items.map((w) => (w.feasible ? w.max_micro_batch_size : 0))];
    charts.whatif?.destroy();
    charts.whatif = new Chart($("#whatif-chart"), {
      type: "bar",
      data: { labels, datasets: [{ label: "max micro-batch", data: values, backgroundColor: values.map((v, i) => (i === 0 ? COLORS.answer : v > values[0] ? COLORS.fit : "#8c959f")) }] },
      options: { indexAxis: "y", maintainAspectRatio: false, plugins: { legend: { display: false } },
        scales: { x: { beginAtZero: true, title: { display: true, text: "max micro-batch" } } } },
    });
    $("#whatif").replaceChildren(...items.map((w) => el("li", {},
      el("strong", {}, `${w.change.replaceAll("_", " ")} → ${value(w)}`), ": ",
      w.feasible ? `${int(w.max_micro_batch_size)} (${w.max_micro_batch_size >= result.max_micro_batch_size ? "+" : ""}${num(((w.max_micro_batch_size / Math.max(1, result.max_micro_batch_size)) - 1) * 100, 3)}%) on ${w.device.name}, peak ` : "does not fit, peak ",
      bytes(w.peak_bytes))));
    if (!items.length) $("#whatif").append(el("li", { class: "muted" }, "No what-if was asked for (search.what_if)."));
  }

  function schedule(result) {
    const lr = result.schedule;
    $("#schedule-section").hidden = !lr;
    if (!lr) return;
    charts.schedule?.destroy();
    charts.schedule = new Chart($("#schedule-chart"), {
      type: "line",
      data: { datasets: [{ label: "learning rate", data: lr.points.map((p) => ({ x: p.step, y: p.learning_rate, label: p.label })),
        borderColor: COLORS.answer, backgroundColor: COLORS.answer, pointRadius: 4, tension: 0 }] },
      options: { maintainAspectRatio: false, parsing: false, plugins: { legend: { display: false },
        tooltip: { callbacks: { label: (ctx) => `${ctx.raw.label}: step ${int(ctx.raw.x)}, lr ${num(ctx.raw.y, 4)}` } } },
        scales: { x: { type: "linear", title: { display: true, text: "optimizer step" } },
          y: { beginAtZero: true, title: { display: true, text: "learning rate" } } } },
    });
    $("#schedule-note").textContent = `${lr.name}, ${int(lr.warmup_steps)} warm-up steps of ${int(lr.total_steps)}` +
      `${lr.upper_bound ? " (an upper bound: early stopping may end it sooner)" : ""}; sampled at the marked steps, straight between them.`;
  }

  // A layout's step: the tensor-parallel, ring and FSDP collectives' time, compute the rest.
  function layoutLabel(l) { return `tp${l.tensor_parallel} · cp${l.context_parallel} · dp${l.data_parallel}`; }
  function hours(s) { return s == null ? "—" : s >= 3600 ? `${num(s / 3600)} h` : `${num(s)} s`; }

  function layouts(result) {
    const choice = result.layouts;
    $("#layouts-section").hidden = !choice;
    if (!choice) return;
    const rows = choice.checked;
    const chosen = (l) => l.tensor_parallel === choice.tensor_parallel && l.context_parallel === choice.context_parallel;
    $("#layouts-note").textContent = `(chosen: ${layoutLabel(choice)}; ranked by time to train)`;
    const feasible = rows.filter((l) => l.feasible && l.step_time_s != null);
    const part = (l, key) => Math.min(l[key] || 0, l.step_time_s);
    const parts = [
      ["compute and the rest", COLORS.answer, (l) => Math.max(0, l.step_time_s - part(l, "tensor_parallel_s") - part(l, "context_parallel_s") - part(l, "communication_s"))],
      ["tensor-parallel collectives", "#bc4c00", (l) => part(l, "tensor_parallel_s")],
      ["context-parallel ring", "#8250df", (l) => part(l, "context_parallel_s")],
      ["FSDP collectives", "#8c959f", (l) => part(l, "communication_s")],
    ];
    charts.layouts?.destroy();
    charts.layouts = new Chart($("#layouts-chart"), {
      type: "bar",
      data: { labels: feasible.map(layoutLabel),
        datasets: parts.map(([label, color, value]) => ({ label, data: feasible.map(value), backgroundColor: color })) },
      options: { indexAxis: "y", maintainAspectRatio: false,
        scales: { x: { stacked: true, beginAtZero: true, title: { display: true, text: "seconds per optimizer step" } }, y: { stacked: true } } },
    });
    $("#layouts tbody").replaceChildren(...rows.map((l) => el("tr", { "data-chosen": chosen(l) ? "true" : null },
      el("th", { scope: "row" }, layoutLabel(l), chosen(l) ? " ✓" : ""),
      el("td", { class: "num" }, l.feasible ? `${int(l.micro_batch_size)} × ${int(l.accumulation_steps)}` : "does not fit"),
      el("td", { class: "num" }, bytes(l.peak_bytes)),
      el("td", { class: "num" }, l.step_time_s == null ? "—" : num(l.step_time_s)),
      el("td", { class: "num" }, hours(l.total_time_s)))));
    $("#layouts-skipped").replaceChildren(...(choice.skipped || []).map((s) => el("li", {}, `skipped: ${s}`)));
  }

  function scaleOut(result) {
    const rows = result.scale_out || [];
    $("#scale-section").hidden = !rows.length;
    $("#scale-out tbody").replaceChildren(...rows.map((r) => el("tr", {},
      el("th", { scope: "row" }, r.strategy),
      el("td", { class: "num" }, r.world_size == null ? "none fits" : int(r.world_size)),
      el("td", {}, ...r.checked.flatMap((c, i) => [i ? ", " : "", `${int(c.world_size)}: `, bytes(c.peak_bytes), c.fits ? " ✓" : " ✗"])))));
  }

  function prediction(result) {
    const p = result.prediction;
    $("#c-pred").hidden = !p;
    if (p) card("#s-pred", int(p.predicted_max_micro_batch_size),
      el("span", { class: "muted small" }, ` (${p.relative_error >= 0 ? "+" : ""}${num(100 * p.relative_error, 3)}%)`));
  }

  function warnings(result) {
    const list = [...(result.warnings || []).map((w) => [w.code, w.message]), ...(result.suggestions || []).map((s) => ["suggestion", s])];
    $("#warnings-section").hidden = !list.length;
    $("#warnings").replaceChildren(...list.map(([code, message]) => el("li", {}, el("code", {}, code), " ", message)));
  }

  function codeBlock(name, text, filename, type) {
    const pre = el("pre", { class: "code", tabindex: "0" }, el("code", {}, text));
    const tools = el("div", { class: "tools" },
      el("button", { type: "button", "data-copy": name, onclick: (e) => copy(text, e.currentTarget) }, "Copy"),
      el("button", { type: "button", "data-download": filename, onclick: () => download(filename, text, type) }, `Download ${filename}`));
    return [tools, pre];
  }

  function configs(result) {
    // The training loop first (what most people copy), the LR recipe it imports last.
    const rank = (name) => (name === "pytorch" ? 0 : name === "recipe" ? 2 : 1);
    const entries = Object.entries(result.configs || {}).sort(([a], [b]) => rank(a) - rank(b));
    $("#configs-section").hidden = !entries.length;
    $("#configs").replaceChildren(...entries.map(([name, value], i) => {
      const text = typeof value === "string" ? value : JSON.stringify(value, null, 2);
      const filename = typeof value === "string" ? `${name === "recipe" ? "lr_recipe" : "train_" + name}.py` : `${name}.json`;
      return el("details", { class: "config", open: i === 0, "data-config": name }, el("summary", {}, name),
        ...codeBlock(name, text, filename, typeof value === "string" ? "text/x-python" : "application/json"));
    }));
  }

  function spec(p) {
    const text = JSON.stringify(p.spec, null, 2);
    $("#spec-box").replaceChildren(el("details", { class: "config" }, el("summary", {}, `spec ${p.spec_hash.slice(0, 12)}`),
      ...codeBlock("spec", text, `spec-${p.id.slice(0, 8)}.json`, "application/json")));
  }

  async function deliveries() {
    let list = [];
    try { list = (await api(`/v1/plans/${planId}/deliveries`)).data; } catch { list = []; }
    $("#deliveries-section").hidden = !list.length;
    $("#deliveries tbody").replaceChildren(...list.map((d) => el("tr", { "data-delivery": d.id },
      el("td", {}, el("code", {}, d.url)),
      el("td", {}, el("span", { class: `badge ${d.state === "delivered" ? "succeeded" : d.state === "failed" ? "failed" : "queued"}` }, d.state)),
      el("td", { class: "num" }, int(d.attempts)),
      el("td", {}, d.last_status ? `HTTP ${d.last_status}` : d.last_error || "—"),
      el("td", {}, d.delivered_at ? when(d.delivered_at) : d.next_attempt_at ? `next ${when(d.next_attempt_at)}` : "—"))));
  }

  // -- the plan as a whole, and following it -------------------------------------------------
  function header(p) {
    const status = $("#status");
    status.className = `badge ${p.status}`;
    status.textContent = p.status;
    const model = p.spec?.model || {};
    const name = model.name || model.preset || model.architecture || (model.layers ? `${model.layers.length} layers` : model.source);
    $("#subtitle").textContent = [name, `created ${when(p.created_at)}`, p.finished_at ? `finished ${when(p.finished_at)}` : ""].filter(Boolean).join(" · ");
    $("#cancel").hidden = FINAL.has(p.status);
    // An ended plan with no result has no numbers to show: no dashes, no empty axes.
    $("#result-body").hidden = FINAL.has(p.status) && !p.result;
    const problem = $("#problem");
    problem.hidden = !p.error;
    if (p.error) problem.replaceChildren(el("strong", {}, p.error.title || "Failed"), ": ", p.error.detail || "");
  }

  async function show(p) {
    plan = p;
    header(p);
    // the headroom the search kept: the result says it (max_oom_probability sets its own)
    headroom = p.result?.risk?.headroom ?? p.spec?.search?.headroom ?? headroom;
    if (capacity === null) capacity = p.result?.memory?.capacity ?? (await deviceCapacity(p.spec));
    if (p.result) {
      capacity = p.result.memory.capacity;
      setTrials(p.result.trials);
      summary(p.result);
      riskChart(p.result);
      breakdown(p.result.memory);
      whatIf(p.result);
      schedule(p.result);
      layouts(p.result);
      scaleOut(p.result);
      prediction(p.result);
      warnings(p.result);
      configs(p.result);
    } else {
      setTrials(p.trials || []);
    }
    spec(p);
    deliveries();
    if (!FINAL.has(p.status)) follow();
  }

  // Counts what the finished plan will list as its trials; the what-if and scale-out probes
  // (other cards, precisions, world sizes) are counted apart, as the result keeps them apart.
  function notice() {
    const all = [...trials.values()];
    const own = all.filter((t) => !PROBES_ELSEWHERE.has(t.phase)).length;
    const other = all.length - own;
    $("#notice").textContent = `Running: ${own} trial${own === 1 ? "" : "s"} so far` +
      (other ? `, ${other} what-if probe${other === 1 ? "" : "s"}…` : "…");
  }

  function follow() {
    if (stream) return;
    $("#notice").textContent = plan.status === "queued" ? "Queued: waiting for a worker…" : "Running: trials arrive as they are measured…";
    stream = new EventSource(`/v1/plans/${planId}/events`);
    stream.addEventListener("trial", (event) => {
      const t = JSON.parse(event.data);
      window.trainplanTrialEvents += 1;
      if (plan.status === "queued") { plan.status = "running"; header(plan); }
      trials.set(t.index ?? trials.size, t);
      notice();
      drawTrials();
    });
    stream.addEventListener("retry", () => { setTrials([]); $("#notice").textContent = "A worker was lost: the plan runs again."; });
    stream.addEventListener("end", async () => {
      window.trainplanEndAt = performance.now(); // the browser tests' layout-shift window ends
      stream.close();
      stream = null;
      $("#notice").textContent = "";
      await load();
    });
  }

  async function load() {
    try {
      const { data } = await api(`/v1/plans/${planId}`);
      await show(data);
    } catch (err) {
      $("#status").textContent = err.status === 404 ? "not found" : "error";
      $("#result-body").hidden = true;
      $("#spec-section").hidden = true;
      $("#notice").textContent = err.status === 404 ? "No such plan (or it is another tenant's)." : `Could not load the plan: ${err.message}`;
    }
  }

  $("#cancel").addEventListener("click", async () => {
    $("#cancel").disabled = true;
    try {
      const { data } = await api(`/v1/plans/${planId}/cancel`, { method: "POST" });
      $("#notice").textContent = "Cancel requested.";
      if (FINAL.has(data.status)) { stream?.close(); stream = null; await show(data); }
    } catch (err) {
      $("#notice").textContent = `Could not cancel: ${err.message}`;
      $("#cancel").disabled = false;
    }
  });

  memoryChart();
  answerChart();
  load();
})();
