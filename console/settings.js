/* WhatsTracking console: the company's settings (GET/PATCH /api/company): its name, attribution,
   code, region, label → event mapping, chat rules (with a box to try a message on them, through
   POST /api/chat-rules/test), its WhatsApp server (Evolution API; the key write-only, the
   server's state from GET /api/checks), conversion destinations (Meta, GA4, TikTok, Google's
   Data Manager, CRM webhook; secrets write-only; the event names each platform gets; "Send a
   test event" with the platform's answer), failed deliveries with retry, and the
   Google Ads offline-conversions CSV with its conversion names. Shared helpers: window.WTV
   (reports.js). */
(function () {
  "use strict";
  var h = WT.h;

  var LABEL_EVENTS = ["qualified", "purchase", "refund", "lost"];
  var RULE_SENDERS = ["business", "customer", "any"];  // CHAT_RULE_SENDERS in whatstracking.py
  var CURRENCIES = ["BRL", "USD", "EUR", "ARS", "CLP", "COP", "MXN", "PEN", "UYU", "PYG", "BOB",
                    "GBP", "CAD", "AUD", "JPY", "CHF"];
  // Destinations and their fields as the API names them (DESTINATION_FIELDS in whatstracking.py);
  // secret ones are write-only. event_names: the platform's default names (META_EVENT_NAMES and
  // GA4_EVENT_NAMES in whatstracking.py) per path; null there means "not sent".
  var EVENTS = ["lead", "qualified", "purchase", "refund", "lost"];
  var DESTINATIONS = [
    {name: "meta", paths: [
      {key: "website", defaults: {lead: "Lead", qualified: "QualifiedLead", purchase: "Purchase"}},
      {key: "messaging", defaults: {lead: "LeadSubmitted", purchase: "Purchase"}}],
     fields: [{key: "dataset_id", required: true},
                            {key: "access_token", secret: true, required: true},
                            {key: "waba_id"}, {key: "page_id"}, {key: "messaging_dataset_id"},
                            {key: "messaging_access_token", secret: true},
                            {key: "test_event_code"}]},
    {name: "ga4", paths: [
      {key: null, defaults: {lead: "generate_lead", qualified: "qualify_lead", purchase: "purchase",
                             refund: "refund", lost: "close_unconvert_lead"}}],
     fields: [{key: "measurement_id", required: true, placeholder: "G-XXXXXXX"},
                           {key: "api_secret", secret: true, required: true}]},
    {name: "tiktok", paths: [{key: null, defaults: {lead: "Contact", purchase: "CompletePayment"}}],
     fields: [{key: "pixel_code", required: true}, {key: "access_token", secret: true, required: true},
              {key: "test_event_code"}]},
    // conversion_actions: our event → a Google Ads conversion action id, one field per event.
    {name: "data_manager", actions: ["lead", "qualified", "purchase"],
     fields: [{key: "customer_id", required: true, placeholder: "123-456-7890"},
              {key: "login_customer_id", placeholder: "123-456-7890"},
              {key: "service_account_key", secret: true, required: true, json: true}]},
    {name: "crm_webhook", fields: [{key: "url", required: true, type: "url",
                                    placeholder: "https://"},
                                   {key: "secret", secret: true, required: true}]}
  ];
  // Our event → the Google Ads conversion action (DEFAULT_GOOGLE_ADS_CONVERSIONS); "" = not exported.
  var GADS_EVENTS = ["lead", "qualified", "purchase"];
  var GADS_DEFAULTS = {lead: "WhatsApp Lead", qualified: "WhatsApp Qualified Lead",
                       purchase: "WhatsApp Purchase"};

  function zones() {
    try {
      if (Intl.supportedValuesOf) return Intl.supportedValuesOf("timeZone");
    } catch (e) { /* older browsers */ }
    return ["America/Sao_Paulo", "America/Manaus", "America/Recife", "America/Fortaleza",
            "America/Belem", "America/Cuiaba", "America/Porto_Velho", "America/Rio_Branco",
            "America/Noronha", "UTC"];
  }

  function renderSettings(root) {
    var V = window.WTV;
    V.injectStyle();
    var company = null;
    var body = h("div", {id: "settings-body"}, h("p", {class: "muted"}, WT.t("common.loading")));
    root.append(h("h1", {}, WT.t("settings.title")), body);

    function load() {
      return WT.api("GET", "/api/company").then(function (c) {
        company = c;
        if (WT.session) WT.session.company = Object.assign(WT.session.company || {}, c);
        draw();
        checkEvolution();
      }, function (e) {
        body.replaceChildren(h("p", {class: "error", role: "alert"}, V.errorText(e)));
      });
    }

    /* A card with a form; save() returns the PATCH body (or throws an Error to show). */
    function form(id, title, help, fields, save) {
      var error = V.errorBox(id + "-error");
      var done = h("span", {class: "muted", role: "status", id: id + "-saved"});
      var button = h("button", {type: "submit", class: "btn primary"}, WT.t("common.save"));
      var el = h("form", {class: "card", id: id, novalidate: true},
        h("h2", {}, title), help ? h("p", {class: "muted small"}, help) : null, fields,
        h("div", {class: "v-form-actions"}, button, done, error));
      el.addEventListener("submit", function (ev) {
        ev.preventDefault();
        error.textContent = ""; done.textContent = "";
        var patch;
        try { patch = save(); } catch (e) { error.textContent = e.message; return; }
        button.disabled = true;
        WT.api("PATCH", "/api/company", {body: patch}).then(function (c) {
          button.disabled = false;
          company = c;
          if (WT.session) WT.session.company = Object.assign(WT.session.company || {}, c);
          WT.toast(WT.t("common.saved"));
          if (WT.refreshCompany) WT.refreshCompany().catch(function () { /* shown next time */ });
          draw();
          if (el.dataset.recheck) checkEvolution();
          var again = document.getElementById(id + "-saved");
          if (again) again.textContent = WT.t("common.saved");
        }, function (e) {
          button.disabled = false;
          error.textContent = V.errorText(e);
        });
      });
      return el;
    }

    function number(input) {
      var raw = String(input.value).trim();
      if (raw === "") return null;
      var n = Number(raw.replace(",", "."));
      return isFinite(n) ? n : raw;
    }

    // ---- the company, its WhatsApp server ----

    function companyForm() {
      var name = WT.field({label: WT.t("settings.company_name"), name: "name", value: company.name,
                           help: WT.t("settings.company_name_help"),
                           attrs: {maxlength: "200", autocomplete: "organization"}});
      return form("settings-company", WT.t("settings.company_title"), null, [name], function () {
        var v = name.input.value.trim();
        if (!v) throw new Error(WT.t("settings.error.name"));
        return {name: v};
      });
    }

    /* The Evolution server's state as the doctor (GET /api/checks) sees it: "none" (no server
       at all), "ok" or "down"; null while asking or when the checks could not be read. */
    var evolutionState;
    function checkEvolution() {
      evolutionState = undefined;
      showEvolutionState();
      return WT.api("GET", "/api/checks").then(function (res) {
        var check = (res.checks || []).filter(function (c) {
          return / Evolution server$/.test(c.name || "");
        })[0];
        evolutionState = !check ? null : check.ok ? "ok"
          : /^none configured/.test(check.detail || "") ? "none" : "down";
        showEvolutionState();
      }, function () { evolutionState = null; showEvolutionState(); });
    }
    function showEvolutionState() {
      var el = document.getElementById("settings-evolution-state");
      if (!el || !company) return;
      var own = !!company.evolution_url;
      var key, kind;
      if (evolutionState === undefined) { key = "settings.evolution_state.checking"; kind = ""; }
      else if (evolutionState === null) { el.replaceChildren(); el.hidden = true; return; }
      else if (evolutionState === "none") { key = "settings.evolution_state.none"; kind = "warn"; }
      else {
        key = "settings.evolution_state." + (own ? "own_" : "default_") + evolutionState;
        kind = evolutionState === "ok" ? "ok" : "bad";
      }
      el.hidden = false;
      el.className = "v-state " + kind;
      el.dataset.state = evolutionState === undefined ? "checking" : evolutionState;
      el.textContent = WT.t(key);
    }

    function evolutionForm() {
      var url = WT.field({label: WT.t("settings.evolution_url"), name: "evolution_url", type: "url",
                          value: company.evolution_url || "", placeholder: "https://evolution.suaempresa.com.br",
                          help: WT.t("settings.evolution_url_help"),
                          attrs: {autocomplete: "off", spellcheck: "false", autocapitalize: "off"}});
      var key = secretField(WT.t("settings.evolution_key"), "evolution_key", "evolution_key",
                            !!company.evolution_key_set, WT.t("settings.evolution_key_help"));
      var auth = WT.field({label: WT.t("settings.webhook_auth_required"), name: "webhook_auth_required",
                           type: "checkbox", value: company.webhook_auth_required !== false,
                           help: WT.t("settings.webhook_auth_required_help")});
      var state = h("p", {id: "settings-evolution-state", class: "v-state", role: "status",
                          "aria-live": "polite"});
      var el = form("settings-evolution", WT.t("settings.evolution_title"),
                    WT.t("settings.evolution_help"), [state, url, key.node, auth], function () {
        var patch = {};
        var v = url.input.value.trim();
        if (v && !/^https?:\/\/\S+$/.test(v)) throw new Error(WT.t("settings.error.evolution_url"));
        if (v !== (company.evolution_url || "")) patch.evolution_url = v || null;
        var k = key.input.value.trim();
        if (key.cleared()) patch.evolution_key = null;
        else if (k) patch.evolution_key = k;
        patch.webhook_auth_required = auth.input.checked;
        return patch;
      });
      el.dataset.recheck = "1";  // a save asks the doctor again
      return el;
    }

    // ---- attribution, code, region ----

    function attributionForm() {
      var days = WT.field({label: WT.t("settings.attribution_window_days"), name: "attribution_window_days",
                           type: "number", value: company.attribution_window_days,
                           help: WT.t("settings.attribution_window_days_help"),
                           attrs: {min: "1", max: "365", step: "1", inputmode: "numeric"}});
      var windowMatch = WT.field({label: WT.t("settings.window_match"), name: "window_match",
                                  type: "checkbox", value: company.window_match});
      var minutes = WT.field({label: WT.t("settings.window_minutes"), name: "window_minutes",
                              type: "number", value: company.window_minutes,
                              help: WT.t("settings.window_minutes_help"),
                              attrs: {min: "1", max: "1440", step: "1", inputmode: "numeric"}});
      return form("settings-attribution", WT.t("settings.attribution_title"),
                  WT.t("settings.attribution_help"), [days, windowMatch, minutes], function () {
        return {attribution_window_days: number(days.input),
                window_match: windowMatch.input.checked,
                window_minutes: number(minutes.input)};
      });
    }

    function codeForm() {
      var mode = WT.field({label: WT.t("settings.code_mode"), name: "code_mode", type: "select",
                           value: company.code_mode, help: WT.t("settings.code_mode_help"),
                           options: ["both", "visible", "invisible"].map(function (m) {
                             return {value: m, label: WT.t("settings.code_mode." + m)};
                           })});
      var template = WT.field({label: WT.t("settings.code_template"), name: "code_template",
                               value: company.code_template,
                               help: WT.t("settings.code_template_help"),
                               attrs: {maxlength: "64", autocomplete: "off", spellcheck: "false"}});
      var store = WT.field({label: WT.t("settings.store_first_message"), name: "store_first_message",
                            type: "checkbox", value: company.store_first_message,
                            help: WT.t("settings.store_first_message_help")});
      return form("settings-code", WT.t("settings.code_title"), WT.t("settings.code_help"),
                  [mode, template, store], function () {
        return {code_mode: mode.input.value, code_template: template.input.value,
                store_first_message: store.input.checked};
      });
    }

    function regionForm() {
      var origins = WT.field({label: WT.t("settings.allowed_origins"), name: "allowed_origins",
                              type: "textarea", rows: 3,
                              value: (company.allowed_origins || []).join("\n"),
                              help: WT.t("settings.allowed_origins_help"),
                              placeholder: "https://loja.com.br",
                              attrs: {spellcheck: "false", autocapitalize: "off"}});
      var listId = "settings-zones";
      var zone = WT.field({label: WT.t("settings.timezone"), name: "timezone",
                           value: company.timezone, help: WT.t("settings.timezone_help"),
                           attrs: {list: listId, autocomplete: "off", spellcheck: "false",
                                   autocapitalize: "off"}});
      var datalist = h("datalist", {id: listId}, zones().map(function (z) {
        return h("option", {value: z});
      }));
      var currencies = CURRENCIES.slice();
      if (company.currency && currencies.indexOf(company.currency) < 0) {
        currencies.unshift(company.currency);
      }
      var names = null;
      try { names = new Intl.DisplayNames([WT.lang], {type: "currency"}); } catch (e) { names = null; }
      var currency = WT.field({label: WT.t("settings.currency"), name: "currency", type: "select",
                               value: company.currency, help: WT.t("settings.currency_help"),
                               options: currencies.map(function (c) {
                                 return {value: c, label: c + (names ? " · " + names.of(c) : "")};
                               })});
      return form("settings-region", WT.t("settings.region_title"), null,
                  [origins, h("div", {class: "v-two"}, h("div", {}, zone, datalist), currency)],
                  function () {
        var list = origins.input.value.split(/[\s,]+/).map(function (s) { return s.trim(); })
          .filter(Boolean);
        return {allowed_origins: list, timezone: zone.input.value.trim(),
                currency: currency.input.value};
      });
    }

    // ---- label → event ----

    function labelsForm() {
      var rows = h("div", {id: "settings-labels-rows"});
      function addRow(label, event) {
        var name = WT.field({label: WT.t("settings.label_name"), name: "label",
                             value: label || "", placeholder: WT.t("settings.label_placeholder")});
        var pick = WT.field({label: WT.t("settings.label_event"), name: "event", type: "select",
                             value: event || "purchase",
                             options: LABEL_EVENTS.map(function (e) {
                               return {value: e, label: V.eventName(e)};
                             })});
        var row = h("div", {class: "v-map-row"}, name, pick,
          h("button", {type: "button", class: "btn ghost small",
                       onclick: function () { row.remove(); }}, WT.t("settings.label_remove")));
        row.nameInput = name.input; row.eventInput = pick.input;
        rows.appendChild(row);
        return row;
      }
      var mapping = company.label_events || {};
      Object.keys(mapping).forEach(function (k) { addRow(k, mapping[k]); });
      var add = h("button", {type: "button", class: "btn ghost", id: "settings-label-add",
                             onclick: function () { addRow("", "").nameInput.focus(); }},
                  WT.t("settings.label_add"));
      return form("settings-labels", WT.t("settings.labels_title"), WT.t("settings.labels_help"),
                  [rows, h("p", {}, add)], function () {
        var out = {};
        Array.prototype.forEach.call(rows.children, function (row) {
          var k = row.nameInput.value.trim();
          if (k) out[k] = row.eventInput.value;
        });
        return {label_events: out};
      });
    }

    // ---- chat rules (SPEC §14) ----

    /* The rules as rows (who writes, keywords separated by commas, the event, whether the value
       is read from the text); save() sends them all. The try box sends the rows as they are now
       (saved or not) with a message to POST /api/chat-rules/test, which stores nothing. */
    function chatRulesForm() {
      var rows = h("div", {id: "settings-chat-rules-rows"});
      function addRow(rule) {
        rule = rule || {from: "business", keywords: [], event: "purchase", value: "from_text"};
        var who = WT.field({label: WT.t("settings.chat_rule_from"), name: "from", type: "select",
                            value: rule.from, options: RULE_SENDERS.map(function (f) {
                              return {value: f, label: WT.t("settings.chat_rule_sender." + f)};
                            })});
        var words = WT.field({label: WT.t("settings.chat_rule_keywords"), name: "keywords",
                              value: rule.keywords.join(", "),
                              placeholder: WT.t("settings.chat_rule_keywords_placeholder")});
        var pick = WT.field({label: WT.t("settings.label_event"), name: "event", type: "select",
                             value: rule.event, options: LABEL_EVENTS.map(function (e) {
                               return {value: e, label: V.eventName(e)};
                             })});
        var value = WT.field({label: WT.t("settings.chat_rule_value"), name: "value",
                              type: "checkbox", value: rule.value === "from_text"});
        var row = h("div", {class: "v-rule"},
          h("div", {class: "v-rule-fields"}, who, words, pick), value,
          h("button", {type: "button", class: "btn ghost small",
                       onclick: function () { row.remove(); }}, WT.t("settings.chat_rule_remove")));
        row.read = function () {
          return {from: who.input.value, event: pick.input.value,
                  keywords: words.input.value.split(",").map(function (k) { return k.trim(); })
                    .filter(Boolean),
                  value: value.input.checked ? "from_text" : null};
        };
        row.wordsInput = words.input;
        rows.appendChild(row);
        return row;
      }
      (company.chat_rules || []).forEach(addRow);
      function read() {
        return Array.prototype.map.call(rows.children, function (row, i) {
          var rule = row.read();
          if (!rule.keywords.length) {
            row.wordsInput.focus();
            throw new Error(WT.t("settings.chat_rule_no_keywords", {n: i + 1}));
          }
          return rule;
        });
      }
      var add = h("button", {type: "button", class: "btn ghost", id: "settings-chat-rule-add",
                             onclick: function () { addRow().wordsInput.focus(); }},
                  WT.t("settings.chat_rule_add"));

      var text = WT.field({label: WT.t("settings.chat_try_text"), name: "chat_try_text",
                           type: "textarea", rows: 2,
                           placeholder: WT.t("settings.chat_try_placeholder")});
      text.input.id = "settings-chat-try-text";
      text.querySelector("label").setAttribute("for", "settings-chat-try-text");
      var sender = WT.field({label: WT.t("settings.chat_try_from"), name: "chat_try_from",
                             type: "select", value: "business",
                             options: ["business", "customer"].map(function (f) {
                               return {value: f, label: WT.t("settings.chat_rule_sender." + f)};
                             })});
      var outcome = h("div", {id: "settings-chat-try-result", role: "status",
                              "aria-live": "polite"});
      var tryError = V.errorBox("settings-chat-try-error");
      var tryButton = h("button", {type: "button", class: "btn", id: "settings-chat-try",
        onclick: function () {
          tryError.textContent = ""; outcome.replaceChildren();
          var rules;
          try { rules = read(); } catch (e) { tryError.textContent = e.message; return; }
          tryButton.disabled = true;
          WT.api("POST", "/api/chat-rules/test", {body: {
            text: text.input.value, from: sender.input.value, chat_rules: rules}})
            .then(function (r) { outcome.replaceChildren.apply(outcome, tried(r)); },
                  function (e) { tryError.textContent = V.errorText(e); })
            .then(function () { tryButton.disabled = false; });
        }}, WT.t("settings.chat_try_button"));
      function tried(r) {
        var out = r.fired.length ? [h("ul", {class: "v-rule-fired"}, r.fired.map(function (f) {
          return h("li", {dataset: {event: f.event}},
            h("b", {}, V.eventName(f.event)),
            f.value != null ? " · " + WT.fmt.money(f.value, f.currency) : "",
            h("span", {class: "muted"}, " · " + WT.t("settings.chat_try_rule",
                                                      {n: f.rule + 1, keyword: f.keyword})));
        }))] : [h("p", {class: "muted"}, WT.t("settings.chat_try_nothing"))];
        out.push(h("p", {class: "muted small"}, r.amount != null
          ? WT.t("settings.chat_try_amount", {amount: WT.fmt.money(r.amount, company.currency)})
          : WT.t("settings.chat_try_no_amount")));
        return out;
      }
      var trial = h("div", {class: "v-rule-try", id: "settings-chat-try-box"},
        h("h3", {}, WT.t("settings.chat_try_title")), text, sender,
        h("div", {class: "v-form-actions"}, tryButton, tryError), outcome);

      return form("settings-chat-rules", WT.t("settings.chat_rules_title"),
                  WT.t("settings.chat_rules_help"),
                  [h("p", {class: "muted small"}, WT.t("settings.chat_rules_privacy")), rows,
                   h("p", {}, add), trial], function () {
        return {chat_rules: read()};
      });
    }

    /* A write-only secret: when one is stored, "set ✓" with Replace / Clear (never the value);
       else an empty box to type it. .input is the box; .cleared() says Clear was chosen. */
    function secretField(label, name, key, isSet, help) {
      var field = WT.field({label: label, name: name, type: "password", help: help,
                            attrs: {autocomplete: "new-password", spellcheck: "false"}});
      var cleared = false;
      var out = {node: field, input: field.input, cleared: function () { return cleared; }};
      if (!isSet) return out;
      var state = h("span", {class: "badge ok", dataset: {secret: key}}, WT.t("settings.secret_set"));
      var box = h("div", {class: "v-secret", dataset: {secretField: key}},
        h("span", {class: "v-secret-label"}, label), state);
      field.hidden = true;
      var replace = h("button", {type: "button", class: "btn ghost small", dataset: {replace: key},
        onclick: function () {
          field.hidden = false; cleared = false;
          state.textContent = WT.t("settings.secret_replacing");
          state.className = "badge info";
          field.input.focus();
        }}, WT.t("settings.secret_replace"));
      var remove = h("button", {type: "button", class: "btn ghost small", dataset: {clear: key},
        onclick: function () {
          cleared = true; field.hidden = true; field.input.value = "";
          state.textContent = WT.t("settings.secret_will_clear");
          state.className = "badge warn";
        }}, WT.t("settings.secret_clear"));
      box.append(replace, remove);
      out.node = h("div", {}, box, field);
      return out;
    }

    function same(a, b) { return canonical(a) === canonical(b); }
    function canonical(v) {
      if (v && typeof v === "object") {
        return "{" + Object.keys(v).sort().map(function (k) {
          return JSON.stringify(k) + ":" + canonical(v[k]);
        }).join(",") + "}";
      }
      return JSON.stringify(v === undefined ? null : v);
    }

    /* "Our event → the platform's name, or not sent" as a table: per event and column a "send"
       box and the name (empty: the platform's default, shown greyed). cols: [{key, label,
       defaults: {event: name}, current: {event: name | null | ""}}]; off: what "not sent" is
       stored as (null for event_names, "" for google_ads_conversions). .read() → {colKey:
       {event: name | off}} with only what differs from the defaults and other events kept; throws
       an Error (shown next to the form) when a box is on with no name and no default. */
    function namesTable(id, events, cols, off) {
      var cells = [];
      var table = h("table", {class: "stack v-names", id: id},
        h("thead", {}, h("tr", {}, h("th", {scope: "col"}, WT.t("settings.names_col.event")),
          cols.map(function (c) { return h("th", {scope: "col"}, c.label); }))),
        h("tbody", {}, events.map(function (ev) {
          var evName = V.eventName(ev);
          return h("tr", {dataset: {event: ev}}, h("td", {class: "v-names-event"}, evName),
            cols.map(function (c) {
              var def = c.defaults[ev] || "";
              var has = Object.prototype.hasOwnProperty.call(c.current, ev);
              var cur = has ? c.current[ev] : def;
              var where = cols.length > 1 ? evName + " · " + c.label : evName;
              var input = h("input", {type: "text", class: "input", name: "name." + (c.key ? c.key + "." : "") + ev,
                                      value: cur && cur !== def ? cur : "", placeholder: def,
                                      "aria-label": WT.t("settings.names_name", {where: where}),
                                      autocomplete: "off", spellcheck: "false",
                                      autocapitalize: "off", maxlength: "100"});
              var send = h("input", {type: "checkbox", checked: !!cur,
                                     name: "send." + (c.key ? c.key + "." : "") + ev,
                                     "aria-label": WT.t("settings.names_send", {where: where}),
                                     title: WT.t("settings.names_send", {where: where})});
              function follow() {
                input.disabled = !send.checked;
                input.placeholder = send.checked ? def : WT.t("settings.names_off");
              }
              follow();
              send.addEventListener("change", function () {
                follow();
                if (send.checked) input.focus();
              });
              cells.push({col: c, event: ev, def: def, has: has, send: send, input: input,
                          where: where});
              return h("td", {"data-label": c.label},
                h("span", {class: "v-names-cell"}, send, input));
            }));
        })));
      function read() {
        var out = {};
        cols.forEach(function (c) {
          var keep = Object.assign({}, c.current);
          events.forEach(function (ev) { delete keep[ev]; });
          out[String(c.key)] = keep;
        });
        cells.forEach(function (cell) {
          var map = out[String(cell.col.key)];
          var name = cell.input.value.trim();
          if (!cell.send.checked) {
            if (cell.def) map[cell.event] = off;
          } else if (name && name !== cell.def) {
            map[cell.event] = name;
          } else if (!cell.def) {
            cell.input.focus();
            throw new Error(WT.t("settings.names_needed", {where: cell.where}));
          }
        });
        return out;
      }
      return {node: h("div", {class: "table-wrap"}, table), read: read};
    }

    // ---- destinations ----

    function destinationForm(spec) {
      var stored = company[spec.name] || null;
      var on = !!stored;
      var inputs = {}, secrets = {};
      var fields = spec.fields.map(function (f) {
        var label = WT.t("settings.dest." + spec.name + "." + f.key);
        var help = WT.has("settings.dest." + spec.name + "." + f.key + "_help")
          ? WT.t("settings.dest." + spec.name + "." + f.key + "_help") : null;
        if (!f.secret) {
          var field = WT.field({label: label, name: spec.name + "." + f.key, type: f.type || "text",
                                value: stored && stored[f.key] != null ? stored[f.key] : "",
                                help: help, placeholder: f.placeholder,
                                attrs: {autocomplete: "off", spellcheck: "false", autocapitalize: "off"}});
          inputs[f.key] = field.input;
          return field;
        }
        var secret = secretField(label, spec.name + "." + f.key, f.key,
                                 !!(stored && stored[f.key + "_set"]), help);
        inputs[f.key] = secret.input;
        secrets[f.key] = secret;
        return secret.node;
      });
      var storedActions = (stored && stored.conversion_actions) || {};
      var actions = (spec.actions || []).map(function (ev) {
        var field = WT.field({label: WT.t("settings.dest." + spec.name + ".action", {event: V.eventName(ev)}),
                              name: spec.name + ".conversion_actions." + ev,
                              value: storedActions[ev] || "", placeholder: "123456789",
                              attrs: {inputmode: "numeric", autocomplete: "off"}});
        field.input.dataset.event = ev;
        return field;
      });
      var enabled = WT.field({label: WT.t("settings.dest_enabled"), name: spec.name + ".enabled",
                              type: "checkbox", value: !stored || stored.enabled !== false});
      var storedNames = (stored && stored.event_names) || {};
      var names = spec.paths ? namesTable("settings-" + spec.name + "-names", EVENTS,
        spec.paths.map(function (p) {
          return {key: p.key, defaults: p.defaults,
                  label: WT.t("settings.names_col." + spec.name + (p.key ? "." + p.key : "")),
                  current: (p.key ? storedNames[p.key] : storedNames) || {}};
        }), null) : null;
      var namesBox = names ? h("details", {class: "v-names-box", id: "settings-" + spec.name + "-names-box"},
        h("summary", {}, WT.t("settings.names_title")),
        h("p", {class: "muted small"}, WT.t("settings.names_help." + spec.name)), names.node) : null;
      var title = WT.t("settings.dest." + spec.name);
      var status = h("span", {class: "badge " + (on ? (stored.enabled === false ? "" : "ok") : ""),
                              dataset: {destinationState: spec.name}},
                     WT.t(on ? (stored.enabled === false ? "settings.dest_off" : "settings.dest_on")
                          : "settings.dest_none"));
      var el = form("settings-" + spec.name.replace("_", "-"), title,
                    WT.t("settings.dest." + spec.name + "_help"), [fields, actions, namesBox, enabled], function () {
        var patch = {};
        spec.fields.forEach(function (f) {
          var v = inputs[f.key].value.trim();
          if (f.secret) {
            if (secrets[f.key].cleared()) patch[f.key] = null;
            else if (v && f.json) {  // a pasted JSON file, sent as the object it holds
              try { patch[f.key] = JSON.parse(v); } catch (e) {
                throw new Error(WT.t("settings.error." + spec.name + "." + f.key));
              }
            }
            else if (v) patch[f.key] = v;
          } else if (v) {
            patch[f.key] = v;
          } else if (stored && stored[f.key] != null) {
            patch[f.key] = null;
          }
        });
        if (names) {
          var read = names.read();  // {path: {event: name | null}} (GA4: the one path, null)
          var wanted = Object.assign({}, storedNames);
          if (spec.paths[0].key) {
            spec.paths.forEach(function (p) {
              if (Object.keys(read[p.key]).length) wanted[p.key] = read[p.key];
              else delete wanted[p.key];
            });
          } else {
            wanted = read["null"];
          }
          if (!same(wanted, storedNames)) {
            patch.event_names = Object.keys(wanted).length ? wanted : null;
          }
        }
        if (actions.length) {
          var wantedActions = {};
          actions.forEach(function (f) {
            var v = f.input.value.trim();
            if (v) wantedActions[f.input.dataset.event] = v;
            else if (storedActions[f.input.dataset.event]) wantedActions[f.input.dataset.event] = null;
          });
          if (Object.keys(wantedActions).length) patch.conversion_actions = wantedActions;
        }
        patch.enabled = enabled.input.checked;
        var out = {};
        out[spec.name] = patch;
        return out;
      });
      el.querySelector("h2").append(" ", status);
      if (on && stored.enabled !== false) el.appendChild(testBox(spec.name));
      if (on) {
        el.querySelector(".v-form-actions").appendChild(h("button", {type: "button", class: "btn ghost",
          dataset: {removeDestination: spec.name}, onclick: function () {
            WT.confirm({title: WT.t("settings.dest_remove_title", {name: title}),
                        body: WT.t("settings.dest_remove_body"), danger: true,
                        confirm: WT.t("settings.dest_remove")}).then(function (ok) {
              if (!ok) return;
              var patch = {};
              patch[spec.name] = null;
              WT.api("PATCH", "/api/company", {body: patch}).then(function (c) {
                company = c; WT.toast(WT.t("common.saved")); draw();
              }, function (e) { WT.toast(V.errorText(e), "error"); });
            });
          }}, WT.t("settings.dest_remove")));
      }
      return el;
    }

    /* "Send a test event": the platform's own answer, shown as it came (POST
       /api/destinations/{name}/test). Meta and TikTok use the saved test event code. */
    function testBox(name) {
      var out = h("div", {class: "v-test-result", id: "settings-" + name + "-test", role: "status"});
      var button = h("button", {type: "button", class: "btn small", dataset: {testDestination: name}},
                     WT.t("settings.test_send"));
      button.addEventListener("click", function () {
        button.disabled = true;
        out.replaceChildren(h("p", {class: "muted small"}, WT.t("settings.test_sending")));
        WT.api("POST", "/api/destinations/" + name + "/test", {body: {}}).then(function (r) {
          button.disabled = false;
          out.dataset.ok = r.ok ? "true" : "false";
          out.replaceChildren(
            h("p", {class: r.ok ? "ok" : "error"},
              WT.t(r.ok ? "settings.test_ok" : "settings.test_refused") +
              (r.http_status != null ? " (HTTP " + r.http_status + ")" : "") +
              (r.error ? ": " + r.error : "")),
            name === "ga4" ? h("p", {class: "muted small"}, WT.t("settings.test_ga4_note")) : null,
            r.response != null ? h("pre", {class: "v-json"}, JSON.stringify(r.response, null, 2)) : null);
        }, function (e) {
          button.disabled = false;
          out.dataset.ok = "false";
          var raw = e && e.body && typeof e.body.error === "string" ? e.body.error : "";
          out.replaceChildren(h("p", {class: "error", role: "alert"},
            /needed for a test event/.test(raw) ? WT.t("settings.test_needs_code")
              : /unreachable/.test(raw) ? WT.t("settings.test_unreachable") : V.errorText(e)));
        });
      });
      return h("div", {class: "v-test"}, h("h3", {}, WT.t("settings.test_title")),
               h("p", {class: "muted small"}, WT.t("settings.test_help." + name)), button, out);
    }

    // ---- failed deliveries ----

    function failedCard() {
      var list = h("div", {id: "settings-failed-list"}, h("p", {class: "muted"}, WT.t("common.loading")));
      var card = h("section", {class: "card", id: "settings-failed"},
        h("div", {class: "spread"}, h("h2", {}, WT.t("settings.failed_title")),
          h("button", {type: "button", class: "btn ghost small", onclick: function () { loadFailed(); }},
            WT.t("common.refresh"))),
        h("p", {class: "muted small"}, WT.t("settings.failed_help")), list);
      function loadFailed() {
        return WT.api("GET", "/api/deliveries", {query: {status: "failed"}}).then(function (res) {
          var rows = res.deliveries || [];
          if (!rows.length) { list.replaceChildren(WT.empty("settings.failed_empty")); return; }
          list.replaceChildren(h("table", {class: "stack", id: "settings-failed-table"},
            h("thead", {}, h("tr", {}, ["when", "lead", "destination", "event", "error", ""].map(function (c) {
              return h("th", {scope: "col"}, c ? WT.t("settings.failed_col." + c) : "");
            }))),
            h("tbody", {}, rows.map(function (d) {
              var retry = h("button", {type: "button", class: "btn small", dataset: {retry: d.id},
                onclick: function () {
                  retry.disabled = true;
                  WT.api("POST", "/api/deliveries/" + d.id + "/retry").then(function () {
                    WT.toast(WT.t("deliveries.retried"));
                    loadFailed();
                  }, function (e) { retry.disabled = false; WT.toast(V.errorText(e), "error"); });
                }}, WT.t("deliveries.retry"));
              return h("tr", {dataset: {delivery: d.id}},
                h("td", {"data-label": WT.t("settings.failed_col.when")}, WT.fmt.datetime(d.updated_at)),
                h("td", {"data-label": WT.t("settings.failed_col.lead")},
                  h("a", {href: WT.href("lead", {id: d.lead_id})}, "#" + d.lead_id)),
                h("td", {"data-label": WT.t("settings.failed_col.destination")}, V.destinationName(d.destination)),
                h("td", {"data-label": WT.t("settings.failed_col.event")}, V.eventName(d.event)),
                h("td", {"data-label": WT.t("settings.failed_col.error")},
                  [d.last_status != null ? "HTTP " + d.last_status : null, d.last_error]
                    .filter(Boolean).join(" · ") || "–"),
                h("td", {}, retry));
            }))));
        }, function (e) {
          list.replaceChildren(h("p", {class: "error", role: "alert"}, V.errorText(e)));
        });
      }
      loadFailed();
      return card;
    }

    // ---- Google Ads export ----

    var exportRange = {};
    function googleAdsCard() {
      var names = company.google_ads_conversion_names || [];
      var pick = WT.field({label: WT.t("settings.gads_conversion"), name: "conversion_name",
                           type: "select", help: WT.t("settings.gads_conversion_help"),
                           options: [{value: "", label: WT.t("settings.gads_all")}].concat(
                             names.map(function (n) { return {value: n, label: n}; }))});
      pick.input.id = "settings-gads-name";
      pick.querySelector("label").setAttribute("for", "settings-gads-name");
      var picker = WT.rangePicker(exportRange, function (r) { exportRange = r; });
      exportRange = picker.value;
      var error = V.errorBox("settings-gads-error");
      var button = h("button", {type: "button", class: "btn primary", id: "settings-gads-download",
        onclick: function () {
          error.textContent = "";
          button.disabled = true;
          var r = picker.value;
          WT.download("/api/exports/google-ads.csv",
                      {conversion_name: pick.input.value, from: r.from, to: r.to},
                      "google-ads-" + r.from + "-" + r.to + ".csv")
            .then(function () { WT.toast(WT.t("settings.gads_done")); },
                  function (e) { error.textContent = V.errorText(e); })
            .then(function () { button.disabled = false; });
        }}, WT.t("common.download_csv"));
      return h("section", {class: "card", id: "settings-gads"},
        h("h2", {}, WT.t("settings.gads_title")),
        h("p", {class: "muted small"}, WT.t("settings.gads_help")),
        pick, picker, h("div", {class: "v-form-actions"}, button, error));
    }

    function googleAdsNamesForm() {
      var names = namesTable("settings-gads-names-table", GADS_EVENTS, [{
        key: null, defaults: GADS_DEFAULTS, label: WT.t("settings.names_col.gads"),
        current: company.google_ads_conversions || {}}], "");
      return form("settings-gads-names", WT.t("settings.gads_names_title"),
                  WT.t("settings.gads_names_help"), [names.node], function () {
        return {google_ads_conversions: names.read()["null"]};
      });
    }

    function draw() {
      var y = window.scrollY;
      var open = Array.prototype.map.call(body.querySelectorAll("details[open][id]"),
                                          function (d) { return d.id; });
      body.replaceChildren.apply(body, [
        companyForm(), attributionForm(), codeForm(), regionForm(), labelsForm(), chatRulesForm(),
        evolutionForm(),
        h("h2", {class: "v-section-title"}, WT.t("settings.destinations_title")),
        h("p", {class: "muted"}, WT.t("settings.destinations_help"))]
        .concat(DESTINATIONS.map(destinationForm),
                [failedCard(), googleAdsCard(), googleAdsNamesForm()]));
      open.forEach(function (id) {
        var d = document.getElementById(id);
        if (d) d.open = true;
      });
      showEvolutionState();
      window.scrollTo(0, y);
    }

    load();
    return null;
  }

  WT.view("settings", {nav: "nav.settings", title: "settings.title", render: renderSettings});
})();
