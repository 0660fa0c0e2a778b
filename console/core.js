/* WhatsTracking console core: language, session, API, routing and the small UI kit every view
   uses (the contract is in the README's "Console" section). Plain JS, no build step, no CDN.

   A view is a script /console/<name>.js that calls WT.view(name, {...}); dashboard.html loads
   them after this file. Views reach the server only through WT.api and build DOM only through
   WT.h (text is set with textContent, never parsed as HTML).

   WT.h("svg:rect", {...}) makes an element in the SVG namespace ("svg" itself is always SVG). */
(function () {
  "use strict";

  var TOKEN_KEY = "wt.token", LANG_KEY = "wt.lang", COMPANY_KEY = "wt.companyId";
  var DEFAULT_LANG = "pt-BR";
  var NAV_ORDER = ["companies", "onboarding", "overview", "leads", "connections", "settings",
                   "tokens"];
  // Views that need no company (the rest need one: an admin picks it first).
  var NO_COMPANY = {signin: true, companies: true};
  var SVG_NS = "http://www.w3.org/2000/svg";

  var WT = window.WT = {lang: "pt-BR", session: null};
  var dict = {}, fallback = {}, languages = [];
  var views = {}, current = null, polls = [], currentParams = {}, routing = 0;

  // ---- language ------------------------------------------------------------------------------

  /* The language to show, among the dictionaries the server ships (GET /locales): the one
     remembered in localStorage if still shipped, else the browser's languages in its order of
     preference, each matched exactly ("es-AR" → "es-AR"), then by its primary subtag ("es-AR" →
     "es", "pt-PT" → "pt-BR"); else Portuguese (Brazil). */
  function pickLang(available) {
    var codes = available.map(function (l) { return l.code; });
    function find(code) {
      code = String(code || "").toLowerCase();
      if (!code) return null;
      for (var i = 0; i < codes.length; i++) if (codes[i].toLowerCase() === code) return codes[i];
      var primary = code.split("-")[0];
      for (var j = 0; j < codes.length; j++) {
        if (codes[j].toLowerCase().split("-")[0] === primary) return codes[j];
      }
      return null;
    }
    var saved = null;
    try { saved = localStorage.getItem(LANG_KEY); } catch (e) { /* private mode */ }
    if (saved && codes.indexOf(saved) >= 0) return saved;
    var wanted = navigator.languages && navigator.languages.length ? navigator.languages
      : [navigator.language || ""];
    for (var k = 0; k < wanted.length; k++) {
      var got = find(wanted[k]);
      if (got) return got;
    }
    return codes.indexOf(DEFAULT_LANG) >= 0 || !codes.length ? DEFAULT_LANG : codes[0];
  }

  function loadDict(code) {
    return fetch("/locales/" + encodeURIComponent(code) + ".json", {cache: "no-cache"})
      .then(function (r) { return r.ok ? r.json() : {}; })
      .catch(function () { return {}; });
  }

  WT.t = function (key, vars) {
    var text = Object.prototype.hasOwnProperty.call(dict, key) ? dict[key]
      : Object.prototype.hasOwnProperty.call(fallback, key) ? fallback[key] : key;
    if (vars) {
      text = String(text).replace(/\{(\w+)\}/g, function (all, name) {
        return Object.prototype.hasOwnProperty.call(vars, name) && vars[name] != null
          ? String(vars[name]) : all;
      });
    }
    return text;
  };
  WT.has = function (key) {
    return Object.prototype.hasOwnProperty.call(dict, key) ||
           Object.prototype.hasOwnProperty.call(fallback, key);
  };

  function useLang(code) {
    return Promise.all([loadDict(code), code === "en" ? Promise.resolve(null) : loadDict("en")])
      .then(function (got) {
        dict = got[0]; fallback = got[1] || got[0];
        WT.lang = code;
        document.documentElement.lang = code;
      });
  }

  WT.setLang = function (code) {
    try { localStorage.setItem(LANG_KEY, code); } catch (e) { /* private mode */ }
    return useLang(code).then(function () { renderShell(); route(); });
  };

  // ---- formatting (Intl in WT.lang, the company's time zone when known) ----------------------

  function zone() {
    var c = WT.session && WT.session.company;
    return (c && c.timezone) || undefined;
  }
  function toDate(iso) {
    if (iso == null || iso === "") return null;
    var d = typeof iso === "number" ? new Date(iso < 1e12 ? iso * 1000 : iso) : new Date(iso);
    return isNaN(d.getTime()) ? null : d;
  }
  function intl(make) {
    try { return make(zone()); } catch (e) { return make(undefined); }  // an unknown zone name
  }
  var DASH = "–";
  WT.fmt = {
    number: function (n, digits) {
      if (n == null || n === "" || isNaN(Number(n))) return DASH;
      return new Intl.NumberFormat(WT.lang, {maximumFractionDigits: digits == null ? 2 : digits})
        .format(Number(n));
    },
    money: function (value, currency) {
      if (value == null || value === "" || isNaN(Number(value))) return DASH;
      currency = currency || (WT.session && WT.session.company && WT.session.company.currency)
        || "BRL";
      try {
        return new Intl.NumberFormat(WT.lang, {style: "currency", currency: currency})
          .format(Number(value));
      } catch (e) {
        return WT.fmt.number(value, 2) + " " + currency;
      }
    },
    percent: function (ratio, digits) {
      if (ratio == null || ratio === "" || isNaN(Number(ratio))) return DASH;
      return new Intl.NumberFormat(WT.lang, {style: "percent",
        maximumFractionDigits: digits == null ? 1 : digits}).format(Number(ratio));
    },
    date: function (iso) {
      var d = toDate(iso);
      if (!d) return DASH;
      if (typeof iso === "string" && /^\d{4}-\d{2}-\d{2}$/.test(iso)) {  // a calendar day
        return new Intl.DateTimeFormat(WT.lang, {dateStyle: "medium", timeZone: "UTC"}).format(d);
      }
      return intl(function (tz) {
        return new Intl.DateTimeFormat(WT.lang, {dateStyle: "medium", timeZone: tz}).format(d);
      });
    },
    datetime: function (iso) {
      var d = toDate(iso);
      if (!d) return DASH;
      return intl(function (tz) {
        return new Intl.DateTimeFormat(WT.lang, {dateStyle: "short", timeStyle: "short",
                                                 timeZone: tz}).format(d);
      });
    },
    relative: function (iso) {
      var d = toDate(iso);
      if (!d) return DASH;
      var s = (d.getTime() - Date.now()) / 1000, abs = Math.abs(s);
      var rtf = new Intl.RelativeTimeFormat(WT.lang, {numeric: "auto"});
      if (abs < 45) return rtf.format(0, "second");
      if (abs < 45 * 60) return rtf.format(Math.round(s / 60), "minute");
      if (abs < 22 * 3600) return rtf.format(Math.round(s / 3600), "hour");
      if (abs < 26 * 86400) return rtf.format(Math.round(s / 86400), "day");
      if (abs < 320 * 86400) return rtf.format(Math.round(s / 2592000), "month");
      return rtf.format(Math.round(s / 31536000), "year");
    },
    phone: formatPhone
  };

  // Country calling codes of two digits (the rest of 2-9 are three digits; 1 and 7 are one).
  var CC2 = ("20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 60 61 " +
             "62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98").split(" ");

  function group(digits) {
    var n = digits.length;
    if (n <= 4) return digits;
    if (n === 8) return digits.slice(0, 4) + " " + digits.slice(4);
    if (n === 9) return digits.slice(0, 3) + " " + digits.slice(3, 6) + " " + digits.slice(6);
    if (n === 10) return digits.slice(0, 3) + " " + digits.slice(3, 6) + " " + digits.slice(6);
    var out = [];
    while (digits.length > 4) { out.push(digits.slice(0, 3)); digits = digits.slice(3); }
    out.push(digits);
    return out.join(" ");
  }

  /* "5511988887777" (or a WhatsApp jid) → "+55 11 98888-7777"; other countries grouped after
     their calling code; anything that is not a phone number comes back as given. */
  function formatPhone(value) {
    if (value == null || value === "") return DASH;
    var raw = String(value).split("@")[0].split(":")[0];
    var digits = raw.replace(/\D/g, "");
    if (digits.length < 8 || digits.length > 15 || /[a-z]/i.test(raw)) return String(value);
    if (digits.slice(0, 2) === "55" && (digits.length === 12 || digits.length === 13)) {
      var ddd = digits.slice(2, 4), local = digits.slice(4);
      return "+55 " + ddd + " " + local.slice(0, local.length - 4) + "-" + local.slice(-4);
    }
    if (digits[0] === "1" && digits.length === 11) {
      return "+1 " + digits.slice(1, 4) + " " + digits.slice(4, 7) + "-" + digits.slice(7);
    }
    var cc = digits[0] === "1" || digits[0] === "7" ? 1 : CC2.indexOf(digits.slice(0, 2)) >= 0 ? 2 : 3;
    return "+" + digits.slice(0, cc) + " " + group(digits.slice(cc));
  }

  // ---- API -----------------------------------------------------------------------------------

  function ApiError(status, message, body) {
    this.name = "ApiError";
    this.status = status; this.message = message; this.body = body;
  }
  ApiError.prototype = Object.create(Error.prototype);
  ApiError.prototype.constructor = ApiError;
  WT.ApiError = ApiError;

  /* The user's words for an API error: a known message (error.api.<message>), else a known
     status (error.status.<n>), else the API's own message. */
  function errorText(status, apiMessage) {
    if (apiMessage && WT.has("error.api." + apiMessage)) return WT.t("error.api." + apiMessage);
    var generic = !apiMessage || status === 401 || status === 403 || status === 429 ||
                  status >= 500 || apiMessage === "Not found";
    if (generic && WT.has("error.status." + status)) return WT.t("error.status." + status);
    if (apiMessage) return apiMessage;
    return WT.t("error.status.other", {status: status});
  }
  WT.errorText = function (e) {
    if (e instanceof ApiError) return e.message;
    return WT.t("error.unexpected");
  };

  function withCompany(method, path, query, body) {
    var s = WT.session;
    if (!s || !s.admin || !s.companyId || path === "/api/companies") return;
    if (method === "GET" || method === "DELETE" || method === "HEAD") {
      if (!("company_id" in query)) query.company_id = s.companyId;
    } else if (body && typeof body === "object" && !Array.isArray(body) && !("company_id" in body)) {
      body.company_id = s.companyId;
    }
  }

  function buildUrl(path, query) {
    var parts = [];
    Object.keys(query || {}).forEach(function (k) {
      var v = query[k];
      if (v == null || v === "") return;
      parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(v));
    });
    return path + (parts.length ? (path.indexOf("?") >= 0 ? "&" : "?") + parts.join("&") : "");
  }

  function request(method, path, opts, token) {
    opts = opts || {};
    method = (method || "GET").toUpperCase();
    var query = Object.assign({}, opts.query || {});
    var body = opts.body == null ? undefined : Object.assign({}, opts.body);
    if (opts.company !== false) withCompany(method, path, query, body);
    var headers = {Accept: "application/json"};
    token = token || (WT.session && WT.session.token);
    if (token) headers.Authorization = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(buildUrl(path, query), {method: method, headers: headers, cache: "no-store",
                                         body: body === undefined ? undefined : JSON.stringify(body)})
      .catch(function () {
        throw new ApiError(0, WT.t("error.network"), null);
      });
  }

  WT.api = function (method, path, opts) {
    return request(method, path, opts, opts && opts.token).then(function (r) {
      return r.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
        if (!r.ok) {
          var msg = data && typeof data === "object" && typeof data.error === "string"
            ? data.error : null;
          var err = new ApiError(r.status, errorText(r.status, msg), data);
          if (r.status === 401 && WT.session && !(opts && opts.token)) expired();
          throw err;
        }
        return data;
      });
    });
  };

  WT.download = function (path, query, filename) {
    return request("GET", path, {query: query}).then(function (r) {
      if (!r.ok) {
        return r.json().catch(function () { return {}; }).then(function (data) {
          throw new ApiError(r.status, errorText(r.status, data && data.error), data);
        });
      }
      return r.blob().then(function (blob) {
        var url = URL.createObjectURL(blob);
        var a = WT.h("a", {href: url, download: filename || "export.csv", hidden: true});
        document.body.appendChild(a);
        a.click();
        setTimeout(function () { URL.revokeObjectURL(url); a.remove(); }, 1000);
        return filename;
      });
    });
  };

  // ---- DOM -----------------------------------------------------------------------------------

  function append(el, child) {
    if (child == null || child === false || child === true) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(el, c); }); return; }
    el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }

  /* WT.h("button", {class: "btn", onclick: fn, disabled: true, dataset: {id: 1}}, "Text", node) */
  WT.h = function (tag, attrs) {
    var svg = tag.slice(0, 4) === "svg:" || tag === "svg";
    var el = svg ? document.createElementNS(SVG_NS, tag.replace(/^svg:/, ""))
      : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (v == null || v === false) return;
      if (k.slice(0, 2) === "on" && typeof v === "function") {
        el.addEventListener(k.slice(2).toLowerCase(), v);
      } else if (k === "dataset") {
        Object.keys(v).forEach(function (d) { el.dataset[d] = v[d]; });
      } else if (k === "style" && typeof v === "object") {
        Object.keys(v).forEach(function (s) { el.style.setProperty(s, v[s]); });
      } else if (k === "text") {
        el.textContent = v;
      } else if (k === "value" && !svg) {
        el.value = v;
      } else if (k === "checked" || k === "selected") {
        el[k] = !!v;
      } else {
        el.setAttribute(k === "className" ? "class" : k, v === true ? "" : String(v));
      }
    });
    for (var i = 2; i < arguments.length; i++) append(el, arguments[i]);
    return el;
  };
  var h = WT.h;

  var ids = 0;
  function uid(prefix) { ids += 1; return (prefix || "wt") + "-" + ids; }

  // ---- routing -------------------------------------------------------------------------------

  /* WT.view(name, {nav: "nav.leads" | null, title: "leads.title", render(root, params) → cleanup?,
     admin: true (only for ADMIN_TOKEN), company: false (needs no company)}) */
  WT.view = function (name, spec) {
    views[name] = Object.assign({name: name}, spec);
    if (WT.session) renderNav();
  };

  function parseHash() {
    var hash = location.hash.replace(/^#\/?/, "");
    var q = hash.indexOf("?"), name = q >= 0 ? hash.slice(0, q) : hash;
    var params = {};
    new URLSearchParams(q >= 0 ? hash.slice(q + 1) : "").forEach(function (v, k) { params[k] = v; });
    return {name: decodeURIComponent(name), params: params};
  }

  function hashFor(name, params) {
    var qs = new URLSearchParams();
    Object.keys(params || {}).forEach(function (k) {
      if (params[k] != null && params[k] !== "") qs.set(k, params[k]);
    });
    var s = qs.toString();
    return "#/" + name + (s ? "?" + s : "");
  }

  WT.go = function (name, params) {
    var target = hashFor(name, params);
    if (location.hash === target) route(); else location.hash = target;
  };
  /* Replace the params of the current view in the address without rendering again (filters). */
  WT.setParams = function (params) {
    currentParams = Object.assign({}, params);
    history.replaceState(null, "", hashFor(current ? current.name : "", params));
  };
  WT.params = function () { return Object.assign({}, currentParams); };
  WT.href = function (name, params) { return hashFor(name, params); };

  WT.poll = function (fn, ms) {
    var busy = false, stopped = false;
    var id = setInterval(function () {
      if (busy || stopped || document.hidden) return;
      busy = true;
      Promise.resolve().then(fn).catch(function () { /* the next tick tries again */ })
        .then(function () { busy = false; });
    }, ms);
    var stop = function () { stopped = true; clearInterval(id); };
    polls.push(stop);
    return stop;
  };

  function stopView() {
    polls.splice(0).forEach(function (stop) { stop(); });
    if (current && typeof current.cleanup === "function") {
      try { current.cleanup(); } catch (e) { /* a view's own business */ }
    }
    current = null;
  }

  function homeView() {
    var s = WT.session;
    if (!s) return "signin";
    if (s.admin && !s.companyId) return "companies";
    return "home";
  }

  function route() {
    var turn = ++routing;
    var where = parseHash(), name = where.name || homeView();
    if (!WT.session) name = "signin";
    else if (name === "signin") name = homeView();
    if (name === "home") {
      // The onboarding until the company's first lead, then the overview.
      return WT.api("GET", "/api/onboarding").then(function (o) {
        return o && o.leads > 0 && views.overview ? "overview" : "onboarding";
      }, function () { return views.overview ? "overview" : "onboarding"; }).then(function (to) {
        if (turn === routing) show(to, where.params);
      });
    }
    var spec = views[name];
    if (spec && WT.session && spec.admin && !WT.session.admin) spec = null;
    if (spec && WT.session && WT.session.admin && !WT.session.companyId &&
        !NO_COMPANY[name] && spec.company !== false) {
      name = "companies"; spec = views.companies;
    }
    show(spec ? name : null, where.params);
  }

  function show(name, params) {
    stopView();
    var main = document.getElementById("wt-main");
    var root = h("div", {class: "view view-" + (name || "missing")});
    main.replaceChildren(root);
    currentParams = params || {};
    var spec = views[name];
    current = {name: name, cleanup: null};
    document.body.dataset.view = name || "missing";
    markNav(name);
    closeMenu();
    window.scrollTo(0, 0);
    if (!spec) {
      root.appendChild(h("h1", {}, WT.t("common.not_found")));
      root.appendChild(h("p", {}, h("a", {href: "#/"}, WT.t("common.go_home"))));
      return;
    }
    document.title = (spec.title ? WT.t(spec.title) + " · " : "") + WT.t("app.title");
    try {
      current.cleanup = spec.render(root, Object.assign({}, currentParams)) || null;
    } catch (e) {
      root.appendChild(h("p", {class: "error", role: "alert"}, WT.t("error.unexpected")));
      if (window.console) console.error(e);
    }
    var heading = root.querySelector("h1");
    if (heading && document.activeElement === document.body) {
      heading.setAttribute("tabindex", "-1");
    }
  }

  // ---- session -------------------------------------------------------------------------------

  function storage(key, value) {
    try {
      if (value === undefined) return localStorage.getItem(key);
      if (value === null) localStorage.removeItem(key); else localStorage.setItem(key, value);
    } catch (e) { /* private mode: the session lasts the tab */ }
    return null;
  }

  /* Who a token is: GET /api/companies answers only the admin; else GET /api/company.
     Resolves {token, admin, companyId, company}; rejects with the ApiError of /api/company. */
  WT.identify = function (token) {
    return WT.api("GET", "/api/companies", {token: token, company: false}).then(function () {
      return {token: token, admin: true, companyId: null, company: null};
    }, function (e) {
      if (e.status === 0) throw e;
      return WT.api("GET", "/api/company", {token: token, company: false}).then(function (c) {
        return {token: token, admin: false, companyId: c.company_id, company: c};
      }, function (e2) {
        // 400 "company_id is required with the admin token": a server without GET /api/companies
        if (e2.status === 400) return {token: token, admin: true, companyId: null, company: null};
        throw e2;
      });
    });
  };

  WT.signIn = function (session) {
    WT.session = session;
    storage(TOKEN_KEY, session.token);
    var start = session.admin && storage(COMPANY_KEY) ? WT.openCompany(storage(COMPANY_KEY), true)
      .catch(function () { return WT.closeCompany(true); }) : Promise.resolve();
    return start.then(function () { renderShell(); });
  };

  WT.signOut = function () {
    stopView();
    storage(TOKEN_KEY, null);
    storage(COMPANY_KEY, null);
    WT.session = null;
    renderShell();
    if (location.hash && location.hash !== "#/") location.hash = "#/"; else route();
  };

  /* The admin acts for one company (company_id on every call) until closeCompany(). */
  WT.openCompany = function (companyId, quiet) {
    var s = WT.session;
    return WT.api("GET", "/api/company", {query: {company_id: companyId}, company: false})
      .then(function (c) {
        s.companyId = c.company_id; s.company = c;
        storage(COMPANY_KEY, c.company_id);
        if (!quiet) { renderShell(); WT.go("home"); }
        return c;
      });
  };
  WT.closeCompany = function (quiet) {
    var s = WT.session;
    s.companyId = null; s.company = null;
    storage(COMPANY_KEY, null);
    if (!quiet) { renderShell(); WT.go("companies"); }
  };
  /* Read the company again (after settings change its name, time zone or currency). */
  WT.refreshCompany = function () {
    return WT.api("GET", "/api/company").then(function (c) {
      WT.session.company = c; renderShell(); return c;
    });
  };

  var expiredShown = false;
  function expired() {
    if (expiredShown) return;
    expiredShown = true;
    WT.signOut();
    WT.toast(WT.t("signin.expired"), "error");
    setTimeout(function () { expiredShown = false; }, 1000);
  }

  // ---- the shell (header, nav) ---------------------------------------------------------------

  function languageList() {
    return languages.length ? languages : [{code: "pt-BR", name: "Português (Brasil)"},
                                           {code: "en", name: "English"}];
  }

  function renderShell() {
    var s = WT.session;
    var skip = document.getElementById("wt-skip");
    if (skip) skip.textContent = WT.t("app.skip");
    document.body.classList.toggle("signed-in", !!s);
    var brand = document.getElementById("wt-brand");
    brand.replaceChildren(h("a", {href: "#/", class: "brand"},
      h("span", {class: "logo", "aria-hidden": "true"}, "◉"),
      h("span", {class: "brand-text"}, WT.t("app.title"))));

    var where = document.getElementById("wt-where");
    where.replaceChildren();
    if (s && s.company) where.appendChild(h("span", {class: "company-name"}, s.company.name));
    else if (s && s.admin) where.appendChild(h("span", {class: "company-name"},
                                               WT.t("app.agency")));

    var langBox = document.getElementById("wt-lang");
    var langId = uid("lang");
    var select = h("select", {id: langId, onchange: function () { WT.setLang(select.value); }},
      languageList().map(function (l) {
        return h("option", {value: l.code, selected: l.code === WT.lang}, l.name);
      }));
    langBox.replaceChildren(h("label", {for: langId, class: "sr-only"}, WT.t("app.language")),
                            select);

    var out = document.getElementById("wt-signout");
    out.replaceChildren();
    if (s) out.appendChild(h("button", {type: "button", class: "btn ghost small",
                                        onclick: WT.signOut}, WT.t("app.sign_out")));

    var menu = document.getElementById("wt-menu");
    menu.hidden = !s;
    menu.textContent = WT.t("app.menu");

    var banner = document.getElementById("wt-banner");
    banner.replaceChildren();
    banner.hidden = !(s && s.admin && s.company);
    if (s && s.admin && s.company) {
      banner.appendChild(h("span", {}, WT.t("app.viewing_company", {name: s.company.name})));
      banner.appendChild(h("button", {type: "button", class: "link",
                                      onclick: function () { WT.closeCompany(); }},
                           WT.t("app.back_to_companies")));
    }
    renderNav();
  }

  function renderNav() {
    var nav = document.getElementById("wt-nav"), s = WT.session;
    if (!nav) return;
    var list = h("ul");
    if (s) {
      var names = Object.keys(views).filter(function (n) {
        var v = views[n];
        if (!v.nav) return false;
        if (v.admin && !s.admin) return false;
        if (s.admin && !s.companyId) return n === "companies" || v.company === false;
        return true;
      });
      names.sort(function (a, b) {
        var x = NAV_ORDER.indexOf(a), y = NAV_ORDER.indexOf(b);
        return (x < 0 ? 99 : x) - (y < 0 ? 99 : y);
      });
      names.forEach(function (n) {
        list.appendChild(h("li", {}, h("a", {href: "#/" + n, dataset: {view: n}},
                                       WT.t(views[n].nav))));
      });
    }
    if (s) {  // on phones the header is narrow: the language and sign-out live in the menu too
      var id = uid("nav-lang");
      var sel = h("select", {id: id, onchange: function () { WT.setLang(sel.value); }},
        languageList().map(function (l) {
          return h("option", {value: l.code, selected: l.code === WT.lang}, l.name);
        }));
      list.appendChild(h("li", {class: "nav-extra"},
        h("label", {for: id}, WT.t("app.language")), sel,
        h("button", {type: "button", class: "btn ghost", onclick: WT.signOut}, WT.t("app.sign_out"))));
    }
    nav.replaceChildren(list);
    nav.setAttribute("aria-label", WT.t("app.menu"));
    markNav(current && current.name);
  }

  function markNav(name) {
    var links = document.querySelectorAll("#wt-nav a");
    var active = name === "lead" ? "leads" : name;
    Array.prototype.forEach.call(links, function (a) {
      if (a.dataset.view === active) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    });
  }

  function closeMenu() {
    var menu = document.getElementById("wt-menu");
    document.body.classList.remove("menu-open");
    if (menu) menu.setAttribute("aria-expanded", "false");
  }

  // ---- dialogs, toasts, copy -----------------------------------------------------------------

  function contentNodes(content) {
    if (content == null) return [];
    if (typeof content === "string") return [h("p", {}, content)];
    return Array.isArray(content) ? content : [content];
  }

  /* WT.dialog({title, content, actions: [{label, kind: "primary"|"danger"|"ghost", onClick}],
     onClose}) → {close(), element, body}. An action closes the dialog after onClick unless onClick
     returns (or resolves to) false; a rejected promise is shown in the dialog and keeps it open. */
  WT.dialog = function (opts) {
    opts = opts || {};
    var titleId = uid("dlg"), closed = false, error = h("p", {class: "error", role: "alert"});
    var body = h("div", {class: "dialog-body"}, contentNodes(opts.content), error);
    var actions = h("div", {class: "dialog-actions"});
    var dlg = h("dialog", {class: "wt-dialog", "aria-labelledby": titleId},
      h("div", {class: "dialog-head"},
        h("h2", {id: titleId}, opts.title || ""),
        h("button", {type: "button", class: "icon-btn", "aria-label": WT.t("common.close"),
                     onclick: function () { close(); }}, "✕")),
      body, actions);
    var handle = {element: dlg, body: body, close: close,
                  error: function (text) { error.textContent = text || ""; }};
    (opts.actions || [{label: WT.t("common.close")}]).forEach(function (a) {
      var btn = h("button", {type: "button", class: "btn " + (a.kind || "ghost")}, a.label);
      btn.addEventListener("click", function () {
        error.textContent = "";
        if (!a.onClick) { close(); return; }
        btn.disabled = true;
        Promise.resolve().then(function () { return a.onClick(handle); }).then(function (keep) {
          btn.disabled = false;
          if (keep !== false) close();
        }, function (e) {
          btn.disabled = false;
          error.textContent = e && e.message ? e.message : WT.t("error.unexpected");
        });
      });
      actions.appendChild(btn);
    });
    dlg.addEventListener("cancel", function (ev) { ev.preventDefault(); close(); });
    dlg.addEventListener("keydown", function (ev) {
      if (ev.key === "Tab") { trapTab(dlg, ev); return; }
      // Enter in a one-line field does what the dialog's main button does (a <form> in the
      // dialog submits itself).
      var t = ev.target;
      if (ev.key === "Enter" && !ev.isComposing && t.tagName === "INPUT" && !t.form &&
          !/^(checkbox|radio|button|submit|reset|file|color)$/i.test(t.type) && body.contains(t)) {
        var main = actions.querySelector(".btn.primary:not([disabled])");
        if (main) { ev.preventDefault(); main.click(); }
      }
    });
    dlg.addEventListener("close", function () { close(); });
    document.body.appendChild(dlg);
    var before = document.activeElement;
    dlg.showModal();
    var first = body.querySelector("input, select, textarea") ||
                actions.querySelector(".btn.primary, .btn.danger") || actions.querySelector("button");
    if (first) first.focus();
    function close() {
      if (closed) return;
      closed = true;
      if (dlg.open) dlg.close();
      dlg.remove();
      if (opts.onClose) { try { opts.onClose(); } catch (e) { /* ignore */ } }
      if (before && before.focus && document.contains(before)) before.focus();
    }
    return handle;
  };

  var FOCUSABLE = "a[href], button:not([disabled]), input:not([disabled]):not([type=hidden]), " +
                  "select:not([disabled]), textarea:not([disabled]), summary, " +
                  "[tabindex]:not([tabindex='-1'])";
  /* Tab and Shift+Tab go round the dialog's own controls, never behind it. */
  function trapTab(box, ev) {
    var items = Array.prototype.filter.call(box.querySelectorAll(FOCUSABLE), function (el) {
      return el.getClientRects().length > 0;
    });
    if (!items.length) { ev.preventDefault(); return; }
    var first = items[0], last = items[items.length - 1], at = document.activeElement;
    if (ev.shiftKey && (at === first || !box.contains(at))) { ev.preventDefault(); last.focus(); }
    else if (!ev.shiftKey && (at === last || !box.contains(at))) { ev.preventDefault(); first.focus(); }
  }

  WT.confirm = function (opts) {
    opts = opts || {};
    return new Promise(function (resolve) {
      var answer = false;
      WT.dialog({
        title: opts.title || WT.t("common.confirm_title"),
        content: opts.body,
        onClose: function () { resolve(answer); },
        actions: [
          {label: opts.cancel || WT.t("common.cancel"), kind: "ghost"},
          {label: opts.confirm || WT.t("common.confirm"), kind: opts.danger ? "danger" : "primary",
           onClick: function () { answer = true; }}
        ]
      });
    });
  };

  WT.toast = function (text, kind) {
    var box = document.getElementById("wt-toasts");
    var item = h("div", {class: "toast " + (kind || "ok"), role: kind === "error" ? "alert" : "status"},
                 text);
    box.appendChild(item);
    setTimeout(function () { item.classList.add("leaving"); }, 4000);
    setTimeout(function () { item.remove(); }, 4500);
  };

  function copyText(text) {
    WT.lastCopied = text;  // what the last copy button copied (tests read it too)
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return legacyCopy(text); });
    }
    return Promise.resolve(legacyCopy(text));
  }
  function legacyCopy(text) {
    var area = h("textarea", {readonly: true, class: "offscreen"});
    area.value = text;
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    if (!ok) throw new Error("copy");
  }

  /* A button that copies `text` (or what the function `text` returns) and says so. */
  WT.copyButton = function (text, label) {
    label = label || WT.t("common.copy");
    var btn = h("button", {type: "button", class: "btn ghost copy"}, label);
    var timer = null;
    btn.addEventListener("click", function () {
      var value = typeof text === "function" ? text() : text;
      copyText(String(value)).then(function () {
        btn.textContent = WT.t("common.copied");
        btn.classList.add("done");
      }, function () {
        btn.textContent = WT.t("common.copy_failed");
      }).then(function () {
        clearTimeout(timer);
        timer = setTimeout(function () { btn.textContent = label; btn.classList.remove("done"); },
                           2500);
      });
    });
    return btn;
  };

  // ---- forms, ranges, empty states -----------------------------------------------------------

  /* WT.field({label, name, type: "text"|"number"|"select"|"textarea"|"checkbox"|…, value, help,
     options: [{value, label}] | [value], required, placeholder, attrs}) → wrapper with .input */
  WT.field = function (o) {
    var id = uid("f-" + (o.name || "field")), helpId = id + "-help", input;
    var common = Object.assign({id: id, name: o.name, required: o.required,
                                placeholder: o.placeholder,
                                "aria-describedby": o.help ? helpId : null}, o.attrs || {});
    if (o.type === "select") {
      input = h("select", common, (o.options || []).map(function (opt) {
        var v = typeof opt === "object" ? opt.value : opt;
        var l = typeof opt === "object" ? opt.label : opt;
        return h("option", {value: v, selected: String(v) === String(o.value)}, l);
      }));
    } else if (o.type === "textarea") {
      input = h("textarea", Object.assign({rows: o.rows || 4}, common));
      input.value = o.value == null ? "" : o.value;
    } else if (o.type === "checkbox") {
      input = h("input", Object.assign({type: "checkbox", checked: !!o.value}, common));
    } else {
      input = h("input", Object.assign({type: o.type || "text"}, common));
      if (o.value != null) input.value = o.value;
    }
    var wrap = o.type === "checkbox"
      ? h("div", {class: "field check"}, input, h("label", {for: id}, o.label))
      : h("div", {class: "field"}, h("label", {for: id}, o.label), input);
    if (o.help) wrap.appendChild(h("p", {class: "help", id: helpId}, o.help));
    wrap.input = input;
    return wrap;
  };

  function ymd(d) {
    return d.getFullYear() + "-" + String(d.getMonth() + 1).padStart(2, "0") + "-" +
           String(d.getDate()).padStart(2, "0");
  }
  function daysAgo(n) { var d = new Date(); d.setDate(d.getDate() - n); return ymd(d); }
  var PRESETS = {
    today: function () { return {from: daysAgo(0), to: daysAgo(0)}; },
    "7d": function () { return {from: daysAgo(6), to: daysAgo(0)}; },
    "30d": function () { return {from: daysAgo(29), to: daysAgo(0)}; },
    "90d": function () { return {from: daysAgo(89), to: daysAgo(0)}; },
    month: function () { var d = new Date(); d.setDate(1); return {from: ymd(d), to: daysAgo(0)}; }
  };

  /* WT.rangePicker(params, onChange): params.range is a preset (today, 7d, 30d, 90d, month) or
     "custom" with params.from/params.to (YYYY-MM-DD). onChange({from, to, range}). The element's
     .value is the current {from, to, range}. */
  WT.rangePicker = function (params, onChange) {
    params = params || {};
    var preset = params.range || (params.from || params.to ? "custom" : "30d");
    if (preset !== "custom" && !PRESETS[preset]) preset = "30d";
    var value = preset === "custom"
      ? {from: params.from || daysAgo(29), to: params.to || daysAgo(0), range: "custom"}
      : Object.assign(PRESETS[preset](), {range: preset});
    var selId = uid("range");
    var select = h("select", {id: selId},
      ["today", "7d", "30d", "90d", "month", "custom"].map(function (k) {
        return h("option", {value: k, selected: k === preset}, WT.t("range." + k));
      }));
    var from = WT.field({label: WT.t("range.from"), name: "from", type: "date", value: value.from});
    var to = WT.field({label: WT.t("range.to"), name: "to", type: "date", value: value.to});
    var custom = h("div", {class: "range-custom", hidden: preset !== "custom"}, from, to);
    var box = h("div", {class: "range-picker"},
      h("div", {class: "field"}, h("label", {for: selId}, WT.t("range.label")), select), custom);
    function changed() {
      box.value = value;
      if (onChange) onChange(Object.assign({}, value));
    }
    select.addEventListener("change", function () {
      if (select.value === "custom") {
        custom.hidden = false;
        value = {from: from.input.value || value.from, to: to.input.value || value.to,
                 range: "custom"};
        from.input.focus();
      } else {
        custom.hidden = true;
        value = Object.assign(PRESETS[select.value](), {range: select.value});
        from.input.value = value.from; to.input.value = value.to;
      }
      changed();
    });
    [from.input, to.input].forEach(function (input) {
      input.addEventListener("change", function () {
        if (!from.input.value || !to.input.value) return;
        if (from.input.value > to.input.value) {  // keep a range that makes sense
          if (input === from.input) to.input.value = from.input.value;
          else from.input.value = to.input.value;
        }
        value = {from: from.input.value, to: to.input.value, range: "custom"};
        changed();
      });
    });
    box.value = value;
    return box;
  };

  WT.empty = function (textKey) {
    var box = h("div", {class: "empty"}, h("p", {}, WT.t(textKey)));
    for (var i = 1; i < arguments.length; i++) append(box, arguments[i]);
    return box;
  };

  // ---- start ---------------------------------------------------------------------------------

  function boot() {
    var menu = document.getElementById("wt-menu");
    menu.addEventListener("click", function () {
      var open = document.body.classList.toggle("menu-open");
      menu.setAttribute("aria-expanded", open ? "true" : "false");
    });
    document.addEventListener("keydown", function (ev) {
      if (ev.key === "Escape" && document.body.classList.contains("menu-open")) {
        closeMenu(); menu.focus();
      }
    });
    window.addEventListener("hashchange", route);
    // The skip link moves the focus without touching the address (the hash is the route).
    document.getElementById("wt-skip").addEventListener("click", function (ev) {
      ev.preventDefault();
      var heading = document.querySelector("#wt-main h1");
      if (heading) { heading.setAttribute("tabindex", "-1"); heading.focus(); }
      else document.getElementById("wt-main").focus();
    });
    document.getElementById("wt-nav").addEventListener("click", function (ev) {
      if (ev.target.closest("a")) closeMenu();  // also when the link is the current view
    });
    fetch("/locales", {cache: "no-cache"}).then(function (r) { return r.json(); })
      .then(function (d) { languages = (d && d.languages) || []; }, function () { languages = []; })
      .then(function () { return useLang(pickLang(languageList())); })
      .then(function () {
        var token = storage(TOKEN_KEY);
        if (!token) { renderShell(); route(); return; }
        return WT.identify(token).then(WT.signIn).then(route, function (e) {
          if (e.status === 0) {  // the server is away: keep the token, say so, offer a retry
            renderShell();
            show(null, {});
            var root = document.querySelector("#wt-main .view");
            root.replaceChildren(h("div", {class: "card narrow"},
              h("h1", {}, WT.t("error.offline_title")),
              h("p", {role: "alert"}, WT.t("error.network")),
              h("button", {type: "button", class: "btn primary",
                           onclick: function () { location.reload(); }}, WT.t("common.retry"))));
            return;
          }
          storage(TOKEN_KEY, null);
          renderShell(); route();
        });
      }).then(function () { document.body.classList.add("ready"); });
  }

  // core.js is loaded with `defer` like every view: DOMContentLoaded comes after all of them ran.
  document.addEventListener("DOMContentLoaded", boot);
})();
