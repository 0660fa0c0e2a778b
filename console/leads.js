/* WhatsTracking console: the leads (range, filters, search, pages of 50, CSV) and one lead's
   page (attribution, first touch, events, deliveries with the platforms' answers, and the
   actions qualified / purchase / refund / lost). Shared helpers: window.WTV (reports.js). */
(function () {
  "use strict";
  var h = WT.h;
  var PAGE = 50;
  var lastList = {};  // the list's params when a lead was opened from it
  var FILTERS = ["utm_source", "utm_campaign", "match_method", "connection"];

  /* "@ana.doces" for a WhatsApp username (stored without the @), or null. */
  function handle(username) {
    return username ? "@" + String(username).replace(/^@+/, "") : null;
  }
  function identities(l) { return l.identities || {phone: l.phone, lid: l.lid}; }
  /* What to call the lead: the name, else their @username, else "(no name)". */
  function leadName(l) { return l.name || handle(identities(l).username) || WT.t("leads.no_name"); }

  // ---- the list ------------------------------------------------------------------------------

  function renderLeads(root, params) {
    var V = window.WTV;
    V.injectStyle();
    var picker = WT.rangePicker(params, function (range) {
      params = Object.assign({}, params, range);
      remember();
      loadOptions();
      reload();
    });
    params = Object.assign({}, params, picker.value);

    var selects = {};
    function filterField(name) {
      var f = WT.field({label: WT.t("leads.filter." + name), name: name, type: "select",
                        options: [{value: "", label: WT.t("leads.filter.any")}]});
      f.input.id = "leads-filter-" + name;
      f.querySelector("label").setAttribute("for", f.input.id);
      f.input.addEventListener("change", function () {
        params[name] = f.input.value;
        remember();
        reload();
      });
      selects[name] = f.input;
      return f;
    }
    var search = WT.field({label: WT.t("leads.search"), name: "q", type: "search",
                           value: params.q || "", placeholder: WT.t("leads.search_placeholder")});
    search.input.id = "leads-q";
    search.querySelector("label").setAttribute("for", "leads-q");
    var searchTimer = null;
    search.input.addEventListener("input", function () {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(function () {
        params.q = search.input.value.trim();
        remember();
        reload();
      }, 350);
    });
    search.input.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") {
        ev.preventDefault();
        clearTimeout(searchTimer);
        params.q = search.input.value.trim();
        remember();
        reload();
      }
    });
    var clear = h("button", {type: "button", class: "btn ghost", id: "leads-clear",
                             onclick: function () {
                               FILTERS.forEach(function (f) { params[f] = ""; selects[f].value = ""; });
                               params.q = ""; search.input.value = "";
                               remember(); reload();
                             }}, WT.t("leads.clear"));
    var csv = h("button", {type: "button", class: "btn", id: "leads-csv",
                           onclick: function () {
                             csv.disabled = true;
                             WT.download("/api/leads", Object.assign(filters(), {format: "csv"}),
                                         "leads-" + params.from + "-" + params.to + ".csv")
                               .then(function () { WT.toast(WT.t("leads.csv_done")); },
                                     function (e) { WT.toast(V.errorText(e), "error"); })
                               .then(function () { csv.disabled = false; });
                           }}, WT.t("common.download_csv"));

    var error = V.errorBox("leads-error");
    var count = h("p", {class: "v-count", id: "leads-count", role: "status"});
    var list = h("div", {class: "table-wrap", id: "leads-list"});
    var more = h("button", {type: "button", class: "btn", id: "leads-more"}, WT.t("common.more"));
    var moreBox = h("div", {class: "v-more", hidden: true}, more);

    root.append(
      h("div", {class: "v-toolbar"}, h("h1", {}, WT.t("leads.title")), picker),
      h("section", {class: "card"},
        h("div", {class: "v-filters"}, FILTERS.map(filterField)),
        h("div", {class: "v-search"}, search, clear, csv)),
      error,
      h("section", {class: "card"}, count, list, moreBox));

    function filters() {
      var q = {from: params.from, to: params.to};
      FILTERS.forEach(function (f) { if (params[f]) q[f] = params[f]; });
      if (params.q) q.q = params.q;
      return q;
    }
    function remember() {
      var keep = {range: params.range, from: params.from, to: params.to, q: params.q};
      FILTERS.forEach(function (f) { keep[f] = params[f]; });
      if (keep.range !== "custom") { delete keep.from; delete keep.to; }
      WT.setParams(keep);
      lastList = WT.params();
    }

    /* The values offered in the filters: sources and campaigns seen in the period's report,
       the company's connections, the four match methods; a value in the address is kept. */
    function fill(name, values) {
      var select = selects[name], want = params[name] || "";
      var seen = {};
      var opts = [h("option", {value: ""}, WT.t("leads.filter.any"))];
      values.forEach(function (v) {
        if (v.value == null || v.value === "" || seen[v.value]) return;
        seen[v.value] = true;
        opts.push(h("option", {value: v.value}, v.label));
      });
      if (want && !seen[want]) opts.push(h("option", {value: want}, want));
      select.replaceChildren.apply(select, opts);
      select.value = want;
    }
    function fromReport(group) {
      return WT.api("GET", "/api/report", {query: {group_by: group, from: params.from, to: params.to}})
        .then(function (res) {
          return res.rows.filter(function (r) { return r.key != null && r.leads > 0; })
            .map(function (r) { return {value: r.key, label: V.keyName(group, r.key)}; });
        }, function () { return []; });
    }
    function loadOptions() {
      fill("match_method", V.METHODS.map(function (m) { return {value: m, label: V.methodName(m)}; }));
      fromReport("utm_source").then(function (v) { fill("utm_source", v); });
      fromReport("utm_campaign").then(function (v) { fill("utm_campaign", v); });
      WT.api("GET", "/api/connections").then(function (res) {
        fill("connection", (res.connections || []).filter(function (c) { return !c.deletedAt; })
          .map(function (c) {
            return {value: c.connectionId, label: c.connectionId +
                    (c.phone ? " (" + WT.fmt.phone(c.phone) + ")" : "")};
          }));
      }, function () { fill("connection", []); });
    }

    var turn = 0, cursor = null, shown = [];
    function reload() {
      cursor = null; shown = [];
      page(++turn);
    }
    function page(mine) {
      error.textContent = "";
      more.disabled = true;
      if (!shown.length) count.textContent = WT.t("common.loading");
      var q = Object.assign(filters(), {limit: PAGE});
      if (cursor) q.cursor = cursor;
      WT.api("GET", "/api/leads", {query: q}).then(function (res) {
        if (mine !== turn) return;
        shown = shown.concat(res.leads);
        cursor = res.next_cursor;
        draw();
        more.disabled = false;
        moreBox.hidden = !cursor;
      }, function (e) {
        if (mine !== turn) return;
        more.disabled = false;
        count.textContent = "";
        error.textContent = V.errorText(e);
      });
    }
    more.addEventListener("click", function () { page(turn); });

    function draw() {
      var filtered = FILTERS.some(function (f) { return params[f]; }) || params.q;
      if (!shown.length) {
        count.textContent = "";
        list.replaceChildren(WT.empty(filtered ? "leads.empty_filtered" : "leads.empty"));
        return;
      }
      count.textContent = WT.t(cursor ? "leads.count_more" : "leads.count",
                               {count: WT.fmt.number(shown.length)});
      var table = h("table", {class: "stack v-compact", id: "leads-table"},
        h("thead", {}, h("tr", {},
          ["name", "when", "phone", "method", "source", "campaign"].map(function (c) {
            return h("th", {scope: "col"}, WT.t("leads.col." + c));
          }))),
        h("tbody", {}, shown.map(row)));
      list.replaceChildren(table);
    }
    function row(l) {
      var a = l.attribution || {};
      var open = function () { WT.go("lead", {id: l.id}); };
      var name = h("a", {href: WT.href("lead", {id: l.id})}, leadName(l));
      // A username user may come without a phone (Meta withholds it): their @username instead.
      var user = handle(identities(l).username);
      return h("tr", {class: "v-row", dataset: {leadId: l.id}, onclick: function (ev) {
          if (ev.target.closest("a")) return;  // the link does it
          open();
        }},
        h("td", {"data-label": WT.t("leads.col.name")}, name),
        h("td", {"data-label": WT.t("leads.col.when"), class: "v-nowrap v-bare"},
          WT.fmt.datetime(l.created_at)),
        h("td", {"data-label": WT.t("leads.col.phone"), class: "v-nowrap v-bare",
                 dataset: {identity: l.phone ? "phone" : user ? "username" : "none"}},
          l.phone ? WT.fmt.phone(l.phone) : user || "–"),
        h("td", {"data-label": WT.t("leads.col.method"), class: "v-wide"},
          V.methodBadge(l.match_method)),
        h("td", {"data-label": WT.t("leads.col.source"), class: "v-wide"},
          V.keyName("utm_source", a.utm_source)),
        h("td", {"data-label": WT.t("leads.col.campaign"), class: "v-wide"},
          a.utm_campaign || a.ad_title || V.keyName("utm_campaign", null)));
    }

    FILTERS.forEach(function (f) { params[f] = params[f] || ""; });
    lastList = WT.params();
    loadOptions();
    reload();
    return function () { turn++; clearTimeout(searchTimer); };
  }

  WT.view("leads", {nav: "nav.leads", title: "leads.title", render: renderLeads});

  // ---- one lead ------------------------------------------------------------------------------

  var ATTRIBUTION = ["utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content",
                     "ad_title", "ad_id"];
  var CLICK_IDS = ["gclid", "gbraid", "wbraid", "fbclid", "fbc", "fbp", "ctwa_clid", "ttclid",
                   "msclkid", "ga_client_id"];
  var PAGES = ["landing_page", "page_url", "referrer"];
  var ACTIONS = ["qualified", "purchase", "refund", "lost"];

  function facts(pairs) {
    var dl = h("dl", {class: "facts"});
    pairs.forEach(function (p) {
      if (p[1] == null || p[1] === "") return;
      dl.appendChild(h("dt", {dataset: {field: p[2] || ""}}, p[0]));
      dl.appendChild(h("dd", {dataset: {field: p[2] || ""}}, p[1]));
    });
    return dl.children.length ? dl : null;
  }
  function token(text) { return h("span", {class: "v-token"}, String(text)); }
  /* A URL that may wrap only after its / ? & = (never inside a word). */
  function url(text) {
    var s = String(text), out = h("span", {class: "v-url"});
    s.split(/(?<=[\/?&=#])/).forEach(function (part, i) {
      if (i) out.appendChild(h("wbr"));
      out.appendChild(document.createTextNode(part));
    });
    return out;
  }
  function pretty(response) {
    if (response == null) return null;
    if (typeof response === "string") {
      try { return JSON.stringify(JSON.parse(response), null, 2); } catch (e) { return response; }
    }
    return JSON.stringify(response, null, 2);
  }

  function renderLead(root, params) {
    var V = window.WTV;
    V.injectStyle();
    window.scrollTo(0, 0);
    var id = params.id;
    // Back to the list as it was left (its range, filters and search).
    var back = h("a", {href: WT.href("leads", lastList), class: "v-back", id: "lead-back"},
                 "← " + WT.t("lead.back"));
    var box = h("div", {id: "lead-page"}, h("p", {class: "muted"}, WT.t("common.loading")));
    root.append(back, box);
    if (!id) {
      box.replaceChildren(WT.empty("lead.not_found"));
      return null;
    }
    var turn = 0, data = null;

    function load() {
      var mine = ++turn;
      return WT.api("GET", "/api/leads/" + encodeURIComponent(id)).then(function (res) {
        if (mine !== turn) return;
        data = res;
        draw();
      }, function (e) {
        if (mine !== turn) return;
        box.replaceChildren(e.status === 404 ? WT.empty("lead.not_found")
          : h("p", {class: "error", role: "alert"}, V.errorText(e)));
      });
    }

    function draw() {
      var l = data.lead, a = l.attribution || {}, cur = V.currency();
      var head = h("div", {class: "v-lead-head"},
        h("h1", {id: "lead-name"}, leadName(l)),
        V.methodBadge(l.match_method));
      var who = facts([
        [WT.t("lead.phone"), l.phone ? WT.fmt.phone(l.phone) : null, "phone"],
        [WT.t("lead.created"), WT.fmt.datetime(l.created_at), "created_at"],
        [WT.t("lead.clicked"), l.clicked_at ? WT.fmt.datetime(l.clicked_at) : null, "clicked_at"],
        [WT.t("lead.connection"), l.connection_id, "connection"],
        [WT.t("lead.source"), l.source ? WT.t("lead.source_name." + l.source) : null, "source"],
        [WT.t("lead.method"), V.methodName(l.match_method), "match_method"],
        [WT.t("lead.confidence"), V.confidenceText(l.confidence), "confidence"],
        [WT.t("lead.code"), l.code ? token(l.code) : null, "code"]
      ]);
      var explain = h("p", {class: "muted small"}, WT.t("lead.method_help." + l.match_method));
      // The other ways WhatsApp names this person (the phone we dial is above): the WhatsApp id
      // when it differs (Brazil's older 12-digit mobiles), the LID, Meta's business-scoped id
      // (BSUID) and the @username.
      var ids = identities(l);
      var known = facts([
        [WT.t("lead.identity.wa_id"), ids.wa_id && ids.wa_id !== ids.phone ? token(ids.wa_id) : null,
         "identity-wa_id"],
        [WT.t("lead.identity.lid"), ids.lid ? token(ids.lid) : null, "identity-lid"],
        [WT.t("lead.identity.bsuid"), ids.bsuid ? token(ids.bsuid) : null, "identity-bsuid"],
        [WT.t("lead.identity.username"), handle(ids.username), "identity-username"]
      ]);
      var identityBox = known ? h("div", {id: "lead-identities"},
        h("h3", {}, WT.t("lead.identities")), known,
        h("p", {class: "muted small"}, WT.t("lead.identities_help"))) : null;

      var attribution = facts(ATTRIBUTION.map(function (k) {
        var v = a[k];
        if (k === "utm_source") v = a[k] ? V.keyName("utm_source", a[k]) : null;
        if (k === "utm_medium" && a[k]) v = V.keyName("utm_medium", a[k]);
        if (k === "ad_id" && v) v = token(v);
        return [WT.t("lead.field." + k), v, k];
      }).concat(PAGES.map(function (k) {
        return [WT.t("lead.field." + k), a[k] ? url(a[k]) : null, k];
      })));
      var clickIds = facts(CLICK_IDS.map(function (k) {
        return [WT.t("lead.field." + k), a[k] ? token(a[k]) : null, k];
      }));
      var ft = l.first_touch || null, first = null;
      if (ft && typeof ft === "object") {
        first = facts([
          [WT.t("lead.field.utm_source"), ft.utm_source ? V.keyName("utm_source", ft.utm_source) : null, "utm_source"],
          [WT.t("lead.field.utm_medium"), ft.utm_medium, "utm_medium"],
          [WT.t("lead.field.utm_campaign"), ft.utm_campaign, "utm_campaign"],
          [WT.t("lead.field.landing_page"), ft.landing_page ? url(ft.landing_page) : null, "landing_page"],
          [WT.t("lead.field.referrer"), ft.referrer ? url(ft.referrer) : null, "referrer"],
          [WT.t("lead.first_touch_when"), ft.ts ? WT.fmt.datetime(ft.ts) : null, "ts"]
        ]);
      }

      var actions = h("div", {class: "v-actions", id: "lead-actions"}, ACTIONS.map(function (name) {
        return h("button", {type: "button", class: "btn" + (name === "purchase" ? " primary" : ""),
                            dataset: {action: name}, onclick: function () { act(name); }},
                 WT.t("lead.action." + name));
      }));

      var events = data.events || [];
      var timeline = events.length ? h("ol", {class: "v-timeline", id: "lead-events"},
        events.map(function (e) {
          return h("li", {dataset: {event: e.name}},
            h("b", {}, V.eventName(e.name)),
            e.value != null ? " · " + WT.fmt.money(e.value, e.currency || cur) : "",
            h("span", {class: "muted"}, WT.fmt.datetime(e.occurred_at) + " · " +
              (WT.has("events.source." + e.source) ? WT.t("events.source." + e.source) : e.source) +
              (e.rule ? " · " + WT.t("lead.chat_rule", {
                from: WT.t("settings.chat_rule_from." + e.rule.from),
                keywords: e.rule.keywords.map(function (k) { return "“" + k + "”"; }).join(", ")})
                : "")));
        })) : WT.empty("lead.no_events");

      var deliveries = data.deliveries || [];
      var sent = deliveries.length ? h("div", {id: "lead-deliveries"}, deliveries.map(delivery))
        : WT.empty("lead.no_deliveries");

      box.replaceChildren(
        head,
        h("section", {class: "card"}, who, explain, identityBox,
          l.first_message != null ? h("div", {},
            h("h2", {}, WT.t("lead.first_message")),
            h("p", {class: "v-message", id: "lead-message"}, l.first_message)) : null),
        h("section", {class: "card"}, h("h2", {}, WT.t("lead.actions_title")),
          h("p", {class: "muted small"}, WT.t("lead.actions_help")), actions),
        h("section", {class: "card", id: "lead-attribution"}, h("h2", {}, WT.t("lead.attribution")),
          attribution || h("p", {class: "muted"}, WT.t("lead.no_attribution")),
          clickIds ? h("h3", {}, WT.t("lead.click_ids")) : null, clickIds,
          first ? h("h3", {}, WT.t("lead.first_touch")) : null, first),
        h("section", {class: "card"}, h("h2", {}, WT.t("lead.events")), timeline),
        h("section", {class: "card"}, h("h2", {}, WT.t("lead.deliveries")),
          h("p", {class: "muted small"}, WT.t("lead.deliveries_help")), sent),
        h("section", {class: "card v-erase", id: "lead-erase"}, h("h2", {}, WT.t("lead.erase_title")),
          h("p", {class: "muted small"}, WT.t(erasable(l) ? "lead.erase_help" : "lead.erase_no_phone")),
          erasable(l) ? h("button", {type: "button", class: "btn danger", id: "lead-erase-button",
                                     onclick: function () { erase(l); }}, WT.t("lead.erase")) : null));
      root.dataset.deliveries = deliveries.map(function (d) { return d.status; }).join(",");
    }

    function delivery(d) {
      var answer = pretty(d.response);
      var retry = d.status === "failed" ? h("button", {type: "button", class: "btn small",
        dataset: {retry: d.id}, onclick: function () {
          retry.disabled = true;
          WT.api("POST", "/api/deliveries/" + d.id + "/retry").then(function () {
            WT.toast(WT.t("deliveries.retried"));
            return load();
          }, function (e) {
            retry.disabled = false;
            WT.toast(V.errorText(e), "error");
          });
        }}, WT.t("deliveries.retry")) : null;
      // GA4 answers "yes" to everything; Data Manager's answer comes later (its request status).
      var note = d.destination === "ga4" && d.status === "delivered" ? WT.t("deliveries.ga4_note")
        : d.status === "pending" && d.response && d.response.requestId
          ? WT.t("deliveries.processing_note") : null;
      var when = d.status === "delivered" ? d.delivered_at
        : d.status === "pending" ? d.next_attempt_at : d.updated_at;
      return h("div", {class: "v-delivery", dataset: {delivery: d.id, destination: d.destination,
                                                       status: d.status}},
        h("div", {class: "v-delivery-head"},
          h("b", {}, V.destinationName(d.destination) + " · " + V.eventName(d.event)),
          h("span", {class: "row"}, V.statusBadge(d.status), retry)),
        facts([
          [WT.t("deliveries.attempts"), WT.fmt.number(d.attempts), "attempts"],
          [WT.t("deliveries.last_status"), d.last_status != null ? String(d.last_status) : null,
           "last_status"],
          [WT.t("deliveries.last_error"), d.last_error, "last_error"],
          [WT.t("deliveries.when." + d.status), when ? WT.fmt.datetime(when) : null, "when"]
        ]),
        note ? h("p", {class: "muted small", dataset: {note: d.destination}}, note) : null,
        answer != null ? h("details", {class: "v-answer"},
          h("summary", {}, WT.t("deliveries.response")),
          h("pre", {class: "v-json"}, answer)) : null);
    }

    /* LGPD: DELETE /api/contacts/{phone} erases the person (every lead of the number, its
       events, deliveries, messages and raw webhook bodies); a person Meta knows only by BSUID
       is erased by it. Then the list, with what was erased. */
    function erasable(l) {
      return l.phone || identities(l).bsuid || null;
    }

    function erase(l) {
      var shown = l.phone ? WT.fmt.phone(l.phone) : identities(l).bsuid;
      var who = l.name || handle(identities(l).username) || shown;
      WT.confirm({title: WT.t("lead.erase_confirm_title", {name: who}),
                  body: [h("p", {}, WT.t("lead.erase_confirm_body", {phone: shown})),
                         h("p", {class: "muted small"}, WT.t("lead.erase_confirm_note"))],
                  confirm: WT.t("lead.erase_confirm"), danger: true}).then(function (ok) {
        if (!ok) return;
        var button = document.getElementById("lead-erase-button");
        if (button) button.disabled = true;
        WT.api("DELETE", "/api/contacts/" + encodeURIComponent(erasable(l))).then(function (res) {
          turn++;  // nothing more to load here
          var erased = res.erased || {};
          var list = h("dl", {class: "facts v-erased", id: "lead-erased"},
            ["leads", "lead_events", "deliveries", "messages", "contacts", "webhook_deliveries"]
              .map(function (k) {
                return [h("dt", {}, WT.t("lead.erased." + k)),
                        h("dd", {dataset: {erased: k}}, WT.fmt.number(erased[k] || 0))];
              }));
          WT.go("leads", lastList);
          WT.dialog({title: WT.t("lead.erased_title"),
                     content: [h("p", {}, WT.t("lead.erased_body", {name: who})), list],
                     actions: [{label: WT.t("common.close"), kind: "primary"}]});
        }, function (e) {
          if (button) button.disabled = false;
          WT.toast(V.errorText(e), "error");
        });
      });
    }

    function act(name) {
      var cur = V.currency();
      if (name === "purchase" || name === "refund") {
        var value = WT.field({label: WT.t("lead.value"), name: "value", type: "number",
                              attrs: {min: "0", step: "0.01", inputmode: "decimal"}, required: true});
        var currency = WT.field({label: WT.t("lead.currency"), name: "currency", value: cur,
                                 attrs: {maxlength: "3", autocapitalize: "characters"}});
        WT.dialog({
          title: WT.t("lead.action_title." + name),
          content: [h("p", {class: "muted"}, WT.t("lead.action_help." + name)), value, currency],
          actions: [
            {label: WT.t("common.cancel"), kind: "ghost"},
            {label: WT.t("lead.action_confirm." + name), kind: name === "refund" ? "danger" : "primary",
             onClick: function () {
               var amount = Number(String(value.input.value).replace(",", "."));
               if (value.input.value === "" || !isFinite(amount) || amount < 0) {
                 throw new Error(WT.t("lead.value_needed"));
               }
               var code = String(currency.input.value || cur).trim().toUpperCase();
               if (!/^[A-Z]{3}$/.test(code)) throw new Error(WT.t("settings.error.currency"));
               return send(name, {value: amount, currency: code});
             }}
          ]
        });
        return;
      }
      if (name === "lost") {
        WT.confirm({title: WT.t("lead.action_title.lost"), body: WT.t("lead.action_help.lost"),
                    confirm: WT.t("lead.action_confirm.lost"), danger: true})
          .then(function (ok) { if (ok) send(name, {}).catch(function (e) { WT.toast(e.message, "error"); }); });
        return;
      }
      send(name, {}).catch(function (e) { WT.toast(e.message, "error"); });
    }

    function send(name, body) {
      return WT.api("POST", "/api/leads/" + encodeURIComponent(id) + "/events",
                    {body: Object.assign({name: name}, body)}).then(function (res) {
        WT.toast(WT.t(res.duplicate ? "lead.recorded_again" : "lead.recorded",
                      {event: V.eventName(name)}));
        return load();
      }, function (e) { throw new Error(V.errorText(e)); });
    }

    load();
    // Deliveries waiting or being sent change within seconds: look again until they settle.
    WT.poll(function () {
      if (!data) return null;
      var busy = (data.deliveries || []).some(function (d) {
        return d.status === "pending" || d.status === "sending";
      });
      return busy ? load() : null;
    }, 2000);
    return function () { turn++; };
  }

  WT.view("lead", {nav: null, title: "lead.title", render: renderLead});
})();
