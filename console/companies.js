/* The agency view (ADMIN_TOKEN): every company with its leads, match rate and connection health
   in the period; create a company (its token shown once); open any company's console. */
(function () {
  "use strict";
  var h = WT.h;

  function slug(name) {
    return name.normalize("NFD").replace(/[\u0300-\u036f]/g, "").toLowerCase()
      .replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 64);
  }

  function health(c) {
    var k = c.connections || {};
    if (!k.total) return h("span", {class: "badge"}, WT.t("companies.no_numbers"));
    var text = WT.t("companies.numbers_open", {open: k.open || 0, total: k.total});
    var kind = k.open === k.total ? "ok" : k.open ? "warn" : "bad";
    return h("span", {class: "badge " + kind}, text);
  }

  function showToken(created) {
    WT.dialog({
      title: WT.t("companies.created_title", {name: created.name}),
      content: [
        h("p", {class: "notice warn", role: "note"}, WT.t("companies.token_once")),
        h("p", {}, h("strong", {}, WT.t("companies.token_label"))),
        h("pre", {class: "code secret", "data-secret": "token"}, created.token),
        h("div", {class: "row"}, WT.copyButton(created.token, WT.t("companies.copy_token"))),
        h("p", {class: "help", style: {"margin-top": ".8rem"}}, WT.t("companies.token_use"))
      ],
      actions: [
        {label: WT.t("companies.open_new"), kind: "primary", onClick: function () {
          return WT.openCompany(created.company_id);
        }},
        {label: WT.t("companies.saved_it"), kind: "ghost"}
      ]
    });
  }

  function createDialog(reload) {
    var name = WT.field({label: WT.t("companies.name"), name: "name", required: true,
                         help: WT.t("companies.name_help")});
    var id = WT.field({label: WT.t("companies.id"), name: "company_id", required: true,
                       help: WT.t("companies.id_help"),
                       attrs: {pattern: "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", spellcheck: "false",
                               autocapitalize: "off"}});
    var touched = false;
    name.input.addEventListener("input", function () {
      if (!touched) id.input.value = slug(name.input.value);
    });
    id.input.addEventListener("input", function () { touched = true; });
    WT.dialog({
      title: WT.t("companies.new"),
      content: [name, id],
      actions: [
        {label: WT.t("common.cancel"), kind: "ghost"},
        {label: WT.t("common.create"), kind: "primary", onClick: function () {
          var n = name.input.value.trim(), cid = id.input.value.trim();
          if (!n) { name.input.focus(); throw new Error(WT.t("companies.name_missing")); }
          if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(cid)) {
            id.input.focus();
            throw new Error(WT.t("companies.id_invalid"));
          }
          return WT.api("POST", "/api/companies", {body: {company_id: cid, name: n}})
            .then(function (created) {
              reload();
              setTimeout(function () { showToken(created); }, 0);
            }, function (e) {
              if (e.status === 409) throw new Error(WT.t("companies.exists", {id: cid}));
              throw e;
            });
        }}
      ]
    });
  }

  WT.view("companies", {
    nav: "nav.companies", title: "companies.title", admin: true, company: false,
    render: function (root, params) {
      var list = h("div", {class: "card", "aria-live": "polite"}, h("p", {class: "muted"},
                                                                   WT.t("common.loading")));
      var range = WT.rangePicker(params, function (r) { WT.setParams(r); load(); });
      function load() {
        var r = range.value;
        return WT.api("GET", "/api/companies", {query: {from: r.from, to: r.to}}).then(function (d) {
          draw(d.companies || []);
        }, function (e) {
          list.replaceChildren(h("p", {class: "error", role: "alert"}, e.message));
        });
      }
      function draw(companies) {
        if (!companies.length) {
          list.replaceChildren(WT.empty("companies.empty",
            h("button", {type: "button", class: "btn primary",
                         onclick: function () { createDialog(load); }}, WT.t("companies.new"))));
          return;
        }
        var rows = companies.map(function (c) {
          return h("tr", {dataset: {company: c.company_id}},
            h("td", {"data-label": WT.t("companies.col_company")},
              h("strong", {}, c.name), h("br"), h("small", {class: "muted"}, c.company_id)),
            h("td", {class: "num", "data-label": WT.t("companies.col_leads")}, WT.fmt.number(c.leads)),
            h("td", {class: "num", "data-label": WT.t("companies.col_match")},
              c.match_rate == null ? WT.t("companies.no_clicks") : WT.fmt.percent(c.match_rate)),
            h("td", {"data-label": WT.t("companies.col_numbers")}, health(c)),
            h("td", {"data-label": WT.t("companies.col_last_lead")},
              c.last_lead_at ? WT.fmt.relative(c.last_lead_at) : WT.t("common.never")),
            h("td", {}, h("button", {type: "button", class: "btn small primary",
                                     "aria-label": WT.t("companies.open_named", {name: c.name}),
                                     onclick: function () {
                                       WT.openCompany(c.company_id).catch(function (e) {
                                         WT.toast(e.message, "error");
                                       });
                                     }}, WT.t("companies.open"))));
        });
        list.replaceChildren(h("div", {class: "table-wrap"}, h("table", {class: "stack"},
          h("thead", {}, h("tr", {},
            h("th", {}, WT.t("companies.col_company")),
            h("th", {class: "num"}, WT.t("companies.col_leads")),
            h("th", {class: "num"}, WT.t("companies.col_match")),
            h("th", {}, WT.t("companies.col_numbers")),
            h("th", {}, WT.t("companies.col_last_lead")),
            h("th", {}, h("span", {class: "sr-only"}, WT.t("companies.open"))))),
          h("tbody", {}, rows))),
          h("p", {class: "help", style: {"margin-top": ".6rem"}}, WT.t("companies.match_help")));
      }
      root.appendChild(h("div", {class: "spread"},
        h("h1", {}, WT.t("companies.title")),
        h("button", {type: "button", class: "btn primary", onclick: function () { createDialog(load); }},
          WT.t("companies.new"))));
      root.appendChild(range);
      root.appendChild(list);
      load();
      WT.poll(load, 30000);
    }
  });
})();
