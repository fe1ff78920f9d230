// keypool's console: plain JavaScript over the REST API (/api/*), no build step, no CDN.
// Every value from the server is put on the page as text (textContent), never as HTML.
"use strict";

const I18N = {
  en: {
    overview: "Overview", keys: "Keys", gateways: "Gateways", usage: "Usage", live: "Live", audit: "Audit",
    theme: "Theme", logout: "Log out", login_title: "Log in", admin_token: "Admin token", login: "Log in",
    rpm: "Requests / min", tokens: "Tokens", errors: "Errors", spend: "Spend (USD)",
    calls_per_hour: "Calls per hour today", live_rpm: "Requests per minute (live)",
    name: "Name", provider: "Provider", health: "Health", cooldown_end: "Cooldown ends", success: "Success",
    failure: "Failure", enabled: "Enabled", add_key: "Add a key", endpoint: "Endpoint", secret: "Secret",
    add: "Add", owner: "Owner", spec: "Spec", create_gateway: "Create a gateway", edit_gateway: "Edit gateway",
    spec_json: "Spec (a gateways: entry, as JSON)", generate_secret: "Generate a secret", save: "Save",
    secret_once: "Secret (shown once):", from: "From", to: "To", show: "Show", by_gateway: "By gateway",
    by_model: "By model", by_key: "By key", time: "Time", gateway: "Gateway", model: "Model", key: "Key",
    status: "Status", who: "Who", action: "Action", target: "Target", detail: "Detail",
    enable: "Enable", disable: "Disable", remove: "Remove", edit: "Edit", delete: "Delete", rotate: "Rotate secret",
    calls: "Calls", confirm_remove: "Remove key", confirm_delete: "Delete gateway", wrong_token: "That is not the admin token.",
  },
  zh: {
    overview: "概览", keys: "密钥", gateways: "网关", usage: "用量", live: "实时", audit: "审计",
    theme: "主题", logout: "退出", login_title: "登录", admin_token: "管理令牌", login: "登录",
    rpm: "每分钟请求", tokens: "Token 数", errors: "错误", spend: "花费 (USD)",
    calls_per_hour: "今日每小时调用", live_rpm: "每分钟请求（实时）",
    name: "名称", provider: "供应商", health: "健康", cooldown_end: "冷却结束", success: "成功",
    failure: "失败", enabled: "启用", add_key: "添加密钥", endpoint: "端点", secret: "密钥值",
    add: "添加", owner: "归属", spec: "配置", create_gateway: "创建网关", edit_gateway: "编辑网关",
    spec_json: "配置（gateways: 条目，JSON）", generate_secret: "生成访问密钥", save: "保存",
    secret_once: "访问密钥（仅显示一次）：", from: "从", to: "到", show: "查询", by_gateway: "按网关",
    by_model: "按模型", by_key: "按密钥", time: "时间", gateway: "网关", model: "模型", key: "密钥",
    status: "状态", who: "操作者", action: "操作", target: "对象", detail: "详情",
    enable: "启用", disable: "停用", remove: "移除", edit: "编辑", delete: "删除", rotate: "轮换密钥",
    calls: "调用", confirm_remove: "移除密钥", confirm_delete: "删除网关", wrong_token: "管理令牌不正确。",
  },
};

let lang = localStorage.getItem("kp-lang") || (navigator.language.startsWith("zh") ? "zh" : "en");
let csrf = "";
const recent = []; // finished requests seen on the live stream: {at, ms, tokens, cost, error}
let liveChart = null;
let hoursChart = null;

const $ = (sel, root = document) => root.querySelector(sel);
const t = (k) => (I18N[lang] && I18N[lang][k]) || I18N.en[k] || k;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function translate() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-t]").forEach((n) => { n.textContent = t(n.dataset.t); });
  $("#lang").textContent = lang === "zh" ? "English" : "中文";
}

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  localStorage.setItem("kp-theme", theme);
}

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") headers["x-csrf-token"] = csrf;
  if (body !== undefined) headers["content-type"] = "application/json";
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401) { showLogin(); throw new Error(t("wrong_token")); }
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
  return data;
}

function showLogin() {
  $("#login").hidden = false;
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  document.querySelectorAll(".page").forEach((p) => { p.hidden = true; });
}

async function start() {
  try {
    const s = await fetch("/api/session", { credentials: "same-origin" });
    if (!s.ok) { showLogin(); return; }
    const session = await s.json();
    csrf = session.csrf;
    $("#logout").hidden = session.open;
  } catch (_) { showLogin(); return; }
  $("#login").hidden = true;
  $("#nav").hidden = false;
  openStream();
  route();
}

function route() {
  const page = (location.hash || "#overview").slice(1);
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== page; });
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  const load = { overview: loadOverview, keys: loadKeys, gateways: loadGateways, usage: loadUsage, live: () => {}, audit: loadAudit }[page];
  if (load) load().catch((e) => console.warn(e));
}

// ---- overview ----

function percentile(sorted, p) {
  if (!sorted.length) return "–";
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

function renderOverviewNumbers() {
  const now = Date.now();
  const minute = recent.filter((r) => r.at > now - 60000);
  $("#ov-rpm").textContent = minute.length;
  $("#ov-tokens").textContent = recent.reduce((s, r) => s + (r.tokens || 0), 0);
  $("#ov-errors").textContent = recent.filter((r) => r.status >= 400).length;
  $("#ov-spend").textContent = recent.reduce((s, r) => s + (r.cost || 0), 0).toFixed(6);
  const ms = recent.map((r) => r.ms).sort((a, b) => a - b);
  $("#ov-latency").textContent = `${percentile(ms, 0.5)} / ${percentile(ms, 0.99)}`;
  renderLiveChart();
}

function chartOpts(id, label, width) {
  return {
    width, height: 220, scales: { x: { time: true } },
    series: [{}, { label, stroke: getComputedStyle(document.documentElement).getPropertyValue("--accent") || "#2f6fed", width: 2, fill: "rgba(47,111,237,0.12)" }],
    axes: [{ stroke: "#98a2b3" }, { stroke: "#98a2b3" }],
  };
}

function renderLiveChart() {
  const host = $("#chart-live");
  if (host.offsetParent === null) return;
  const now = Math.floor(Date.now() / 60000);
  const xs = [], ys = [];
  for (let m = now - 29; m <= now; m++) {
    xs.push(m * 60);
    ys.push(recent.filter((r) => Math.floor(r.at / 60000) === m).length);
  }
  if (!liveChart) liveChart = new uPlot(chartOpts("live", t("rpm"), host.clientWidth || 800), [xs, ys], host);
  else liveChart.setData([xs, ys]);
}

let overviewLoads = 0;

async function loadOverview() {
  // a later load wins: an earlier answer arriving last must not redraw stale numbers
  const load = ++overviewLoads;
  const [status, keys] = await Promise.all([api("GET", "/api/status"), api("GET", "/api/keys")]);
  if (load !== overviewLoads) return;
  $("#ov-keys").textContent = `${keys.filter((k) => k.health === "healthy" && k.enabled).length} / ${keys.length}`;
  $("#ov-status").textContent = `keypool ${status.version} · store ${status.store} · redis ${status.redis} · ${status.replicas.length} replica(s) · config v${status.config_version}`;
  renderOverviewNumbers();
  const usage = await api("GET", "/api/usage").catch(() => null);
  if (load !== overviewLoads) return;
  const host = $("#chart-hours");
  if (!usage) { host.textContent = ""; return; }
  const xs = usage.calls_per_hour.map((h) => h.hour_ms / 1000);
  const ys = usage.calls_per_hour.map((h) => h.calls);
  host.dataset.points = String(ys.reduce((a, b) => a + b, 0));
  if (hoursChart) hoursChart.destroy();
  hoursChart = new uPlot(chartOpts("hours", t("calls"), host.clientWidth || 800), [xs, ys], host);
}

// ---- keys ----

async function loadKeys() {
  const keys = await api("GET", "/api/keys");
  const body = $("#keys-table tbody");
  body.replaceChildren();
  for (const k of keys) {
    const tr = el("tr");
    tr.dataset.key = k.name;
    tr.append(el("td", k.name), el("td", k.provider), el("td", k.enabled ? k.health : "disabled", k.enabled ? k.health : "disabled"));
    tr.append(el("td", k.cooling_until_ms ? new Date(k.cooling_until_ms).toLocaleTimeString() : ""));
    tr.append(el("td", k.rpm ? `${k.window_requests} / ${k.rpm}` : k.window_requests));
    tr.append(el("td", k.tpm ? `${k.window_tokens} / ${k.tpm}` : k.window_tokens));
    tr.append(el("td", k.success), el("td", k.failure), el("td", k.enabled ? "✓" : "✗"));
    const actions = el("td");
    const toggle = el("button", k.enabled ? t("disable") : t("enable"), "toggle");
    toggle.type = "button";
    toggle.onclick = () => api("PATCH", `/api/keys/${encodeURIComponent(k.name)}`, { enabled: !k.enabled }).then(loadKeys).catch(alertError);
    actions.append(toggle);
    if (k.owner === "admin") {
      const rm = el("button", t("remove"));
      rm.type = "button";
      rm.onclick = () => confirm(`${t("confirm_remove")} ${k.name}?`) && api("DELETE", `/api/keys/${encodeURIComponent(k.name)}`).then(loadKeys).catch(alertError);
      actions.append(" ", rm);
    }
    tr.append(actions);
    body.append(tr);
  }
}

function alertError(e) { window.alert(e.message); }

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const v = (n) => f.elements[n].value; // f.name would be the form's own name
  const key = { name: v("name"), endpoint: v("endpoint"), sk: v("sk"), type: v("type") };
  if (v("rpm")) key.rpm = Number(v("rpm"));
  if (v("tpm")) key.tpm = Number(v("tpm"));
  const err = $(".error", f);
  api("POST", "/api/keys", key).then(() => { f.reset(); err.textContent = ""; loadKeys(); }).catch((e) => { err.textContent = e.message; });
});

// ---- gateways ----

let editing = null;

async function loadGateways() {
  const all = await api("GET", "/api/gateways");
  const body = $("#gateways-table tbody");
  body.replaceChildren();
  for (const g of all) {
    const tr = el("tr");
    tr.dataset.gateway = g.name;
    tr.append(el("td", g.name), el("td", g.owner), el("td", g.tokens_used));
    const spec = el("td");
    spec.append(el("code", JSON.stringify(g.spec)));
    tr.append(spec);
    const actions = el("td");
    if (g.owner === "admin") {
      const edit = el("button", t("edit"));
      edit.type = "button";
      edit.onclick = () => {
        editing = g.name;
        const f = $("#gateway-form");
        f.elements.spec.value = JSON.stringify(g.spec, null, 2);
        f.elements.generate.checked = false;
        $("#gateway-form-title").textContent = `${t("edit_gateway")} ${g.name}`;
      };
      const del = el("button", t("delete"));
      del.type = "button";
      del.onclick = () => confirm(`${t("confirm_delete")} ${g.name}?`) && api("DELETE", `/api/gateways/${encodeURIComponent(g.name)}`).then(loadGateways).catch(alertError);
      actions.append(edit, " ", del);
    }
    tr.append(actions);
    body.append(tr);
  }
}

$("#gateway-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const err = $(".error", f);
  const shown = $(".secret", f);
  shown.hidden = true;
  let spec;
  try { spec = JSON.parse(f.elements.spec.value); } catch (e) { err.textContent = e.message; return; }
  const body = { spec, generate_secret: f.elements.generate.checked };
  const done = editing
    ? api("PUT", `/api/gateways/${encodeURIComponent(editing)}`, body)
    : api("POST", "/api/gateways", body);
  done.then((r) => {
    err.textContent = "";
    if (r && r.secret) { $("#gateway-secret").textContent = r.secret; shown.hidden = false; }
    editing = null;
    $("#gateway-form-title").textContent = t("create_gateway");
    loadGateways();
  }).catch((e) => { err.textContent = e.message; });
});

// ---- usage ----

function totals(table, rows) {
  table.replaceChildren();
  const head = el("tr");
  for (const h of [t("name"), t("calls"), t("errors"), t("tokens"), "USD"]) head.append(el("th", h));
  table.append(head);
  for (const r of rows) {
    const tr = el("tr");
    tr.append(el("td", r.group), el("td", r.calls), el("td", r.errors), el("td", r.total_tokens), el("td", r.cost_usd.toFixed(6)));
    table.append(tr);
  }
}

async function loadUsage() {
  const f = $("#usage-form");
  const params = new URLSearchParams();
  const from = f.elements.from.value, to = f.elements.to.value;
  if (from) params.set("from_ms", String(new Date(from).getTime()));
  if (to) params.set("to_ms", String(new Date(to).getTime() + 86400000));
  try {
    const u = await api("GET", `/api/usage?${params}`);
    $("#usage-error").textContent = "";
    totals($("#usage-gateway"), u.by_gateway);
    totals($("#usage-model"), u.by_model);
    totals($("#usage-key"), u.by_key);
  } catch (e) { $("#usage-error").textContent = e.message; }
}

$("#usage-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadUsage(); });

// ---- live ----

function openStream() {
  const source = new EventSource("/api/events");
  source.onmessage = (m) => {
    let e;
    try { e = JSON.parse(m.data); } catch (_) { return; }
    recent.push({ at: e.at_ms, ms: e.latency_ms, tokens: e.total_tokens, cost: e.cost_usd, status: e.status });
    while (recent.length > 5000 || (recent.length && recent[0].at < Date.now() - 3600000)) recent.shift();
    const body = $("#live-table tbody");
    const tr = el("tr");
    tr.append(el("td", new Date(e.at_ms).toLocaleTimeString()), el("td", e.gateway), el("td", e.model), el("td", e.key || ""),
      el("td", e.status, e.status >= 400 ? "disabled" : ""), el("td", e.latency_ms), el("td", e.total_tokens ?? ""),
      el("td", e.cost_usd == null ? "" : e.cost_usd.toFixed(6)));
    body.prepend(tr);
    while (body.children.length > 200) body.lastChild.remove();
    if (!$("#overview").hidden) renderOverviewNumbers();
  };
}

// ---- audit ----

async function loadAudit() {
  const body = $("#audit-table tbody");
  body.replaceChildren();
  try {
    const rows = await api("GET", "/api/audit");
    $("#audit-error").textContent = "";
    for (const r of rows) {
      const tr = el("tr");
      const detail = el("td");
      detail.append(el("code", JSON.stringify(r.detail)));
      tr.append(el("td", new Date(r.at_ms).toLocaleString()), el("td", r.who), el("td", r.action), el("td", r.target), detail);
      body.append(tr);
    }
  } catch (e) { $("#audit-error").textContent = e.message; }
}

// ---- wiring ----

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const resp = await fetch("/api/login", {
    method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
    body: JSON.stringify({ token: $("#token").value }),
  });
  if (!resp.ok) { $("#login-error").textContent = t("wrong_token"); return; }
  $("#login-error").textContent = "";
  $("#token").value = "";
  start();
});

$("#logout").addEventListener("click", async () => {
  await fetch("/api/logout", { method: "POST", credentials: "same-origin" });
  location.hash = "";
  location.reload();
});

$("#lang").addEventListener("click", () => {
  lang = lang === "zh" ? "en" : "zh";
  localStorage.setItem("kp-lang", lang);
  translate();
  route();
});

$("#theme").addEventListener("click", () => {
  applyTheme(document.documentElement.dataset.theme === "dark" ? "light" : "dark");
});

window.addEventListener("hashchange", route);
applyTheme(localStorage.getItem("kp-theme") || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));
translate();
setInterval(() => { if (!$("#overview").hidden) renderOverviewNumbers(); }, 5000);
start();
