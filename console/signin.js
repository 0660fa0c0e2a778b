/* Sign-in: a company token or the operator's ADMIN_TOKEN (which one is found by asking the API). */
(function () {
  "use strict";
  var h = WT.h;

  WT.view("signin", {
    nav: null, title: "signin.title", company: false,
    render: function (root) {
      var token = WT.field({label: WT.t("signin.token"), name: "token", type: "password",
                            help: WT.t("signin.token_help"), required: true,
                            attrs: {autocomplete: "current-password", spellcheck: "false",
                                    autocapitalize: "off"}});
      var error = h("p", {class: "error", role: "alert", id: "signin-error"});
      var button = h("button", {type: "submit", class: "btn primary"}, WT.t("signin.submit"));
      var form = h("form", {class: "card narrow", novalidate: true},
        h("h1", {}, WT.t("signin.title")),
        h("p", {class: "muted"}, WT.t("signin.intro")),
        token, error, h("div", {class: "row"}, button),
        h("p", {class: "help", style: {"margin-top": "1rem"}}, WT.t("signin.where")));
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var value = token.input.value.trim();
        error.textContent = "";
        if (!value) { error.textContent = WT.t("signin.empty"); token.input.focus(); return; }
        button.disabled = true;
        WT.identify(value).then(WT.signIn).then(function () {
          WT.go(WT.session.admin ? "companies" : "home");
        }, function (e) {
          button.disabled = false;
          error.textContent = e.status === 0 ? WT.t("error.network")
            : e.status === 401 || e.status === 403 || e.status === 404 ? WT.t("signin.wrong")
            : e.message;
          token.input.focus();
          token.input.select();
        });
      });
      root.appendChild(form);
      token.input.focus();
    }
  });
})();
