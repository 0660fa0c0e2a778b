/* WhatsTracking console: the overview (reports) of a company with leads.

   Also defines window.WTV, the small helpers the three data views share (reports.js, leads.js,
   settings.js): their styles, plain-language names for sources, match methods, events and
   delivery states, company-day arithmetic, sortable tables that fold into cards on a phone, and
   API error messages in the user's language. dashboard.html loads reports.js before leads.js and
   settings.js, and views render only after every script ran. */
(function () {
  "use strict";
  var h = WT.h;

  // ---- styles the data views add to the shell's --------------------------------------------

  var CSS = [
    ".v-toolbar { display: flex; flex-wrap: wrap; gap: .25rem 1rem; align-items: flex-end;",
    "  justify-content: space-between; margin-bottom: .75rem; }",
    ".v-toolbar h1 { margin: 0 0 .5rem; }",
    ".v-funnel { display: grid; gap: .75rem; grid-template-columns: repeat(auto-fit, minmax(10.5rem, 1fr)); }",
    ".v-step { background: var(--bg); border-radius: 8px; padding: .7rem .8rem; min-width: 0; }",
    ".v-step .v-label { color: var(--muted); font-size: .88rem; display: block; }",
    ".v-step .stat { margin: .1rem 0 .15rem; }",
    ".v-step small { color: var(--muted); display: block; }",
    ".v-step small.warn { color: var(--warn); font-weight: 600; }",
    ".v-explain { color: var(--muted); font-size: .9rem; margin: .8rem 0 0; }",
    ".v-explain b { color: var(--ink); }",
    ".v-chart { width: 100%; min-height: 14rem; }",
    ".v-chart svg { display: block; }",
    ".v-chart text { font-size: 12px; fill: var(--muted); font-family: inherit; }",
    ".v-chart .v-grid { stroke: var(--line); stroke-width: 1; }",
    ".v-chart .v-axis { stroke: #9aa5b1; stroke-width: 1; }",
    ".v-chart rect.v-bar { fill: var(--accent); }",
    ".v-chart rect.v-bar:hover { fill: #0b5c51; }",
    ".v-methods { list-style: none; margin: 0; padding: 0; display: grid; gap: .55rem; }",
    ".v-methods li { display: grid; grid-template-columns: minmax(0, 1fr) auto; gap: .1rem .75rem; }",
    ".v-methods .v-meter { grid-column: 1 / -1; height: .45rem; background: var(--bg); border-radius: 99px; overflow: hidden; }",
    ".v-methods .v-meter span { display: block; height: 100%; background: var(--accent); border-radius: 99px; }",
    ".v-methods .num { font-variant-numeric: tabular-nums; white-space: nowrap; }",
    ".v-sort { font: inherit; color: inherit; background: none; border: 0; padding: 0; cursor: pointer; white-space: nowrap; }",
    ".v-sort::after { content: ' \\2195'; color: #9aa5b1; }",
    ".v-sort[aria-sort=ascending]::after { content: ' \\2191'; color: var(--ink); }",
    ".v-sort[aria-sort=descending]::after { content: ' \\2193'; color: var(--ink); }",
    "td .v-sub { display: block; color: var(--muted); font-size: .84rem; }",
    ".v-filters { display: grid; gap: 0 .75rem; grid-template-columns: repeat(auto-fit, minmax(11rem, 1fr)); }",
    ".v-filters .field { margin-bottom: .6rem; align-content: end; }",
    "td.v-nowrap { white-space: nowrap; }",
    ".v-search { display: flex; gap: .5rem; align-items: flex-end; }",
    ".v-search .field { flex: 1; margin-bottom: 0; }",
    "tr.v-row { cursor: pointer; }",
    "tr.v-row:hover { background: #f7f9fb; }",
    "tr.v-row a { font-weight: 600; text-decoration: none; }",
    ".v-count { color: var(--muted); margin: .6rem 0; }",
    ".v-more { display: flex; justify-content: center; margin-top: .75rem; }",
    ".v-token { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em;",
    "  display: block; max-width: 100%; overflow-x: auto; white-space: nowrap; }",
    ".v-url { overflow-wrap: normal; word-break: normal; }",
    ".v-actions { display: flex; flex-wrap: wrap; gap: .5rem; }",
    ".v-timeline { list-style: none; margin: 0; padding: 0; border-left: 2px solid var(--line); }",
    ".v-timeline li { position: relative; padding: 0 0 .8rem 1rem; }",
    ".v-timeline li::before { content: ''; position: absolute; left: -.4rem; top: .45rem; width: .7rem;",
    "  height: .7rem; border-radius: 50%; background: var(--accent); }",
    ".v-timeline .muted { display: block; font-size: .86rem; }",
    ".v-delivery { border: 1px solid var(--line); border-radius: 8px; padding: .7rem .8rem; margin-bottom: .6rem; }",
    ".v-delivery-head { display: flex; flex-wrap: wrap; gap: .4rem .75rem; align-items: center;",
    "  justify-content: space-between; }",
    ".v-delivery dl.facts { margin-top: .5rem; }",
    "details.v-answer { margin-top: .5rem; }",
    "details.v-answer summary { cursor: pointer; color: var(--accent); }",
    "pre.v-json { font: .84rem/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f1f4f7;",
    "  border: 1px solid var(--line); border-radius: 8px; padding: .6rem .7rem; margin: .4rem 0 0;",
    "  overflow-x: auto; white-space: pre; max-height: 22rem; }",
    ".v-message { white-space: pre-wrap; background: var(--bg); border-radius: 8px; padding: .6rem .8rem; margin: 0; }",
    ".v-back { display: inline-block; margin-bottom: .5rem; }",
    ".v-lead-head { display: flex; flex-wrap: wrap; gap: .25rem .75rem; align-items: baseline; }",
    ".v-lead-head h1 { margin: 0; }",
    "#lead-attribution h3 { margin: 1.1rem 0 .4rem; }",
    ".v-form-actions { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin-top: .25rem; }",
    ".v-form-actions .error { margin: 0; }",
    ".v-secret { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; margin-bottom: .85rem; }",
    ".v-secret .v-secret-label { font-weight: 600; font-size: .92rem; width: 100%; }",
    ".v-map-row { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr) auto; gap: .5rem; align-items: end; margin-bottom: .5rem; }",
    ".v-map-row .field { margin-bottom: 0; }",
    ".v-rule { border: 1px solid var(--line); border-radius: 8px; padding: .7rem .8rem .6rem; margin-bottom: .6rem; }",
    ".v-rule-fields { display: grid; gap: 0 .75rem; grid-template-columns: minmax(0, 1fr) minmax(0, 2fr) minmax(0, 1fr); }",
    ".v-rule-try { border-top: 1px solid var(--line); margin-top: 1rem; padding-top: .25rem; }",
    ".v-rule-try h3 { margin: .75rem 0 .5rem; }",
    "ul.v-rule-fired { margin: .5rem 0 .25rem; padding-left: 1.2rem; }",
    ".v-two { display: grid; gap: 0 1rem; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr)); }",
    ".view-settings .field.check { flex-wrap: wrap; }",
    ".view-settings .field.check > label { flex: 1 1 0; min-width: 0; }",
    ".view-settings .field.check .help { flex-basis: 100%; padding-left: 1.6rem; }",
    "#settings-body > * { max-width: 52rem; }",
    ".v-section-title { margin-top: 1.5rem; }",
    ".v-state { border-radius: 8px; padding: .5rem .75rem; margin: 0 0 .85rem; background: var(--bg); }",
    ".v-state.ok { background: var(--ok-soft); color: var(--ok); }",
    ".v-state.warn { background: var(--warn-soft); color: var(--warn); }",
    ".v-state.bad { background: var(--bad-soft); color: var(--bad); }",
    "details.v-names-box { margin: 0 0 .85rem; }",
    "details.v-names-box > summary { cursor: pointer; color: var(--accent); font-weight: 600; margin-bottom: .4rem; }",
    "table.v-names { width: 100%; }",
    "table.v-names td, table.v-names th { vertical-align: middle; }",
    "table.v-names .v-names-event { font-weight: 600; }",
    ".v-names-cell { display: flex; align-items: center; gap: .45rem; min-width: 11rem; }",
    ".v-names-cell input[type=text] { flex: 1 1 auto; min-width: 0; width: 100%; }",
    ".v-names-cell input[type=checkbox] { width: 1.15rem; height: 1.15rem; flex: none; margin: 0; }",
    ".v-names-cell input.input { min-height: 2.3rem; padding: .35rem .55rem; }",
    ".v-names-cell input:disabled { background: var(--bg); color: var(--muted); }",
    ".v-erase { border-color: var(--bad-soft); }",
    ".v-erased { margin: .5rem 0 0; }",
    ".v-inline-select { font: inherit; padding: .35rem .5rem; border: 1px solid #c4ccd5; border-radius: 8px;",
    "  background: #fff; color: var(--ink); min-height: 2.3rem; }",
    "@media (max-width: 760px) {",
    "  .v-search { flex-wrap: wrap; }",
    "  .v-search .field { flex: 1 1 100%; margin-bottom: .25rem; }",
    "  .v-filters { grid-template-columns: 1fr 1fr; }",
    "  .v-funnel { grid-template-columns: 1fr 1fr; }",
    "  .v-step[data-step=leads], .v-step[data-step=sales], .v-step[data-step=match] { grid-column: 1 / -1; }",
    "  table.stack.v-compact tr { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: .1rem .75rem; padding: .6rem 0; }",
    "  table.stack.v-compact td { width: auto; }",
    "  table.stack.v-compact td.v-wide { grid-column: 1 / -1; }",
    "  table.stack.v-compact td:first-child { grid-column: 1 / -1; font-weight: 600; font-size: 1rem; }",
    "  table.stack.v-compact td:first-child::before, table.stack.v-compact td.v-bare::before { content: none; }",
    "  .v-map-row { grid-template-columns: 1fr 1fr; }",
    "  .v-rule-fields { grid-template-columns: 1fr; }",
    "  table.stack.v-names tr { padding: .5rem 0; }",
    "  table.stack.v-names td[data-label]::before { display: block; margin-bottom: .15rem; }",
    "  table.stack.v-names td.v-names-event { font-size: 1rem; }",
    "  .v-names-cell { min-width: 0; }",
    "  .v-map-row .btn { grid-column: 1 / -1; justify-self: start; }",
    "  table.stack td .v-sub { display: inline; margin-left: .35rem; }",
    "  .v-toolbar .range-picker { width: 100%; }",
    "  .v-toolbar .range-picker > .field { flex: 1 1 100%; }",
    "  .v-toolbar .range-custom { width: 100%; }",
    "  .v-toolbar .range-custom .field { flex: 1 1 8rem; width: auto; }",
    "}"
  ].join("\n");

  function injectStyle() {
    if (document.getElementById("wt-views-style")) return;
    var style = document.createElement("style");
    style.id = "wt-views-style";
    style.textContent = CSS;
    document.head.appendChild(style);
  }

  // ---- names in plain words ----------------------------------------------------------------

  var METHODS = ["code", "ctwa", "window", "none"];

  /* A report key or lead attribute as people read it: (none), "direct", "meta_ads" named. */
  function keyName(group, key) {
    if (key == null || key === "") return WT.t("reports.none." + group);
    if (group === "utm_source" && (key === "direct" || key === "meta_ads")) {
      return WT.t("reports.source." + key);
    }
    if (group === "utm_medium" && key === "ctwa") return WT.t("reports.medium.ctwa");
    return String(key);
  }
  function methodName(m) { return WT.has("method." + m) ? WT.t("method." + m) : String(m); }
  function methodBadge(m) {
    var kind = {code: "ok", ctwa: "info", window: "warn", none: ""}[m] || "";
    return h("span", {class: "badge " + kind, dataset: {method: m}}, methodName(m));
  }
  function confidenceText(c) {
    if (c == null) return "–";
    if (c >= 0.99) return WT.t("method.confidence.sure");
    if (c > 0) return WT.t("method.confidence.likely");
    return WT.t("method.confidence.none");
  }
  function eventName(n) { return WT.has("events.name." + n) ? WT.t("events.name." + n) : n; }
  function statusName(s) {
    return WT.has("deliveries.status." + s) ? WT.t("deliveries.status." + s) : s;
  }
  function statusBadge(s) {
    var kind = {delivered: "ok", failed: "bad", pending: "warn", sending: "warn",
                skipped: ""}[s] || "";
    return h("span", {class: "badge " + kind, dataset: {status: s}}, statusName(s));
  }
  function destinationName(d) {
    return WT.has("deliveries.destination." + d) ? WT.t("deliveries.destination." + d) : d;
  }

  // ---- company days ------------------------------------------------------------------------

  function company() { return (WT.session && WT.session.company) || {}; }
  function currency() { return company().currency || "BRL"; }

  function parseDay(day) {
    var p = String(day).split("-");
    return Date.UTC(Number(p[0]), Number(p[1]) - 1, Number(p[2]));
  }
  function dayString(ms) { return new Date(ms).toISOString().slice(0, 10); }
  function addDays(day, n) { return dayString(parseDay(day) + n * 86400000); }
  function daysBetween(from, to) {  // inclusive list of YYYY-MM-DD
    var out = [], d = parseDay(from), end = parseDay(to);
    while (d <= end && out.length < 3700) { out.push(dayString(d)); d += 86400000; }
    return out;
  }
  function shortDay(day) {
    return new Intl.DateTimeFormat(WT.lang, {day: "2-digit", month: "2-digit", timeZone: "UTC"})
      .format(new Date(parseDay(day)));
  }

  // ---- tables ------------------------------------------------------------------------------

  /* A sortable table that folds into labelled cards on a phone (the shell's table.stack).
     columns: [{key, label, num, value(row) → sortable, cell(row) → node|text}] */
  function sortableTable(columns, rows, opts) {
    opts = opts || {};
    var state = {key: opts.sort || null, desc: opts.desc !== false};
    var table = h("table", {class: "stack " + (opts.className || ""), id: opts.id || null});
    var thead = h("thead"), tbody = h("tbody");
    table.appendChild(thead); table.appendChild(tbody);
    function header() {
      thead.replaceChildren(h("tr", {}, columns.map(function (c) {
        var sort = state.key === c.key ? (state.desc ? "descending" : "ascending") : null;
        return h("th", {class: c.num ? "num" : null, scope: "col", "aria-sort": sort},
          c.sortable === false ? c.label : h("button", {
            type: "button", class: "v-sort", "aria-sort": sort || "none",
            dataset: {sort: c.key},
            onclick: function () {
              state.desc = state.key === c.key ? !state.desc : true;
              state.key = c.key;
              draw();
            }}, c.label));
      })));
    }
    function value(c, r) { return c.value ? c.value(r) : r[c.key]; }
    function draw() {
      header();
      var list = rows.slice();
      var col = columns.filter(function (c) { return c.key === state.key; })[0];
      if (col) {
        var dir = state.desc ? -1 : 1;
        list.sort(function (a, b) {
          var x = value(col, a), y = value(col, b);
          if (x == null && y == null) return 0;
          if (x == null) return 1;
          if (y == null) return -1;
          if (typeof x === "string" || typeof y === "string") {
            return String(x).localeCompare(String(y), WT.lang) * dir;
          }
          return (x < y ? -1 : x > y ? 1 : 0) * dir;
        });
      }
      tbody.replaceChildren.apply(tbody, list.map(function (r) {
        var tr = h("tr", opts.rowAttrs ? opts.rowAttrs(r) : {});
        columns.forEach(function (c) {
          var content = c.cell ? c.cell(r) : value(c, r);
          tr.appendChild(h("td", {class: c.num ? "num" : null, "data-label": c.label}, content));
        });
        return tr;
      }));
    }
    draw();
    return table;
  }

  // ---- errors in the user's words ----------------------------------------------------------

  /* The fields a 400 from PATCH /api/company or a view's form can name, in the order to look
     for them (longer names first, so "window_minutes" is not read as "window"). */
  var ERROR_FIELDS = ["chat_rules", "attribution_window_days", "window_minutes", "code_template", "code_mode",
    "allowed_origins", "timezone", "currency", "label_events", "google_ads_conversions",
    "store_first_message", "window_match", "webhook_auth_required", "evolution_url",
    "evolution_key", "meta.event_names", "ga4.event_names", "meta.dataset_id", "meta.access_token",
    "meta.waba_id", "meta.test_event_code", "ga4.measurement_id", "ga4.api_secret",
    "meta.messaging_dataset_id", "meta.messaging_access_token", "meta.page_id",
    "tiktok.pixel_code", "tiktok.access_token", "tiktok.test_event_code", "tiktok.event_names",
    "data_manager.customer_id", "data_manager.login_customer_id",
    "data_manager.service_account_key", "data_manager.conversion_actions",
    "crm_webhook.url", "crm_webhook.secret", "conversion_name", "value", "name"];

  /* An ApiError as text in the user's language: a field the message names has a sentence of
     ours (settings.error.<field>); else the core's translation (which falls back to the API's
     own words). */
  function errorText(e) {
    var raw = e && e.body && typeof e.body.error === "string" ? e.body.error : "";
    if (raw && e.status === 400) {
      if (/public internet address/i.test(raw)) return WT.t("settings.error.private_url");
      if (/host name does not resolve/i.test(raw)) return WT.t("settings.error.unresolvable");
      var rule = raw.match(/^chat_rules\[(\d+)\]\.(\w+)/);  // "chat_rules[2].keywords must be ..."
      if (rule) {
        return WT.t(WT.has("settings.error.chat_rules." + rule[2])
          ? "settings.error.chat_rules." + rule[2] : "settings.error.chat_rules",
          {n: Number(rule[1]) + 1});
      }
      for (var i = 0; i < ERROR_FIELDS.length; i++) {
        var f = ERROR_FIELDS[i];
        if (raw.indexOf(f) >= 0 && WT.has("settings.error." + f)) {
          var extra = raw.match(/'([^']*)'/);
          return WT.t("settings.error." + f, {value: extra ? extra[1] : ""});
        }
      }
    }
    return WT.errorText(e);
  }

  function errorBox(id) { return h("p", {class: "error", role: "alert", id: id || null}); }

  window.WTV = {
    injectStyle: injectStyle, METHODS: METHODS, keyName: keyName, methodName: methodName,
    methodBadge: methodBadge, confidenceText: confidenceText, eventName: eventName,
    statusName: statusName, statusBadge: statusBadge, destinationName: destinationName,
    company: company, currency: currency, addDays: addDays, daysBetween: daysBetween,
    parseDay: parseDay, shortDay: shortDay, sortableTable: sortableTable, errorText: errorText,
    errorBox: errorBox
  };

  // ---- the overview --------------------------------------------------------------------------

  var GROUPS = ["utm_source", "utm_campaign", "ad_id", "connection", "utm_medium"];
  var LEAD_FILTER = {utm_source: "utm_source", utm_campaign: "utm_campaign",
                     connection: "connection"};

  function withClick(r) {
    if (r.leads_with_click != null) return r.leads_with_click;
    var m = r.leads_by_method || {};
    return r.leads - (m.ctwa || 0) - (m.none || 0);
  }
  function withoutClick(r) {
    return r.leads_without_click != null ? r.leads_without_click : r.leads - withClick(r);
  }
  /* A share that is a real rate (0–100%); anything above is not shown as one. */
  function rate(part, whole) {
    if (!whole) return null;
    var x = part / whole;
    return x > 1 ? null : x;
  }
  function rateText(ratio) { return ratio == null ? "–" : WT.fmt.percent(ratio); }

  function niceStep(max, ticks) {
    if (max <= ticks) return 1;
    var raw = max / ticks, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var norm = raw / mag;
    return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
  }

  /* Leads per day as bars with a y-axis (counts) and day labels that fit the width. */
  function drawChart(box, days, counts) {
    var width = Math.max(260, Math.floor(box.clientWidth || 600));
    var height = 220, left = 40, right = 8, top = 10, bottom = 26;
    var plotW = width - left - right, plotH = height - top - bottom;
    var max = 0;
    days.forEach(function (d) { max = Math.max(max, counts[d] || 0); });
    var step = niceStep(Math.max(max, 1), 4);
    var top_ = Math.max(step, Math.ceil(Math.max(max, 1) / step) * step);
    var svg = h("svg", {width: width, height: height, viewBox: "0 0 " + width + " " + height,
                        role: "img", "aria-label": WT.t("reports.chart_label")});
    for (var v = 0; v <= top_ + 1e-9; v += step) {
      var y = top + plotH - (v / top_) * plotH;
      svg.appendChild(h("svg:line", {class: v === 0 ? "v-axis" : "v-grid", x1: left, x2: width - right,
                                     y1: y, y2: y}));
      svg.appendChild(h("svg:text", {x: left - 6, y: y + 4, "text-anchor": "end",
                                     class: "v-ytick"}, WT.fmt.number(v)));
    }
    svg.appendChild(h("svg:line", {class: "v-axis", x1: left, x2: left, y1: top, y2: top + plotH}));
    var slot = plotW / Math.max(days.length, 1);
    var every = Math.max(1, Math.ceil(days.length / Math.max(1, Math.floor(plotW / 52))));
    days.forEach(function (d, i) {
      var n = counts[d] || 0, bh = (n / top_) * plotH;
      var bw = Math.max(1, Math.min(slot - (slot > 6 ? 2 : 0), 48));
      var x = left + i * slot + (slot - bw) / 2;
      var bar = h("svg:rect", {class: "v-bar", x: x.toFixed(2), y: (top + plotH - bh).toFixed(2),
                               width: bw.toFixed(2), height: Math.max(bh, 0).toFixed(2),
                               dataset: {day: d, count: n}});
      bar.appendChild(h("svg:title", {}, WT.fmt.date(d) + ": " +
                        WT.t(n === 1 ? "reports.chart_one" : "reports.chart_many",
                             {count: WT.fmt.number(n)})));
      svg.appendChild(bar);
      if (i % every === 0) {
        svg.appendChild(h("svg:text", {x: (left + i * slot + slot / 2).toFixed(2),
                                       y: height - 8, "text-anchor": "middle"}, shortDay(d)));
      }
    });
    box.replaceChildren(svg);
  }

  function renderOverview(root, params) {
    injectStyle();
    var group = GROUPS.indexOf(params.group) >= 0 ? params.group : "utm_source";
    var picker = WT.rangePicker(params, function (range) {
      params = Object.assign({}, params, range);
      WT.setParams(Object.assign({group: group}, params));
      load();
    });
    var range = picker.value;
    params = Object.assign({}, params, range);

    var status = h("p", {class: "muted", role: "status"}, WT.t("common.loading"));
    var error = errorBox("report-error");
    function stat(id, label) {
      return {num: h("b", {class: "stat", id: "report-" + id}, "–"),
              note: h("small", {id: "report-" + id + "-note"}), label: label};
    }
    var steps = {visits: stat("visits", "reports.funnel.visits"),
                 clicks: stat("clicks", "reports.funnel.clicks"),
                 leads: stat("leads", "reports.funnel.leads"),
                 sales: stat("sales", "reports.funnel.sales"),
                 match: stat("match-rate", "reports.funnel.match_rate")};
    var funnel = h("div", {class: "v-funnel", id: "report-funnel"},
      Object.keys(steps).map(function (k) {
        var s = steps[k];
        return h("div", {class: "v-step", dataset: {step: k}},
                 h("span", {class: "v-label"}, WT.t(s.label)), s.num, s.note);
      }));
    var explain = h("p", {class: "v-explain", id: "report-explain"},
      h("b", {}, WT.t("reports.explain.match_title")), " ", WT.t("reports.explain.match"), " ",
      h("b", {}, WT.t("reports.explain.click_title")), " ", WT.t("reports.explain.click"), " ",
      WT.t("reports.explain.without"));

    var chart = h("div", {class: "v-chart", id: "report-chart"});
    var methods = h("ul", {class: "v-methods", id: "report-methods"});
    var groupSelect = h("select", {id: "report-group", class: "v-inline-select"}, GROUPS.map(function (g) {
      return h("option", {value: g, selected: g === group}, WT.t("reports.group." + g));
    }));
    var groupLabel = h("label", {for: "report-group"}, WT.t("reports.by"));
    var tableBox = h("div", {class: "table-wrap", id: "report-table"});

    root.append(
      h("div", {class: "v-toolbar"}, h("h1", {}, WT.t("reports.title")), picker),
      error, status,
      h("section", {class: "card"}, h("h2", {}, WT.t("reports.funnel.title")), funnel, explain),
      h("div", {class: "v-two"},
        h("section", {class: "card"}, h("h2", {}, WT.t("reports.chart_title")), chart),
        h("section", {class: "card"}, h("h2", {}, WT.t("reports.methods_title")), methods,
          h("p", {class: "v-explain"}, WT.t("reports.methods_help")))),
      h("section", {class: "card"},
        h("div", {class: "spread"}, h("h2", {}, WT.t("reports.table_title")),
          h("div", {class: "row"}, groupLabel, groupSelect)),
        tableBox));

    var daily = null, dayList = [], turn = 0;
    groupSelect.addEventListener("change", function () {
      group = groupSelect.value;
      WT.setParams(Object.assign({}, params, {group: group}));
      loadGroups(turn);
    });

    function query(extra) {
      return Object.assign({from: params.from, to: params.to}, extra);
    }

    function load() {
      var mine = ++turn;
      status.hidden = false;
      error.textContent = "";
      var length = WTV.daysBetween(params.from, params.to).length || 1;
      var before = {from: WTV.addDays(params.from, -length), to: WTV.addDays(params.from, -1)};
      Promise.all([
        WT.api("GET", "/api/report", {query: query({group_by: "day"})}),
        WT.api("GET", "/api/report", {query: Object.assign(before, {group_by: "day"})})
          .catch(function () { return null; })
      ]).then(function (res) {
        if (mine !== turn) return;
        status.hidden = true;
        daily = res[0];
        showFunnel(res[0].totals, res[1] && res[1].totals);
        showMethods(res[0].totals);
        dayList = WTV.daysBetween(params.from, params.to);
        res[0].rows.forEach(function (r) {  // days at the edges in the company's time zone
          if (dayList.indexOf(r.key) < 0) dayList.push(r.key);
        });
        dayList.sort();
        redrawChart();
        root.dataset.loaded = params.from + ".." + params.to;
      }, function (e) {
        if (mine !== turn) return;
        status.hidden = true;
        error.textContent = errorText(e);
      });
      loadGroups(mine);
    }

    function redrawChart() {
      if (!daily) return;
      var counts = {};
      daily.rows.forEach(function (r) { counts[r.key] = r.leads; });
      drawChart(chart, dayList, counts);
    }

    function showFunnel(t, before) {
      var cur = t.currency || currency();
      steps.visits.num.textContent = WT.fmt.number(t.visits);
      steps.visits.note.textContent = WT.t("reports.funnel.visits_note");
      steps.clicks.num.textContent = WT.fmt.number(t.clicks);
      steps.clicks.note.textContent = t.visits
        ? WT.t("reports.funnel.of_visits", {rate: rateText(rate(t.clicks, t.visits))}) : "";
      steps.leads.num.textContent = WT.fmt.number(t.leads);
      var ctl = t.click_to_lead != null && t.click_to_lead <= 1 ? t.click_to_lead
        : rate(withClick(t), t.clicks);
      steps.leads.note.replaceChildren(
        h("span", {id: "report-click-to-lead", class: "v-block"},
          t.clicks ? WT.t("reports.funnel.with_click", {count: WT.fmt.number(withClick(t)),
                                                        rate: rateText(ctl)})
            : WT.t("reports.funnel.with_click_no_clicks", {count: WT.fmt.number(withClick(t))})),
        h("br"),
        h("span", {id: "report-without-click"},
          WT.t("reports.funnel.without_click", {count: WT.fmt.number(withoutClick(t))})));
      steps.sales.num.textContent = WT.fmt.number(t.conversions);
      steps.sales.note.replaceChildren(
        h("b", {id: "report-revenue"}, WT.fmt.money(t.revenue, daily && daily.currency || cur)),
        " ", WT.t("reports.funnel.revenue_note"));
      steps.match.num.textContent = t.match_rate == null ? "–" : WT.fmt.percent(t.match_rate);
      var note = steps.match.note;
      note.className = "";
      note.textContent = t.clicks ? WT.t("reports.funnel.match_note")
        : WT.t("reports.funnel.match_no_clicks");
      var was = before && before.match_rate;
      if (t.match_rate != null && (t.match_rate < 0.5 || (was != null && t.match_rate < was - 0.15))) {
        note.className = "warn";
        note.textContent = was == null || t.match_rate >= was
          ? WT.t("reports.funnel.match_low")
          : WT.t("reports.funnel.match_drop", {was: WT.fmt.percent(was)});
      }
    }

    function showMethods(t) {
      var by = t.leads_by_method || {};
      methods.replaceChildren.apply(methods, METHODS.map(function (m) {
        var n = by[m] || 0, share = t.leads ? n / t.leads : 0;
        return h("li", {dataset: {method: m}},
          h("span", {}, methodName(m)),
          h("span", {class: "num"}, WT.fmt.number(n) +
            (t.leads ? " · " + WT.fmt.percent(share) : "")),
          h("span", {class: "v-meter", "aria-hidden": "true"},
            h("span", {style: {width: (share * 100).toFixed(1) + "%"}})));
      }));
    }

    function loadGroups(mine) {
      var g = group;
      WT.api("GET", "/api/report", {query: query({group_by: g})}).then(function (res) {
        if (mine !== turn || g !== group) return;
        showGroups(res, g);
      }, function (e) {
        if (mine !== turn) return;
        tableBox.replaceChildren(h("p", {class: "error", role: "alert"}, errorText(e)));
      });
    }

    function showGroups(res, g) {
      if (!res.rows.length) {
        tableBox.replaceChildren(WT.empty("reports.table_empty"));
        return;
      }
      var cur = res.currency || currency();
      var columns = [
        {key: "key", label: WT.t("reports.col.name"), value: function (r) { return WTV.keyName(g, r.key); },
         cell: function (r) {
           var name = WTV.keyName(g, r.key);
           if (r.key == null || !LEAD_FILTER[g]) return h("span", {class: "v-name"}, name);
           var p = {range: params.range, from: params.from, to: params.to};
           p[LEAD_FILTER[g]] = r.key;
           return h("a", {href: WT.href("leads", p), class: "v-name"}, name);
         }},
        {key: "visits", label: WT.t("reports.col.visits"), num: true,
         cell: function (r) { return WT.fmt.number(r.visits); }},
        {key: "clicks", label: WT.t("reports.col.clicks"), num: true,
         cell: function (r) { return WT.fmt.number(r.clicks); }},
        {key: "leads", label: WT.t("reports.col.leads"), num: true,
         cell: function (r) { return WT.fmt.number(r.leads); }},
        {key: "without", label: WT.t("reports.col.without_click"), num: true,
         value: withoutClick, cell: function (r) { return WT.fmt.number(withoutClick(r)); }},
        {key: "conversions", label: WT.t("reports.col.sales"), num: true,
         cell: function (r) { return WT.fmt.number(r.conversions); }},
        {key: "revenue", label: WT.t("reports.col.revenue"), num: true,
         cell: function (r) { return WT.fmt.money(r.revenue, cur); }},
        {key: "click_to_lead", label: WT.t("reports.col.click_to_lead"), num: true,
         value: function (r) { return rate(withClick(r), r.clicks); },
         cell: function (r) {
           return rateText(r.click_to_lead != null && r.click_to_lead <= 1 ? r.click_to_lead
                                                                             : rate(withClick(r), r.clicks));
         }},
        {key: "match_rate", label: WT.t("reports.col.match_rate"), num: true,
         cell: function (r) { return rateText(r.match_rate); }}
      ];
      tableBox.replaceChildren(WTV.sortableTable(columns, res.rows, {
        id: "report-groups", sort: "leads", className: "v-compact",
        rowAttrs: function (r) { return {dataset: {key: r.key == null ? "" : r.key}}; }}));
    }

    var resizeTimer = null;
    function onResize() {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(redrawChart, 150);
    }
    window.addEventListener("resize", onResize);
    load();
    return function () {
      turn++;
      window.removeEventListener("resize", onResize);
      clearTimeout(resizeTimer);
    };
  }

  WT.view("overview", {nav: "nav.overview", title: "reports.title", render: renderOverview});
})();
