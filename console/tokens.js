/* Access tokens of the company: list (never the value), create (shown once), revoke. */
(function () {
  "use strict";
  var h = WT.h;

  function showOnce(created) {
    WT.dialog({
      title: WT.t("tokens.created_title", {name: created.name}),
      content: [
        h("p", {class: "notice warn", role: "note"}, WT.t("tokens.once")),
        h("pre", {class: "code secret", "data-secret": "token"}, created.token),
        h("div", {class: "row"}, WT.copyButton(created.token, WT.t("tokens.copy")))
      ],
      actions: [{label: WT.t("tokens.saved_it"), kind: "primary"}]
    });
  }

  WT.view("tokens", {
    nav: "nav.tokens", title: "tokens.title",
    render: function (root) {
      var list = h("div", {class: "card", "aria-live": "polite"},
                   h("p", {class: "muted"}, WT.t("common.loading")));

      function load() {
        return WT.api("GET", "/api/tokens").then(function (d) { draw(d.tokens || []); },
          function (e) { list.replaceChildren(h("p", {class: "error", role: "alert"}, e.message)); });
      }

      function revoke(t) {
        WT.confirm({title: WT.t("tokens.revoke_title", {name: t.name || t.id}),
                    body: WT.t("tokens.revoke_body"), confirm: WT.t("tokens.revoke"),
                    danger: true}).then(function (ok) {
          if (!ok) return;
          WT.api("DELETE", "/api/tokens/" + encodeURIComponent(t.id)).then(function () {
            WT.toast(WT.t("tokens.revoked", {name: t.name || t.id}));
            load();
          }, function (e) { if (e.status !== 401) WT.toast(e.message, "error"); });
        });
      }

      function draw(tokens) {
        if (!tokens.length) { list.replaceChildren(WT.empty("tokens.empty")); return; }
        list.replaceChildren(h("div", {class: "table-wrap"}, h("table", {class: "stack"},
          h("thead", {}, h("tr", {},
            h("th", {}, WT.t("tokens.name")), h("th", {}, WT.t("tokens.created")),
            h("th", {}, WT.t("tokens.last_used")),
            h("th", {}, h("span", {class: "sr-only"}, WT.t("tokens.revoke"))))),
          h("tbody", {}, tokens.map(function (t) {
            return h("tr", {dataset: {token: String(t.id)}},
              h("td", {"data-label": WT.t("tokens.name")},
                h("strong", {}, t.name || WT.t("tokens.unnamed"))),
              h("td", {"data-label": WT.t("tokens.created")}, WT.fmt.datetime(t.created_at)),
              h("td", {"data-label": WT.t("tokens.last_used")},
                t.last_used_at ? h("span", {title: WT.fmt.datetime(t.last_used_at)},
                                   WT.fmt.relative(t.last_used_at)) : WT.t("tokens.never_used")),
              h("td", {}, h("button", {type: "button", class: "btn small ghost",
                                       "aria-label": WT.t("tokens.revoke_named", {name: t.name || t.id}),
                                       onclick: function () { revoke(t); }}, WT.t("tokens.revoke"))));
          })))));
      }

      function create() {
        var name = WT.field({label: WT.t("tokens.name"), name: "name", required: true,
                             help: WT.t("tokens.name_help"), attrs: {maxlength: 100}});
        WT.dialog({
          title: WT.t("tokens.new"),
          content: name,
          actions: [
            {label: WT.t("common.cancel"), kind: "ghost"},
            {label: WT.t("common.create"), kind: "primary", onClick: function () {
              var n = name.input.value.trim();
              if (!n) { name.input.focus(); throw new Error(WT.t("tokens.name_missing")); }
              return WT.api("POST", "/api/tokens", {body: {name: n}}).then(function (created) {
                load();
                setTimeout(function () { showOnce(created); }, 0);
              });
            }}
          ]
        });
      }

      root.appendChild(h("div", {class: "spread"},
        h("h1", {}, WT.t("tokens.title")),
        h("button", {type: "button", class: "btn primary", onclick: create}, WT.t("tokens.new"))));
      root.appendChild(h("p", {class: "lead-text"}, WT.t("tokens.intro")));
      root.appendChild(list);
      load();
    }
  });
})();
