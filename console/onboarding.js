/* Getting started: a checklist that ticks itself (GET /api/onboarding every few seconds):
   (a) the snippet on the site and its first visit, (b) a WhatsApp number connected, (c) the
   first lead. The home view until the company's first lead; in the menu afterwards. */
(function () {
  "use strict";
  var h = WT.h;
  var EVERY = 3000;  // ms

  function step(n, titleKey) {
    var tick = h("span", {class: "tick", "aria-hidden": "true"}, String(n));
    var state = h("span", {class: "sr-only"});
    var title = h("h2", {}, WT.t(titleKey), state);
    var body = h("div", {class: "step-body"}, title);
    var li = h("li", {class: "step card", dataset: {step: String(n)}}, tick, body);
    li.body = body;
    li.setDone = function (done) {
      li.classList.toggle("done", !!done);
      li.dataset.done = done ? "true" : "false";
      tick.textContent = done ? "✓" : String(n);
      state.textContent = " — " + WT.t(done ? "onboarding.done" : "onboarding.todo");
    };
    li.setDone(false);
    return li;
  }

  function live(kind, text) {
    return h("p", {class: "live " + (kind || ""), role: "status"}, h("span", {class: "dot"}),
             h("span", {}, text));
  }

  WT.view("onboarding", {
    nav: "nav.onboarding", title: "onboarding.title",
    render: function (root) {
      var ui = WT.connectionUI;
      var snippetBox = h("div", {class: "snippets"}, h("p", {class: "muted"}, WT.t("common.loading")));
      var visitStatus = h("div", {class: "visit-status"});
      var connStatus = h("div", {class: "connection-status"});
      var connArea = h("div", {class: "connect-area"});
      var leadStatus = h("div", {class: "lead-status"});
      var error = h("p", {class: "error", role: "alert"});

      var s1 = step(1, "onboarding.snippet_title");
      s1.body.appendChild(h("p", {}, WT.t("onboarding.snippet_intro")));
      s1.body.appendChild(snippetBox);
      s1.body.appendChild(visitStatus);

      var s2 = step(2, "onboarding.connect_title");
      s2.body.appendChild(h("p", {}, WT.t("onboarding.connect_intro")));
      s2.body.appendChild(connStatus);
      s2.body.appendChild(connArea);

      var s3 = step(3, "onboarding.lead_title");
      s3.body.appendChild(h("p", {}, WT.t("onboarding.lead_intro")));
      s3.body.appendChild(leadStatus);

      root.appendChild(h("h1", {}, WT.t("onboarding.title")));
      root.appendChild(h("p", {class: "lead-text"}, WT.t("onboarding.intro")));
      root.appendChild(error);
      root.appendChild(h("ol", {class: "steps"}, s1, s2, s3));

      var snippetsShown = false, connectMode = null, panel = null, last = null;

      function showSnippets(o) {
        if (snippetsShown || !o.snippets) return;
        snippetsShown = true;
        snippetBox.replaceChildren(
          h("h3", {}, WT.t("onboarding.snippet_a")),
          h("p", {class: "help"}, WT.t("onboarding.snippet_a_help")),
          h("pre", {class: "code", "data-snippet": "attribute"}, o.snippets.attribute),
          h("div", {class: "row"}, WT.copyButton(o.snippets.attribute, WT.t("onboarding.copy_snippet"))),
          h("details", {style: {"margin-top": ".8rem"}},
            h("summary", {}, WT.t("onboarding.snippet_b")),
            h("p", {class: "help", style: {"margin-top": ".5rem"}}, WT.t("onboarding.snippet_b_help")),
            h("pre", {class: "code", "data-snippet": "global"}, o.snippets.global),
            h("div", {class: "row"}, WT.copyButton(o.snippets.global, WT.t("onboarding.copy_snippet")))),
          h("p", {class: "help", style: {"margin-top": ".8rem"}}, WT.t("onboarding.snippet_where")));
      }

      function showConnect(o) {
        var c = o.connections || {};
        if (c.open) {
          connStatus.replaceChildren(live("ok", WT.t("onboarding.connected")));
          if (connectMode !== "done") {
            connectMode = "done";
            if (panel) { panel.stop(); panel = null; }
            connArea.replaceChildren(h("p", {}, h("a", {href: WT.href("connections")},
                                                   WT.t("onboarding.see_connections"))));
          }
          return;
        }
        connStatus.replaceChildren(live("", c.total ? WT.t("onboarding.waiting_scan")
                                                    : WT.t("onboarding.no_connection")));
        if (connectMode === null) chooser();
      }

      function chooser() {
        connectMode = "choose";
        var create = ui.createForm(function (id, answer) {
          var q = answer.qrcode || {};
          showPanel(id, q);
          refresh();  // "waiting for the scan" at once, not at the next poll
        });
        var adopt = ui.adoptForm(function (id) {
          WT.toast(WT.t("connections.adopted", {name: id}));
          refresh();
        });
        connArea.replaceChildren(
          create,
          h("details", {class: "adopt", style: {"margin-top": ".8rem"}},
            h("summary", {}, WT.t("onboarding.adopt_summary")),
            h("p", {class: "help", style: {"margin-top": ".5rem"}}, WT.t("connections.adopt_intro")),
            adopt));
        // A number created earlier and still waiting for its scan: offer its QR again.
        WT.api("GET", "/api/connections").then(function (d) {
          var waiting = (d.connections || []).filter(function (x) {
            return x.verified && !x.deletedAt && x.state !== "open";
          });
          if (!waiting.length || connectMode !== "choose") return;
          connArea.insertBefore(h("div", {class: "notice"},
            h("p", {}, WT.t("onboarding.pending", {name: waiting[0].connectionId})),
            h("button", {type: "button", class: "btn primary small",
                         onclick: function () { showPanel(waiting[0].connectionId, {}); }},
              WT.t("connections.show_qr"))), connArea.firstChild);
        }, function () { /* the form is enough */ });
      }

      function showPanel(id, q) {
        connectMode = "qr";
        if (panel) panel.stop();
        panel = ui.qrPanel(id, {qrcode: q, pairingCode: q.pairingCode,
                                onConnected: function () { refresh(); }});
        connArea.replaceChildren(
          h("h3", {}, WT.t("onboarding.scan_now", {name: id})),
          panel.element,
          h("div", {class: "notice", style: {"margin-top": "1rem"}},
            h("p", {}, WT.t("onboarding.client_link_intro")),
            h("button", {type: "button", class: "btn ghost small",
                         onclick: function () { ui.linkDialog(id); }},
              WT.t("connections.client_link"))),
          h("p", {}, h("button", {type: "button", class: "link",
                                  onclick: function () { panel.stop(); panel = null; chooser(); }},
            WT.t("onboarding.other_number"))));
      }

      function update(o) {
        last = o;
        error.textContent = "";
        showSnippets(o);
        var visited = !!o.first_visit_at;
        s1.setDone(visited);
        visitStatus.replaceChildren(visited
          ? live("ok", WT.t("onboarding.visit_received", {when: WT.fmt.relative(o.last_visit_at ||
                                                                                o.first_visit_at),
                                                         count: WT.fmt.number(o.visits)}))
          : live("", WT.t("onboarding.visit_waiting")));
        s2.setDone((o.connections || {}).open > 0);
        showConnect(o);
        var leads = o.leads > 0;
        s3.setDone(leads);
        leadStatus.replaceChildren(leads
          ? h("div", {}, live("ok", WT.t("onboarding.lead_received", {count: WT.fmt.number(o.leads)})),
              h("p", {}, h("a", {class: "btn primary", href: WT.href("leads")},
                           WT.t("onboarding.see_leads"))))
          : live("", WT.t("onboarding.lead_waiting")));
        root.classList.toggle("all-done", visited && leads && (o.connections || {}).open > 0);
      }

      function refresh() {
        return WT.api("GET", "/api/onboarding").then(update, function (e) {
          if (!last) error.textContent = e.message;
        });
      }
      refresh();
      WT.poll(refresh, EVERY);
      return function () { if (panel) panel.stop(); };
    }
  });
})();
