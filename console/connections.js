/* WhatsApp numbers. Evolution connections: state, number, last message received, refused
   webhooks; QR that refreshes while it is shown, pairing code, client link, adoption; restart,
   log out, delete. WhatsApp Cloud API connections (SPEC §13): the form with Meta's ids and the
   app secret, then the callback URL and verify token to paste into the Meta app; listed with
   their ids, deleted here only. The pieces the onboarding reuses are on WT.connectionUI. */
(function () {
  "use strict";
  var h = WT.h;
  var QR_EVERY = 3000;  // ms: WhatsApp changes its QR every ~20 s; we ask more often
  // The Cloud API form's fields, in the order shown; the API's 400 names the one it refuses.
  var CLOUD_FIELDS = ["phone_number_id", "waba_id", "app_secret", "access_token"];
  var TTLS = [[3600, "connections.ttl_1h"], [86400, "connections.ttl_1d"],
              [7 * 86400, "connections.ttl_7d"], [30 * 86400, "connections.ttl_30d"]];

  function stateBadge(c) {
    var s = c.deletedAt ? "deleted" : c.state || "unknown";
    var kind = {open: "ok", connecting: "warn", close: "bad", deleted: ""}[s];
    var key = "connections.state." + s;
    return h("span", {class: "badge " + (kind == null ? "" : kind), dataset: {state: s}},
             WT.has(key) ? WT.t(key) : s);
  }

  function slug(text) {
    return String(text).normalize("NFD").replace(/[\u0300-\u036f]/g, "").trim().toLowerCase()
      .replace(/[^a-z0-9_.-]+/g, "-").replace(/^[-_.]+|-+$/g, "").slice(0, 64);
  }

  function pairingText(code) {
    code = String(code || "");
    return code.length === 8 && code.indexOf("-") < 0 ? code.slice(0, 4) + "-" + code.slice(4) : code;
  }

  /* The user's words for a connection call's error. */
  function connectionError(e, name) {
    var m = (e.body && e.body.error) || "";
    if (e.status === 409 && /already exists/.test(m)) return WT.t("connections.exists", {name: name});
    if (e.status === 409 && /connected/.test(m)) return WT.t("connections.already_connected");
    if (e.status === 403 && /instance_token is required/.test(m)) return WT.t("connections.adopt_token_needed");
    if (e.status === 403 && /instance_token/.test(m)) return WT.t("connections.adopt_token_wrong");
    if (e.status === 404 && /Connection not found|Instance|instance/.test(m)) return WT.t("connections.not_on_server", {name: name});
    if (e.status === 400 && /No server configured/.test(m)) return WT.t("connections.no_server");
    if (e.status === 400 && /connectionId must/.test(m)) return WT.t("connections.name_invalid");
    if (e.status === 400 && /number must/.test(m)) return WT.t("connections.number_invalid");
    if (e.status === 503 && /no QR code yet/.test(m)) return WT.t("connections.qr_not_yet");
    if (e.status === 409 && /phone_number_id/.test(m)) return WT.t("connections.cloud_in_use");
    if (e.status === 400) {
      for (var i = 0; i < CLOUD_FIELDS.length; i++) {
        if (m.indexOf(CLOUD_FIELDS[i]) >= 0) return WT.t("connections.cloud_invalid." + CLOUD_FIELDS[i]);
      }
    }
    return e.message;
  }

  /* A QR that refreshes every few seconds until the number is connected (409 from the API),
     with the pairing code when there is one. opts: {onConnected(conn), pairingCode}. Returns
     {element, stop()}; it also stops when the view changes. */
  function qrPanel(connectionId, opts) {
    opts = opts || {};
    var img = h("img", {class: "qr", alt: WT.t("connections.qr_alt"), hidden: true});
    var status = h("p", {class: "live", role: "status"}, h("span", {class: "dot"}),
                   h("span", {}, WT.t("connections.qr_loading")));
    var pairing = h("div", {class: "pairing-box", hidden: true});
    // Who chose the pairing code (no camera) sees it first; the QR stays below as the other way.
    var pairFirst = !!opts.pairingCode;
    var box = h("div", {class: "qr-panel" + (pairFirst ? " pair-first" : ""),
                        dataset: {connection: connectionId}},
      pairFirst ? pairing : null,
      h("div", {class: "grid"},
        h("div", {}, img, status),
        h("div", {},
          h("h3", {}, WT.t(pairFirst ? "connections.scan_title_or" : "connections.scan_title")),
          h("ol", {class: "how"},
            h("li", {}, WT.t("connections.scan_1")),
            h("li", {}, WT.t("connections.scan_2")),
            h("li", {}, WT.t("connections.scan_3")),
            h("li", {}, WT.t("connections.scan_4"))),
          h("p", {class: "help"}, WT.t("connections.qr_refreshes")),
          pairFirst ? null : pairing)));
    var done = false, stop = null;

    function showPairing(code) {
      if (!code) return;
      pairing.hidden = false;
      pairing.replaceChildren(
        h("h3", {}, WT.t(pairFirst ? "connections.pair_title_first" : "connections.pair_title")),
        h("p", {class: "pairing", dataset: {pairing: code}}, pairingText(code)),
        h("ol", {class: "how"},
          h("li", {}, WT.t("connections.pair_1")),
          h("li", {}, WT.t("connections.pair_2")),
          h("li", {}, WT.t("connections.pair_3")),
          h("li", {}, WT.t("connections.pair_4"))));
    }
    function setStatus(text, kind) {
      status.className = "live " + (kind || "");
      status.replaceChildren(h("span", {class: "dot"}), h("span", {}, text));
    }
    function connected(info) {
      if (done) return;
      done = true;
      if (stop) stop();
      img.hidden = true; pairing.hidden = true;
      var phone = info && info.phone ? " " + WT.fmt.phone(info.phone) : "";
      setStatus(WT.t("connections.connected_now") + phone, "ok");
      box.classList.add("connected");
      if (opts.onConnected) opts.onConnected(info || {});
    }
    function tick() {
      if (done) return null;
      return WT.api("GET", "/qrcode/generate-qrcode",
                    {query: {instanceId: connectionId, format: "json"}}).then(function (qr) {
        if (done) return;
        if (qr.state === "open") { connected(qr); return; }
        img.src = qr.base64; img.hidden = false;
        showPairing(qr.pairingCode || opts.pairingCode);
        setStatus(WT.t("connections.qr_waiting"));
      }, function (e) {
        if (e.status === 409) { connected(e.body || {}); return; }
        setStatus(connectionError(e, connectionId), "bad");
      });
    }
    if (opts.pairingCode) showPairing(opts.pairingCode);
    if (opts.qrcode && opts.qrcode.base64) {
      img.src = opts.qrcode.base64; img.hidden = false;
      setStatus(WT.t("connections.qr_waiting"));
    } else {
      tick();
    }
    stop = WT.poll(tick, QR_EVERY);
    return {element: box, stop: function () { done = true; if (stop) stop(); }};
  }

  function qrDialog(connectionId, onConnected) {
    var panel = qrPanel(connectionId, {onConnected: onConnected});
    WT.dialog({title: WT.t("connections.qr_title", {name: connectionId}), content: panel.element,
               onClose: panel.stop});
  }

  function linkDialog(connectionId) {
    var ttl = WT.field({label: WT.t("connections.link_ttl"), name: "ttl", type: "select",
                        value: 7 * 86400,
                        options: TTLS.map(function (x) { return {value: x[0], label: WT.t(x[1])}; })});
    var out = h("div", {class: "link-out", "aria-live": "polite"});
    WT.dialog({
      title: WT.t("connections.link_title"),
      content: [h("p", {}, WT.t("connections.link_intro")), ttl, out],
      actions: [
        {label: WT.t("common.close"), kind: "ghost"},
        {label: WT.t("connections.link_make"), kind: "primary", onClick: function () {
          return WT.api("POST", "/api/connection-link",
                        {body: {connectionId: connectionId, ttl: Number(ttl.input.value)}})
            .then(function (link) {
              out.replaceChildren(
                h("pre", {class: "code", "data-link": "client"}, link.url),
                h("div", {class: "row"}, WT.copyButton(link.url, WT.t("connections.link_copy")),
                  h("a", {class: "btn ghost", href: link.url, target: "_blank",
                          rel: "noopener noreferrer"}, WT.t("connections.link_open"))),
                h("p", {class: "help"}, WT.t("connections.link_expires",
                                             {when: WT.fmt.datetime(link.expires_at)})));
              return false;  // stay open: the link is what the user came for
            }, function (e) { throw new Error(connectionError(e, connectionId)); });
        }}
      ]
    });
  }

  /* The form that creates a connection: name, and QR or pairing code. onCreated(connectionId,
     answer) gets the API's answer (with qrcode). */
  function createForm(onCreated) {
    var name = WT.field({label: WT.t("connections.name"), name: "connectionId", required: true,
                         help: WT.t("connections.name_help"),
                         attrs: {autocapitalize: "off", spellcheck: "false", maxlength: 64}});
    var how = WT.field({label: WT.t("connections.how"), name: "how", type: "select", value: "qr",
                        options: [{value: "qr", label: WT.t("connections.how_qr")},
                                  {value: "pair", label: WT.t("connections.how_pair")}]});
    var number = WT.field({label: WT.t("connections.number"), name: "number", type: "tel",
                           help: WT.t("connections.number_help"),
                           attrs: {autocomplete: "off", inputmode: "tel"}});
    number.hidden = true;
    how.input.addEventListener("change", function () { number.hidden = how.input.value !== "pair"; });
    var error = h("p", {class: "error", role: "alert"});
    var button = h("button", {type: "submit", class: "btn primary"}, WT.t("connections.create"));
    var form = h("form", {class: "create-connection", novalidate: true}, name, how, number, error,
                 h("div", {class: "row"}, button));
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      error.textContent = "";
      var id = slug(name.input.value);
      if (!id) { error.textContent = WT.t("connections.name_missing"); name.input.focus(); return; }
      var body = {connectionId: id};
      if (how.input.value === "pair") {
        var digits = number.input.value.replace(/\D/g, "");
        if (digits.length < 10 || digits.length > 15) {
          error.textContent = WT.t("connections.number_invalid"); number.input.focus(); return;
        }
        body.number = digits;
      }
      button.disabled = true;
      WT.api("POST", "/api/create-instance", {body: body}).then(function (answer) {
        button.disabled = false;
        name.input.value = ""; number.input.value = "";
        onCreated(id, answer);
      }, function (e) {
        button.disabled = false;
        error.textContent = connectionError(e, id);
      });
    });
    return form;
  }

  function adoptForm(onAdopted) {
    var name = WT.field({label: WT.t("connections.adopt_name"), name: "connectionId", required: true,
                         help: WT.t("connections.adopt_name_help"),
                         attrs: {autocapitalize: "off", spellcheck: "false", maxlength: 64}});
    var token = WT.field({label: WT.t("connections.adopt_token"), name: "instance_token",
                          help: WT.t("connections.adopt_token_help"),
                          attrs: {autocomplete: "off", spellcheck: "false"}});
    var error = h("p", {class: "error", role: "alert"});
    var button = h("button", {type: "submit", class: "btn primary"}, WT.t("connections.adopt"));
    var form = h("form", {class: "adopt-connection", novalidate: true}, name, token, error,
                 h("div", {class: "row"}, button));
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      error.textContent = "";
      var id = name.input.value.trim();
      if (!id) { error.textContent = WT.t("connections.name_missing"); name.input.focus(); return; }
      var body = {type: "evolution", connectionId: id, adopt: true};
      if (token.input.value.trim()) body.instance_token = token.input.value.trim();
      button.disabled = true;
      WT.api("POST", "/api/connections", {body: body}).then(function (answer) {
        button.disabled = false;
        onAdopted(id, answer);
      }, function (e) {
        button.disabled = false;
        error.textContent = connectionError(e, id);
      });
    });
    return form;
  }

  function isCloud(c) { return c.type === "cloud"; }

  /* What to paste into the Meta app and where: the callback URL, the verify token when we have it
     (the API shows it once, when the connection is created), and the steps. */
  function cloudWebhookPanel(webhookUrl, verifyToken) {
    function value(kind, text) {
      return h("div", {class: "cloud-value", style: {"margin-bottom": "1rem"}},
        h("h3", {}, WT.t("connections.cloud_" + kind)),
        h("pre", {class: "code", dataset: {cloud: kind}}, text),
        WT.copyButton(text, WT.t("connections.cloud_copy_" + kind)));
    }
    return h("div", {class: "cloud-webhook"},
      webhookUrl ? value("callback_url", webhookUrl) : null,
      verifyToken ? value("verify_token", verifyToken) : null,
      h("p", {class: "notice " + (verifyToken ? "warn" : "")},
        WT.t(verifyToken ? "connections.cloud_verify_token_once" : "connections.cloud_token_hidden")),
      h("h3", {}, WT.t("connections.cloud_steps_title")),
      h("ol", {class: "how cloud-steps"},
        [1, 2, 3, 4, 5].map(function (n) { return h("li", {}, WT.t("connections.cloud_step_" + n)); })));
  }

  /* The form that connects a number of the WhatsApp Cloud API: a name, Meta's ids, the app secret
     and optionally an access token (both write-only). onCreated(connectionId, answer). */
  function cloudForm(onCreated) {
    var name = WT.field({label: WT.t("connections.name"), name: "connectionId", required: true,
                         help: WT.t("connections.name_help"),
                         attrs: {autocapitalize: "off", spellcheck: "false", maxlength: 64}});
    var fields = {};
    CLOUD_FIELDS.forEach(function (f) {
      var secret = f === "app_secret" || f === "access_token";
      fields[f] = WT.field({label: WT.t("connections.cloud_field." + f), name: f,
                            type: secret ? "password" : "text", required: f !== "access_token",
                            help: WT.t("connections.cloud_help." + f),
                            attrs: secret ? {autocomplete: "new-password", spellcheck: "false"}
                              : {autocomplete: "off", inputmode: "numeric", spellcheck: "false"}});
    });
    var error = h("p", {class: "error", role: "alert"});
    var button = h("button", {type: "submit", class: "btn primary"}, WT.t("connections.cloud_create"));
    var form = h("form", {class: "cloud-connection", novalidate: true},
      h("p", {}, WT.t("connections.cloud_intro")), name,
      CLOUD_FIELDS.map(function (f) { return fields[f]; }), error, h("div", {class: "row"}, button));
    function refuse(field, key) {
      error.textContent = WT.t(key);
      field.input.focus();
    }
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      error.textContent = "";
      var id = slug(name.input.value);
      if (!id) return refuse(name, "connections.name_missing");
      var body = {type: "cloud", connectionId: id};
      for (var i = 0; i < CLOUD_FIELDS.length; i++) {
        var f = CLOUD_FIELDS[i], v = fields[f].input.value.trim();
        if (!v && f === "access_token") continue;
        if (!v) return refuse(fields[f], "connections.cloud_missing." + f);
        if ((f === "phone_number_id" || f === "waba_id") && !/^\d{5,20}$/.test(v)) {
          return refuse(fields[f], "connections.cloud_invalid." + f);
        }
        body[f] = v;
      }
      button.disabled = true;
      WT.api("POST", "/api/connections", {body: body}).then(function (answer) {
        button.disabled = false;
        form.reset();
        onCreated(id, answer);
      }, function (e) {
        button.disabled = false;
        error.textContent = connectionError(e, id);
      });
    });
    return form;
  }

  WT.connectionUI = {qrPanel: qrPanel, qrDialog: qrDialog, linkDialog: linkDialog,
                     createForm: createForm, adoptForm: adoptForm, stateBadge: stateBadge,
                     cloudForm: cloudForm, cloudWebhookPanel: cloudWebhookPanel,
                     error: connectionError};

  // ---- the view --------------------------------------------------------------------------------

  function rejectionText(reason) {
    var key = "connections.rejection." + String(reason || "").replace(/\W+/g, "_");
    return WT.has(key) ? WT.t(key) : reason;
  }

  function act(label, fn, kind) {
    return h("button", {type: "button", class: "btn small " + (kind || "ghost"), onclick: fn}, label);
  }

  WT.view("connections", {
    nav: "nav.connections", title: "connections.title",
    render: function (root) {
      var list = h("div", {class: "connection-list", "aria-live": "polite"},
                   h("p", {class: "muted"}, WT.t("common.loading")));
      var cards = {};

      function run(promise, okText) {
        return promise.then(function () {
          if (okText) WT.toast(okText);
          return load();
        }, function (e) { WT.toast(connectionError(e, ""), "error"); });
      }

      /* A destructive action: asks first (its title, body and button from the keys
         connections.<kind>_title / _body / <kind>), then runs the call. */
      function confirmed(id, kind, done, call) {
        return function () {
          WT.confirm({title: WT.t("connections." + kind + "_title", {name: id}),
                      body: WT.t("connections." + kind + "_body"),
                      confirm: WT.t("connections." + kind), danger: true}).then(function (ok) {
            if (ok) run(call(), WT.t("connections." + done));
          });
        };
      }

      function cloudActions(c) {
        var id = c.connectionId;
        // Deleted: only forgetting it for good is left (then the name can be connected again).
        var deleteAll = act(WT.t("connections.delete_all"), confirmed(id, "cloud_delete_all",
          "deleted_all", function () {
            return WT.api("DELETE", "/instance/delete", {body: {connectionId: id}});
          }), "ghost bad-text");
        if (c.deletedAt) return [deleteAll];
        return [
          act(WT.t("connections.cloud_show_webhook"), function () {
            WT.dialog({title: WT.t("connections.cloud_webhook_title", {name: id}),
                       content: cloudWebhookPanel(c.webhook_url, null),
                       actions: [{label: WT.t("common.close"), kind: "primary"}]});
          }),
          act(WT.t("connections.delete"), confirmed(id, "cloud_delete", "cloud_deleted",
            function () { return WT.api("DELETE", "/api/delete-instance", {query: {connectionId: id}}); }),
            "ghost bad-text")];
      }

      function actions(c) {
        if (isCloud(c)) return cloudActions(c);
        var id = c.connectionId, out = [];
        var deleteAll = act(WT.t("connections.delete_all"), confirmed(id, "delete_all", "deleted_all",
          function () { return WT.api("DELETE", "/instance/delete", {body: {connectionId: id}}); }),
          "ghost bad-text");
        if (c.deletedAt) return [deleteAll];
        if (!c.verified) {
          out.push(act(WT.t("connections.adopt"), function () { adoptDialog(id); }, "primary"));
          return out;
        }
        if (c.state !== "open") {
          out.push(act(WT.t("connections.show_qr"), function () {
            qrDialog(id, function () { load(); });
          }, "primary"));
        }
        out.push(act(WT.t("connections.client_link"), function () { linkDialog(id); }));
        out.push(act(WT.t("connections.restart"), function () {
          run(WT.api("POST", "/instance/restart", {body: {connectionId: id}}),
              WT.t("connections.restarted"));
        }));
        if (c.state === "open") {
          out.push(act(WT.t("connections.logout"), confirmed(id, "logout", "logged_out",
            function () { return WT.api("POST", "/instance/logout", {body: {connectionId: id}}); })));
        }
        out.push(act(WT.t("connections.delete"), confirmed(id, "delete", "deleted",
          function () { return WT.api("DELETE", "/api/delete-instance", {query: {connectionId: id}}); }),
          "ghost bad-text"));
        out.push(deleteAll);
        return out;
      }

      function cloudBadge(c) {
        var s = c.deletedAt ? "deleted" : c.lastDeliveryAt ? "receiving" : "waiting";
        return h("span", {class: "row"},
          h("span", {class: "badge info", dataset: {type: "cloud"}}, WT.t("connections.type.cloud")),
          h("span", {class: "badge " + {receiving: "ok", waiting: "warn", deleted: ""}[s],
                     dataset: {state: s}}, WT.t("connections.cloud_state." + s)));
      }

      function cloudCard(c) {
        var facts = h("dl", {class: "facts"},
          h("dt", {}, WT.t("connections.type_label")),
          h("dd", {dataset: {field: "type"}}, WT.t("connections.type.cloud_long")),
          h("dt", {}, WT.t("connections.cloud_field.phone_number_id")),
          h("dd", {dataset: {field: "phone_number_id"}}, c.phone_number_id || "–"),
          h("dt", {}, WT.t("connections.cloud_field.waba_id")),
          h("dd", {dataset: {field: "waba_id"}}, c.waba_id || "–"),
          c.phone ? h("dt", {}, WT.t("connections.number_label")) : null,
          c.phone ? h("dd", {class: "phone"}, WT.fmt.phone(c.phone)) : null,
          h("dt", {}, WT.t("connections.last_message")),
          h("dd", {}, c.lastDeliveryAt
            ? h("span", {title: WT.fmt.datetime(c.lastDeliveryAt)}, WT.fmt.relative(c.lastDeliveryAt))
            : WT.t("connections.no_message_yet")));
        var notes = [];
        if (!c.lastDeliveryAt && !c.deletedAt) {
          notes.push(h("p", {class: "notice"}, WT.t("connections.cloud_waiting_help")));
        }
        return h("article", {class: "card connection", dataset: {connection: c.connectionId, type: "cloud"}},
          h("div", {class: "spread"}, h("h2", {}, c.connectionId), cloudBadge(c)),
          facts, notes,
          h("div", {class: "row", style: {"margin-top": ".8rem"}}, actions(c)));
      }

      function card(c) {
        if (isCloud(c)) return cloudCard(c);
        var facts = h("dl", {class: "facts"},
          h("dt", {}, WT.t("connections.number_label")),
          h("dd", {class: "phone"}, c.phone ? WT.fmt.phone(c.phone) : WT.t("connections.no_number")),
          h("dt", {}, WT.t("connections.profile")),
          h("dd", {}, c.profileName || "–"),
          h("dt", {}, WT.t("connections.last_message")),
          h("dd", {}, c.lastDeliveryAt
            ? h("span", {title: WT.fmt.datetime(c.lastDeliveryAt)}, WT.fmt.relative(c.lastDeliveryAt))
            : WT.t("connections.no_message_yet")));
        var notes = [];
        if (c.lastRejectedAt) {
          notes.push(h("p", {class: "notice bad rejection"},
            h("strong", {}, WT.t("connections.rejected", {when: WT.fmt.relative(c.lastRejectedAt)})),
            " ", rejectionText(c.lastRejection), " ", WT.t("connections.rejected_fix")));
        }
        if (!c.verified && !c.deletedAt) {
          notes.push(h("p", {class: "notice warn"}, WT.t("connections.unverified")));
        }
        return h("article", {class: "card connection", dataset: {connection: c.connectionId}},
          h("div", {class: "spread"},
            h("h2", {}, c.connectionId), stateBadge(c)),
          facts, notes,
          h("div", {class: "row", style: {"margin-top": ".8rem"}}, actions(c)));
      }

      function draw(connections) {
        var live = connections.filter(function (c) { return !c.deletedAt; });
        var gone = connections.filter(function (c) { return c.deletedAt; });
        if (!connections.length) {
          list.replaceChildren(WT.empty("connections.empty",
            h("button", {type: "button", class: "btn primary", onclick: createDialog},
              WT.t("connections.new"))));
          cards = {};
          return;
        }
        var seen = {}, items = [];
        live.concat(gone).forEach(function (c) {
          var key = JSON.stringify(c), old = cards[c.connectionId];
          var el = old && old.key === key ? old.el : card(c);
          if (old && old.el !== el && old.el.contains(document.activeElement)) {
            // keep the keyboard where it was
            setTimeout(function () { var b = el.querySelector("button"); if (b) b.focus(); }, 0);
          }
          seen[c.connectionId] = {key: key, el: el};
          items.push(el);
        });
        cards = seen;
        var children = items.slice(0, live.length);
        if (gone.length) {
          children.push(h("details", {class: "deleted-connections"},
            h("summary", {}, WT.t("connections.deleted_list", {count: gone.length})),
            items.slice(live.length)));
        }
        // Replace only when something changed (no flicker, no lost focus on a poll).
        var same = list.children.length === children.length &&
          children.every(function (el, i) { return list.children[i] === el; });
        if (!same) list.replaceChildren.apply(list, children);
      }

      function load() {
        return WT.api("GET", "/api/connections").then(function (d) {
          draw(d.connections || []);
          return d.connections || [];
        }, function (e) {
          list.replaceChildren(h("p", {class: "error", role: "alert"}, e.message));
          return [];
        });
      }

      /* A dialog with a form; once the form has made the connection, the list reloads and the
         dialog next(id, answer) describes follows (the QR, or the Meta webhook setup). */
      function formDialog(title, makeForm, next) {
        var dlg = WT.dialog({
          title: title,
          content: makeForm(function (id, answer) {
            dlg.close();
            load();
            WT.dialog(next(id, answer));
          }),
          actions: [{label: WT.t("common.cancel"), kind: "ghost"}]
        });
      }
      function createDialog() {
        formDialog(WT.t("connections.new"), createForm, function (id, answer) {
          var q = answer.qrcode || {};
          var panel = qrPanel(id, {qrcode: q, pairingCode: q.pairingCode,
                                   onConnected: function () { load(); }});
          return {title: WT.t("connections.qr_title", {name: id}), content: panel.element,
                  onClose: panel.stop};
        });
      }
      function cloudDialog() {
        formDialog(WT.t("connections.cloud_title"), cloudForm, function (id, answer) {
          return {title: WT.t("connections.cloud_saved_title", {name: id}),
                  content: [h("p", {}, WT.t("connections.cloud_saved", {name: id})),
                            cloudWebhookPanel(answer.webhook_url, answer.verify_token)],
                  actions: [{label: WT.t("common.close"), kind: "primary"}]};
        });
      }
      function adoptDialog(prefill) {
        var form = adoptForm(function (id) {
          dlg.close();
          WT.toast(WT.t("connections.adopted", {name: id}));
          load();
        });
        if (prefill) form.querySelector("input[name=connectionId]").value = prefill;
        var dlg = WT.dialog({title: WT.t("connections.adopt_title"),
                             content: [h("p", {}, WT.t("connections.adopt_intro")), form],
                             actions: [{label: WT.t("common.cancel"), kind: "ghost"}]});
      }

      root.appendChild(h("div", {class: "spread"},
        h("h1", {}, WT.t("connections.title")),
        h("div", {class: "row"},
          h("button", {type: "button", class: "btn ghost", onclick: function () { adoptDialog(); }},
            WT.t("connections.adopt_existing")),
          h("button", {type: "button", class: "btn", id: "connections-add-cloud", onclick: cloudDialog},
            WT.t("connections.add_cloud")),
          h("button", {type: "button", class: "btn primary", onclick: createDialog},
            WT.t("connections.new")))));
      root.appendChild(list);
      // Ask Evolution once for the state of every managed number, then follow the stored state
      // (connection.update webhooks keep it current) every few seconds.
      load().then(function (connections) {
        var checks = connections.filter(function (c) {
          return !isCloud(c) && c.verified && !c.deletedAt;
        })
          .map(function (c) {
            return WT.api("GET", "/api/instance-status", {query: {connectionId: c.connectionId}})
              .catch(function () { return null; });
          });
        return Promise.all(checks);
      }).then(function (checked) { if (checked.length) load(); });
      WT.poll(load, 5000);
    }
  });
})();
