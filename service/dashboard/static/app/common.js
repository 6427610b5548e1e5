/* Shared by every page: calls to the JSON API (the session cookie rides along; changes echo the
   CSRF cookie), number formatting, and small DOM helpers. No framework, no build step. */
"use strict";

const TP = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const GiB = 2 ** 30, MiB = 2 ** 20, KiB = 2 ** 10;

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem || {};
    }
  }

  async function api(path, { method = "GET", body, headers = {} } = {}) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json", ...headers } };
    if (method !== "GET") init.headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = typeof body === "string" ? body : JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      location.assign(`/sign-in?next=${encodeURIComponent(location.pathname + location.search)}`);
      throw new ApiError(401, { detail: "signed out" });
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
    if (!response.ok) throw new ApiError(response.status, data);
    return { status: response.status, data, headers: response.headers };
  }

  /* "1.23 GiB" / "512.0 MiB", exact bytes on hover (title) for the element it returns. */
  function bytesText(n) {
    if (n === null || n === undefined) return "—";
    const a = Math.abs(n);
    if (a >= GiB) return `${(n / GiB).toFixed(2)} GiB`;
    if (a >= MiB) return `${(n / MiB).toFixed(1)} MiB`;
    if (a >= KiB) return `${(n / KiB).toFixed(1)} KiB`;
    return `${n} B`;
  }
  function bytes(n) {
    const span = el("span", { class: "bytes", title: n == null ? "" : `${Number(n).toLocaleString("en-US")} bytes`,
      "data-bytes": n == null ? "" : String(n) }, bytesText(n));
    return span;
  }
  const int = (n) => (n == null ? "—" : Number(n).toLocaleString("en-US"));
  function num(n, digits = 3) {
    if (n == null) return "—";
    const a = Math.abs(n);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return n.toExponential(2);
    return Number(n.toPrecision(digits)).toLocaleString("en-US");
  }
  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === false || v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
    return node;
  }
  const $ = (sel, root = document) => root.querySelector(sel);

  function badge(status) { return el("span", { class: `badge ${status}` }, status); }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const area = el("textarea", { class: "sr-only" }, text);
      document.body.append(area); area.select(); document.execCommand("copy"); area.remove();
    }
    if (button) {
      const label = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = label; }, 1500);
    }
  }
  function download(name, text, type = "text/plain") {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = el("a", { href: url, download: name });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  /* A problem's errors as "model.layers[2].kernel_size" paths (the spec's own path, no "body"). */
  function fieldPath(loc) {
    const parts = (loc || []).filter((p, i) => !(i === 0 && p === "body"));
    return parts.reduce((s, p) => (typeof p === "number" ? `${s}[${p}]` : s ? `${s}.${p}` : String(p)), "");
  }

  return { api, ApiError, bytes, bytesText, int, num, when, el, $, badge, copy, download, fieldPath, csrf, GiB };
})();
