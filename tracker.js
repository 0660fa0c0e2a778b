// WhatsTracking embed (SPEC §5): campaign attribution and a tracking code in WhatsApp links.
((w, d) => {
  "use strict";
  if (w.whatstracking && w.whatstracking.v) return; // snippet pasted twice

  const WINDOW = 30 * 864e5; // attribution window, ms
  const ABC = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"; // Crockford base32
  const CAMPAIGN = "utm_source utm_medium utm_campaign utm_term utm_content utm_id gclid gbraid wbraid fbclid ttclid msclkid".split(" ");
  const DEFAULT = "[ref {code}]";
  // -> base, wa.me number, query, hash (Android's intent:// keeps "scheme=whatsapp" in its hash)
  const WA = /^(https?:\/\/(?:wa\.me\/\+?(\d+)|(?:api|web)\.whatsapp\.com\/send)\/?|(?:whatsapp|intent):\/\/send\/?)(?:\?([^#]*))?(#.*)?$/i;
  // Business short links and shorteners: no text can ride on them, but the click counts
  const SHORT = /^https?:\/\/(?:wa\.me\/message|api\.whatsapp\.com\/message|wa\.link)\/\w/i;
  const LINK = "a[*|href]"; // also SVG links, whose href may be xlink:href
  // Never throw into the host page
  const safe = f => function () { try { return f.apply(this, arguments); } catch (e) {} };
  const load = safe(k => JSON.parse(localStorage["whatstracking_" + k]));
  const save = (k, v) => (safe(() => localStorage["whatstracking_" + k] = JSON.stringify(v))(), v);
  const cookie = safe(n => decodeURIComponent(d.cookie.match(`(^|; )${n}=([^;]*)`)[2]));
  // Widgets paste texts unencoded ("10% OFF"): decode what is valid, keep a stray "%" as it is
  const decode = s => (s || "").replace(/\+/g, " ").replace(/(%[\da-f]{2})+/gi, m => {
    try { return decodeURIComponent(m); } catch (e) { return unescape(m); } // Latin-1 %E9
  });

  w.whatstracking = {link: url => url};
  safe(() => {
    // ---- Config, read once; opt-out: localStorage.whatstracking_ignore = "true"
    const s = d.currentScript || d.querySelector("script[src*='whatsapp-tracker']");
    const company = s.dataset.company || w.whatsappcompanieId;
    const api = (s.dataset.api || new URL(s.src).origin).replace(/\/$/, "");
    if (!company || localStorage.whatstracking_ignore == "true") return;

    // ---- Tracking code: 6 random characters + check character
    const newCode = () => {
      const v = crypto.getRandomValues(new Uint8Array(6)).map(x => x & 31);
      return [...v, v.reduce((sum, x, i) => sum + (2 * i + 1) * x, 0) % 32].map(x => ABC[x]).join("");
    };
    let code = load("code"), message = load("message") || {};
    const visitor = load("visitor") || save("visitor", newCode() + newCode() + newCode());
    if (!code) code = save("code", newCode());

    // ---- Attribution: the first touch lasts the window; a new campaign replaces the last touch
    const expired = t => !(t && Date.now() - t.ts < WINDOW);
    const capture = () => {
      const q = new URLSearchParams(location.search), last = load("last") || {};
      const now = {ts: Date.now(), landing_page: location.href};
      for (const k of CAMPAIGN) if (q.get(k)) now[k] = q.get(k);
      if (now.fbclid) now.fbc = `fb.1.${now.ts}.${now.fbclid}`;
      if (d.referrer && d.referrer.split("/")[2] != location.host) now.referrer = d.referrer;
      const tagged = CAMPAIGN.some(k => now[k]), differs = CAMPAIGN.some(k => now[k] != last[k]);
      if (tagged && differs || expired(last)) save("last", now);
      if (expired(load("first"))) save("first", now);
    };

    // ---- Sending
    // GA4's session: its _ga_<container> cookie, GS1.1.<session id>.… or GS2.1.s<session id>$…
    const gaSession = safe(() => d.cookie.match(/(?:^|; )_ga_[^=]+=GS\d\.\d\.s?(\d+)/)[1]);
    const send = safe((event, whatsapp_phone) => {
      const last = load("last") || {}, ga = cookie("_ga");
      const body = Object.assign({}, last, {
        ts: undefined, company_id: company, event, visitor_id: visitor, code,
        page_url: location.href, whatsapp_phone, first_touch: load("first"), fbp: cookie("_fbp"),
        fbc: cookie("_fbc") || last.fbc, ga_client_id: ga && ga.split(".").slice(-2).join("."),
        ga_session_id: gaSession()
      });
      fetch(api + "/tracking", {
        method: "POST", keepalive: true, credentials: "omit",
        headers: {"Content-Type": "text/plain"}, body: JSON.stringify(body)
      }).then(r => r.json()).then(adopt).catch(() => {});
    });

    // Adopt the server's code and message format
    const adopt = r => {
      const before = code + JSON.stringify(message);
      if (r.code) code = save("code", r.code.toUpperCase());
      if (r.message) message = save("message", r.message);
      if (before != code + JSON.stringify(message)) refresh();
    };

    // ---- Message text
    const visible = () => (message.template || DEFAULT).replace("{code}", code);
    const invisible = () => "\u200d" + [...code].map(c =>
      (32 + ABC.indexOf(c)).toString(2).slice(1).replace(/./g, bit => "\u200b\u200c"[bit])).join("") + "\u200d";
    // Drop a code added before, so rewriting is idempotent
    const strip = text => {
      for (const t of [message.template || DEFAULT, DEFAULT]) {
        text = text.replace(RegExp("\\s?" + t.replace(/\W/g, "\\$&").replace("\\{code\\}", "[0-9a-z]{7}"), "gi"), "");
      }
      return text.replace(/\u200d[\u200b\u200c]*\u200d/g, "");
    };
    const compose = text => {
      const mode = message.mode;
      text = strip(text);
      if (mode == "invisible" && text) return text + invisible();
      return (text && mode != "invisible" ? text + " " : "") + visible() + (mode == "visible" ? "" : invisible());
    };

    // ---- Links
    // WhatsApp chat URL -> {url with the code in its text, phone, done: it had the code already}
    const rewrite = url => {
      if (SHORT.test(url)) return {url, done: 1};
      const m = WA.exec(url);
      if (!m || /^i/i.test(url) && !/[#;]scheme=whatsapp;/i.test(m[4])) return;
      let phone = m[2], text = "";
      const query = (m[3] || "").split("&").filter(p => {
        const [key, value] = p.split("=");
        if (key == "phone") phone = phone || decode(value);
        if (key == "text") text = decode(p.slice(5));
        return p && key != "text";
      });
      phone = (phone || "").replace(/\D/g, "");
      const composed = compose(text);
      query.push("text=" + encodeURIComponent(composed));
      if (phone) return {url: m[1] + "?" + query.join("&") + (m[4] || ""), phone, done: composed == text};
    };
    const fix = safe(a => {
      const h = a.href, svg = h.baseVal != null, r = rewrite(svg ? h.baseVal : h);
      if (r && r.url != (svg ? h.baseVal : a.getAttribute("href"))) {
        if (svg) h.baseVal = r.url; else a.setAttribute("href", r.url);
      }
      return r;
    });
    const scan = safe(root => [root, ...root.querySelectorAll(LINK)].forEach(fix));
    const clicked = r => r && send("whatsapp_click", r.phone);

    // Joinchat draws a QR code of its own link on desktop: that link gets the code too
    const joinchat = safe(() => {
      const j = w.joinchat_obj, f = j && j.get_wa_link;
      if (!f) return;
      if (!f.wt) (j.get_wa_link = function () { return link(f.apply(this, arguments)); }).wt = 1;
      // Codes drawn before we came, or before the server's code was adopted
      d.querySelectorAll(".joinchat__qr canvas,.joinchat-button__qr canvas").forEach(c => {
        const q = c.parentNode.dataset;
        c.replaceWith(j.qr(j.get_wa_link(q.phone, q.message, false)));
      });
    });
    const refresh = () => (scan(d), joinchat());

    // ---- Events
    let lastUrl;
    const pageview = safe(() => {
      const url = location.href.split("#")[0];
      if (url == lastUrl) return;
      lastUrl = url;
      capture();
      send("pageview");
    });

    // Rewrite the clicked link once more; never delay or cancel the click. A middle click
    // (auxclick) or the menu's "open in new tab" (contextmenu, a long press on phones) opens it too.
    const click = safe(e => {
      if (e.button != 1 && e.type == "auxclick") return;
      clicked(fix(e.target.closest(LINK)));
    });
    for (const type of ["click", "auxclick", "contextmenu"]) d.addEventListener(type, click, true);

    // Chat widgets use window.open
    const open = w.open;
    w.open = function (url, ...rest) {
      const r = safe(rewrite)(url);
      clicked(r);
      return open.call(this || w, r ? r.url : url, ...rest);
    };

    // GET forms submitting to WhatsApp (Chaty's welcome popup): the text field gets the code for
    // this submission only. On window, bubbling: a widget that cancels the submit opens WhatsApp
    // its own way (window.open), caught above.
    w.addEventListener("submit", safe(e => {
      const f = e.target;
      if (e.defaultPrevented || f.method != "get") return;
      const r = rewrite(f.action.split("?")[0] + "?" + new URLSearchParams(new FormData(f)));
      if (!r || r.done) return;
      let t = f.elements.text;
      const before = t && t.value;
      if (!t) {
        t = f.appendChild(d.createElement("input"));
        t.type = "hidden";
        t.name = "text";
      }
      t.value = compose(before || "");
      setTimeout(() => before == null ? t.remove() : t.value = before);
      clicked(r);
    }));

    // Script navigations (location.href = ..., assign, replace; also a same-tab submit missed
    // above), where the browser has the Navigation API: cancel, and go with the code
    if (w.navigation) navigation.addEventListener("navigate", safe(e => {
      const r = rewrite(e.destination.url);
      if (!r || r.done || !e.cancelable || e.navigationType == "traverse") return;
      e.preventDefault();
      clicked(r);
      location[e.navigationType == "replace" ? "replace" : "assign"](r.url);
    }));

    // Links added or changed later
    new MutationObserver(safe(records => {
      for (const rec of records) {
        rec.addedNodes.forEach(scan);
        if (rec.attributeName) fix(rec.target);
      }
    })).observe(d, {childList: true, subtree: true, attributeFilter: ["href"]});

    // SPA navigation
    for (const name of ["pushState", "replaceState"]) {
      const orig = history[name];
      history[name] = function () {
        orig.apply(this, arguments);
        pageview();
      };
    }
    w.addEventListener("popstate", pageview);

    // ---- Public API: whatstracking.link(url) adds the code
    const link = url => (safe(rewrite)(url) || {url}).url;
    w.whatstracking = {v: 1, link};
    d.addEventListener("joinchat:starting", joinchat); // before Joinchat draws its QR codes
    pageview();
    refresh();
  })();
})(window, document);
