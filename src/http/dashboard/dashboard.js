// The inletd dashboard: polls the daemon's own /stats/* and /admin/*
// endpoints every 2 s and draws what they answer. It computes no figure of
// its own: every number on the page is one an endpoint sent. Text from the
// daemon (event types, pages, errors) goes in with textContent only.
"use strict";
(() => {
  const POLL_MS = 2000;
  const HIDDEN_POLL_MS = 10000;
  const TIMEOUT_MS = 5000;
  const TOKEN_KEY = "inletd.token";
  const DLQ_ROWS = 50;
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const fmt = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
  const millis = (x) => {
    if (x == null) return "–";
    if (x < 10) return x.toFixed(2) + " ms";
    if (x < 1000) return x.toFixed(1) + " ms";
    return (x / 1000).toFixed(2) + " s";
  };
  const age = (ms) => {
    if (ms == null) return "none";
    if (ms < 1000) return ms + " ms";
    if (ms < 120000) return (ms / 1000).toFixed(1) + " s";
    if (ms < 7200000) return Math.round(ms / 60000) + " min";
    return (ms / 3600000).toFixed(1) + " h";
  };
  const isoDay = (d) => d.toISOString().slice(0, 10);
  const clock = (ms) => new Date(ms).toLocaleTimeString();

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text != null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    return e;
  }

  // ---- talking to the daemon ------------------------------------------

  class HttpError extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.error)) || "HTTP " + status);
      this.status = status;
    }
  }

  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  // The DLQ's size from /stats/summary, to say how much of it is listed.
  let dlqTotal = 0;

  async function call(path, method = "GET", body) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    const headers = {};
    if (token) headers.Authorization = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    try {
      const r = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: ctl.signal,
        cache: "no-store",
      });
      let data = null;
      try {
        data = await r.json();
      } catch (_) {
        data = null;
      }
      if (!r.ok && !(path === "/ready" && data && data.status)) throw new HttpError(r.status, data);
      return data;
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- what each answer draws -----------------------------------------

  function showReady(ready) {
    const state = $("state");
    state.textContent = ready.status;
    state.className = "pill " + ready.status;
    if (ready.status === "draining") {
      banner("inletd is draining (shutting down); this page reconnects when it is back.");
    } else if (ready.status === "storage_failed") {
      banner("inletd's store failed a commit: intake answers 503 until one succeeds. See the daemon's log.");
    } else {
      banner(null);
    }
  }

  function banner(text) {
    const b = $("banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  function showSummary(s) {
    $("total-events").textContent = fmt(s.total_events);
    // With Redis the total is the deployment's (every instance's).
    $("total-scope").textContent =
      s.scope === "deployment"
        ? "processed, all time, by " + (s.instances || []).length + " instances"
        : s.scope === "instance"
          ? "processed by this instance (Redis unreachable)"
          : "processed, all time";
    $("queue-depth").textContent = fmt(s.queue_depth);
    $("dlq-size").textContent = fmt(s.dlq_size);
    const l = s.latency_ms || {};
    $("ack-p50").textContent = millis(l.ack_p50);
    $("ack-p99").textContent = millis(l.ack_p99);
    // Receipt→processed comes from the store's histogram: a bucket's
    // upper bound, so "at most".
    $("proc-p50").textContent = l.p50 ? "≤ " + millis(l.p50) : millis(l.p50);
    $("proc-p99").textContent = l.p99 ? "≤ " + millis(l.p99) : millis(l.p99);
    const sinks = s.sinks || [];
    $("no-sinks").hidden = sinks.length > 0;
    $("sinks-table").hidden = sinks.length === 0;
    dlqTotal = s.dlq_size;
    const body = $("sinks");
    if (!changed(body, sinks)) return;
    for (const sink of sinks) {
      const tr = el("tr");
      tr.dataset.sink = sink.name;
      tr.append(el("td", sink.name));
      const words = { open: "circuit open", half_open: "probing with the next batch" };
      let state = words[sink.state] || sink.state;
      if (sink.state === "open" && sink.open_until_ms) state += " until " + clock(sink.open_until_ms);
      tr.append(el("td", state, "state state-" + sink.state));
      tr.append(el("td", fmt(sink.consecutive_failures), "num"));
      tr.append(el("td", sink.last_error || "", "error"));
      body.append(tr);
    }
  }

  function showRate(r) {
    const accepted = r.accepted || [];
    $("rate-now").textContent = fmt(accepted.length ? accepted[accepted.length - 1] : 0);
    lineChart($("rate-chart"), [
      { values: accepted, cls: "accepted" },
      { values: r.processed || [], cls: "processed" },
    ], ["−5 min", "now"]);
  }

  // The user-defined windows /stats/windows lists, each from its own
  // endpoint, in one card.
  async function showCustomWindows(names) {
    $("custom-card").hidden = names.length === 0;
    const answers = await Promise.all(
      names.map((name) =>
        call("/stats/windows/" + encodeURIComponent(name) + "?limit=10").catch(() => null),
      ),
    );
    const shown = answers.filter((a) => a);
    const box = $("custom-windows");
    if (!changed(box, shown)) return;
    for (const w of shown) {
      const part = el("div", null, "custom");
      part.dataset.window = w.name;
      const scope = w.scope === "deployment" ? " · all instances" : "";
      part.append(el("h3", w.name + " · last " + w.minutes + " min" + scope));
      const hasSum = w.groups.some((g) => g.sum != null);
      const table = el("table", null, "plain");
      const head = el("tr");
      head.append(el("th", "group"), el("th", "events", "num"));
      if (hasSum) head.append(el("th", "sum", "num"));
      const thead = el("thead");
      thead.append(head);
      const tbody = el("tbody");
      for (const g of w.groups) {
        const tr = el("tr");
        tr.append(el("td", g.key), el("td", fmt(g.count), "num"));
        if (hasSum) tr.append(el("td", fmt(g.sum), "num"));
        tbody.append(tr);
      }
      if (w.groups.length === 0) {
        const tr = el("tr");
        const td = el("td", "nothing in the window", "muted");
        td.colSpan = hasSum ? 3 : 2;
        tr.append(td);
        tbody.append(tr);
      }
      table.append(thead, tbody);
      part.append(table);
      box.append(part);
    }
  }

  // With Redis some answers are the deployment's (`scope`).
  const allInstances = (answer) => (answer.scope === "deployment" ? " (all instances)" : "");

  function showWindows(w) {
    showCustomWindows(w.custom || []);
    // With Redis the windows are the deployment's; users and sessions past
    // dau_exact_max in a minute are estimates (`exact: false`), shown "≈".
    $("now-scope").textContent = allInstances(w);
    const about = w.exact === false ? "≈" : "";
    $("active-users").textContent = about + fmt(w.active_users_5m);
    $("active-sessions").textContent = about + fmt(w.active_sessions_5m);
    $("page-views").textContent = fmt(w.page_views_15m);
    const body = $("top-pages");
    body.replaceChildren();
    for (const p of w.top_pages_15m || []) {
      const tr = el("tr");
      tr.append(el("td", p.page), el("td", fmt(p.views), "num"));
      body.append(tr);
    }
  }

  function showDau(d) {
    if (d.to && d.to !== today) {
      retentionDue = true;
      trendsDue = true;
      today = d.to;
    }
    const days = d.days || [];
    // With Redis the users are the deployment's; a day past dau_exact_max
    // is an estimate (`exact: false`), shown with "≈".
    const count = (x) => (x.exact === false ? "≈" : "") + fmt(x.users);
    $("dau-today").textContent = days.length ? count(days[days.length - 1]) : fmt(0);
    $("dau-scope").textContent = allInstances(d);
    barChart(
      $("dau-chart"),
      days.map((x) => ({
        label: x.date,
        value: x.users,
        title: x.date + ": " + count(x) + " users",
      })),
    );
  }

  function showTopEvents(t) {
    $("top-scope").textContent = allInstances(t);
    offer($("trend-type"), (t.events || []).map((e) => e.event_type).sort());
    const body = $("top-events");
    body.replaceChildren();
    const events = t.events || [];
    const max = Math.max(1, ...events.map((e) => e.count));
    for (const e of events) {
      const tr = el("tr");
      const name = el("td", e.event_type, "type");
      const bar = el("span", null, "bar");
      bar.style.width = (100 * e.count) / max + "%";
      name.append(bar);
      tr.append(name, el("td", fmt(e.count), "count"));
      body.append(tr);
    }
  }

  // The daemon's today (UTC), from /stats/dau's `to`: the browser's
  // clock may be off, or on the other side of midnight.
  let today = null;

  function retentionPath() {
    const end = today ? Date.parse(today + "T00:00:00Z") : Date.now();
    const start = (days) => isoDay(new Date(end - days * 86400000));
    return $("retention-type").value === "weekly"
      ? "/stats/retention?window_type=weekly&windows=8&start_date=" + start(55)
      : "/stats/retention?window_type=daily&windows=7&start_date=" + start(6);
  }

  function showRetention(r) {
    const table = $("retention");
    table.replaceChildren();
    const cohorts = r.cohorts || [];
    const unit = r.window_type === "weekly" ? "week " : "day ";
    const head = el("tr");
    head.append(el("th", "cohort"), el("th", "users"));
    for (let k = 0; k < cohorts.length; k++) head.append(el("th", unit + k));
    const thead = el("thead");
    thead.append(head);
    const tbody = el("tbody");
    for (const c of cohorts) {
      const tr = el("tr");
      tr.append(el("th", c.cohort), el("td", fmt(c.size)));
      for (let k = 0; k < cohorts.length; k++) {
        if (k >= c.retained.length) {
          tr.append(el("td"));
          continue;
        }
        const n = c.retained[k];
        const share = c.size ? n / c.size : 0;
        const td = el("td", c.size ? Math.round(share * 100) + "%" : "–");
        td.title = fmt(n) + " of " + fmt(c.size) + " users";
        td.dataset.users = n;
        // At most 45% colour, so that the text stays readable on it.
        td.style.backgroundColor = "rgba(var(--heat), " + (0.05 + 0.4 * share).toFixed(3) + ")";
        tr.append(td);
      }
      tbody.append(tr);
    }
    table.append(thead, tbody);
  }

  function trendsPath() {
    const interval = $("trend-interval").value;
    const back = { day: 29, week: 83, month: 365 }[interval];
    const end = today ? Date.parse(today + "T00:00:00Z") : Date.now();
    let path =
      "/stats/trends?interval=" + interval +
      "&from=" + isoDay(new Date(end - back * 86400000)) +
      "&to=" + isoDay(new Date(end));
    const type = $("trend-type").value;
    if (type) path += "&event_type=" + encodeURIComponent(type);
    const sum = $("trend-sum").value;
    if (sum) path += "&sum=" + encodeURIComponent(sum);
    return path;
  }

  // Fills a <select> with `values` (after its first option), keeping the
  // choice made.
  function offer(select, values) {
    const keep = select.value;
    const have = [...select.options].slice(1).map((o) => o.value);
    if (JSON.stringify(have) === JSON.stringify(values)) return;
    while (select.options.length > 1) select.remove(1);
    for (const v of values) select.append(new Option(v, v));
    select.value = values.includes(keep) ? keep : "";
  }

  function showTrends(t) {
    const summable = t.summable || [];
    $("trend-sum").hidden = summable.length === 0;
    offer($("trend-sum"), summable);
    const series = t.series || [];
    const withSum = t.sum != null;
    $("trend-sum-head").hidden = !withSum;
    $("trend-scope").textContent = allInstances(t);
    // A period's users past dau_exact_max are an estimate: "≈".
    const users = (p) => (p.exact === false ? "≈" : "") + fmt(p.users);
    barChart(
      $("trend-chart"),
      series.map((p) => ({
        label: p.period,
        value: p.count,
        title: p.period + ": " + fmt(p.count) + " events, " + users(p) + " users",
      })),
    );
    const body = $("trends");
    if (!changed(body, series)) return;
    for (const p of [...series].reverse()) {
      const tr = el("tr");
      tr.append(el("td", p.period), el("td", fmt(p.count), "num"), el("td", users(p), "num"));
      if (withSum) tr.append(el("td", fmt(p.sum), "num"));
      body.append(tr);
    }
  }

  function showQueue(q) {
    $("queue-age").textContent = age(q.oldest_age_ms);
  }

  function showDlq(list) {
    const entries = list.entries || [];
    $("dlq-replay-all").disabled = entries.length === 0;
    $("dlq-shown").textContent =
      entries.length && dlqTotal > entries.length
        ? "The oldest " + fmt(entries.length) + " of " + fmt(dlqTotal) + " entries."
        : "";
    const body = $("dlq-table");
    if (!changed(body, entries)) return;
    for (const e of entries) {
      const tr = el("tr");
      tr.dataset.id = e.id;
      const replay = el("button", "Replay");
      replay.type = "button";
      replay.className = "replay";
      replay.addEventListener("click", () => act(() => call("/admin/dlq/replay", "POST", { ids: [e.id] })));
      const remove = el("button", "Delete");
      remove.type = "button";
      remove.className = "delete";
      remove.addEventListener("click", () => {
        if (confirm("Delete DLQ entry " + e.id + "? Its event will not be delivered to " + e.sink + ".")) {
          act(() => call("/admin/dlq/" + e.id, "DELETE"));
        }
      });
      const actions = el("td");
      actions.append(replay, " ", remove);
      tr.append(
        el("td", String(e.id)),
        el("td", e.sink),
        el("td", e.record.event_type),
        el("td", e.record.key),
        el("td", fmt(e.attempts), "num"),
        el("td", new Date(e.last_failed_ms).toLocaleString()),
        el("td", e.error, "error"),
        actions,
      );
      body.append(tr);
    }
  }

  // Empties a chart and sizes its drawing to its box, so that text is
  // drawn at its own size whatever the width; answers [width, height].
  function fit(chart) {
    chart.replaceChildren();
    const W = Math.max(200, Math.round(chart.clientWidth || 600));
    const H = Math.max(100, Math.round(chart.clientHeight || 180));
    chart.setAttribute("viewBox", "0 0 " + W + " " + H);
    return [W, H];
  }

  // Whether `rows` differ from what `body` shows; when they do, empties
  // it for them. Tables are rebuilt only then, so that focus, a selection
  // or a click on a button is not lost to a redraw every 2 s.
  function changed(body, rows) {
    const signature = JSON.stringify(rows);
    if (body.dataset.signature === signature) return false;
    body.dataset.signature = signature;
    body.replaceChildren();
    return true;
  }

  // The admin parts when the admin API refuses: nothing old left to click.
  function clearAdmin() {
    const body = $("dlq-table");
    delete body.dataset.signature;
    body.replaceChildren();
    $("dlq-replay-all").disabled = true;
    $("dlq-shown").textContent = "";
    $("queue-age").textContent = "–";
  }

  // The frame every chart shares: the axis, the top and zero of the
  // scale, and the first and last labels; answers where to draw.
  function frame(chart, max, first, last) {
    const [W, H] = fit(chart);
    const area = { left: 36, right: W, top: 8, bottom: H - 18 };
    chart.append(svg("line", { x1: area.left, y1: area.bottom, x2: W, y2: area.bottom, class: "axis" }));
    chart.append(svg("text", { x: 0, y: area.top + 8 }, fmt(max)));
    chart.append(svg("text", { x: 0, y: area.bottom }, "0"));
    if (first != null) chart.append(svg("text", { x: area.left, y: H - 4 }, first));
    if (last != null) chart.append(svg("text", { x: W, y: H - 4, "text-anchor": "end" }, last));
    return area;
  }

  // A bar per item, `value` high, with `title` as its tooltip.
  function barChart(chart, items) {
    const max = Math.max(1, ...items.map((x) => x.value));
    const n = items.length;
    const a = frame(chart, max, n ? items[0].label : null, n ? items[n - 1].label : null);
    const step = (a.right - a.left) / Math.max(1, n);
    items.forEach((x, i) => {
      const h = ((a.bottom - a.top) * x.value) / max;
      const bar = svg("rect", {
        x: a.left + i * step + 1,
        y: a.bottom - h,
        width: Math.max(1, step - 2),
        height: h,
      });
      bar.append(svg("title", {}, x.title));
      chart.append(bar);
    });
  }

  // A line per series of values, evenly spaced.
  function lineChart(chart, series, labels) {
    const max = Math.max(1, ...series.flatMap((s) => s.values));
    const a = frame(chart, max, labels[0], labels[1]);
    for (const s of series) {
      const n = s.values.length;
      if (n < 2) continue;
      const points = s.values.map((v, i) => {
        const x = a.left + ((a.right - a.left) * i) / (n - 1);
        const y = a.bottom - ((a.bottom - a.top) * v) / max;
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      chart.append(svg("polyline", { points: points.join(" "), class: s.cls }));
    }
  }

  // ---- the poll loop ----------------------------------------------------

  // [path, what draws it, whether it is admin, how often (every n-th poll)]:
  // the retention triangle costs the daemon most, and moves slowest.
  const RETENTION_EVERY = 15;
  const views = [
    ["/ready", showReady, false, 1],
    ["/stats/summary", showSummary, false, 1],
    ["/stats/rate", showRate, false, 1],
    ["/stats/windows", showWindows, false, 1],
    ["/stats/dau", showDau, false, 1],
    ["/stats/top-events?limit=10", showTopEvents, false, 1],
    [retentionPath, showRetention, false, RETENTION_EVERY],
    [trendsPath, showTrends, false, RETENTION_EVERY],
    ["/admin/queue", showQueue, true, 1],
    ["/admin/dlq?limit=" + DLQ_ROWS, showDlq, true, 1],
  ];

  let timer = null;
  let running = false;
  let again = false;
  let polls = 0;
  let retentionDue = true;
  let trendsDue = true;

  async function poll() {
    const due = views.filter(([path, , , every]) =>
      every === 1 || polls % every === 0 || (path === retentionPath && retentionDue) ||
        (path === trendsPath && trendsDue),
    );
    polls += 1;
    const results = await Promise.allSettled(
      due.map(([path]) => call(typeof path === "function" ? path() : path)),
    );
    let down = false;
    const unauthorized = [];
    let adminForbidden = false;
    let adminRefused = false;
    results.forEach((r, i) => {
      const [path, show, admin] = due[i];
      if (r.status === "fulfilled") {
        if (path === retentionPath) retentionDue = false;
        if (path === trendsPath) trendsDue = false;
        try {
          show(r.value);
        } catch (err) {
          // One odd answer must not stop the page: the rest still draws.
          console.error("drawing " + path + ": " + err);
        }
        return;
      }
      const err = r.reason;
      if (!(err instanceof HttpError)) {
        down = true;
      } else if (err.status === 401) {
        unauthorized.push(admin ? "admin" : "stats");
        adminRefused ||= admin;
      } else if (err.status === 403) {
        adminForbidden = true;
        adminRefused = true;
      }
    });
    if (adminRefused) clearAdmin();
    document.querySelector("main").classList.toggle("stale", down);
    if (down) {
      $("state").textContent = "not answering";
      $("state").className = "pill down";
      banner("inletd is not answering (restarting or stopped); this page keeps trying every 2 s.");
    } else {
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    }
    showTokenForm(unauthorized);
    $("dlq-note").textContent = adminForbidden
      ? "The admin API answers loopback callers only: set admin_token in the config to use it from here."
      : unauthorized.includes("admin")
        ? "The admin API wants admin_token: enter it above."
        : $("dlq-note").dataset.report || "";
  }

  function showTokenForm(unauthorized) {
    const form = $("token-form");
    form.hidden = unauthorized.length === 0;
    if (form.hidden) return;
    let text;
    if (unauthorized.includes("stats")) {
      text = (token ? "That token was refused. " : "") +
        "This daemon's figures ask for its stats_token or admin_token.";
    } else {
      text = token
        ? "That token opens the figures, not the admin API (DLQ, queue): enter admin_token for those."
        : "The admin API (DLQ, queue) asks for admin_token.";
    }
    $("token-label").textContent = text;
  }

  async function loop() {
    clearTimeout(timer);
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await poll();
    } finally {
      running = false;
      if (again) {
        again = false;
        loop();
      } else {
        timer = setTimeout(loop, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
      }
    }
  }

  async function act(request) {
    const note = $("dlq-note");
    try {
      const report = await request();
      note.dataset.report =
        report && report.replayed != null
          ? "Replayed " + fmt(report.replayed) + "; " + fmt(report.remaining) + " still parked."
          : report && report.removed != null
            ? "Deleted " + fmt(report.removed) + "."
            : "";
    } catch (err) {
      note.dataset.report = "Failed: " + err.message;
    }
    note.textContent = note.dataset.report;
    loop();
  }

  $("dlq-replay-all").addEventListener("click", () =>
    act(() => call("/admin/dlq/replay?limit=1000", "POST")),
  );
  $("retention-type").addEventListener("change", () => {
    retentionDue = true;
    loop();
  });
  for (const id of ["trend-interval", "trend-type", "trend-sum"]) {
    $(id).addEventListener("change", () => {
      trendsDue = true;
      loop();
    });
  }
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token-input").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("token-input").value = "";
    loop();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) loop();
  });
  loop();
})();
