"use strict";
// Shared by the pages: who is logged in, a CSRF-carrying fetch, text-only rendering.
const umbra = {
  session: null,
  async init() {
    const r = await fetch("/api/v1/session", {credentials: "same-origin"});
    if (r.status === 401) { location.href = "/login"; return null; }
    umbra.session = await r.json();
    const who = document.getElementById("who");
    if (who) who.textContent = umbra.session.principal;
    const out = document.getElementById("logout");
    if (out) out.addEventListener("click", async () => {
      await umbra.post("/logout", {});
      location.href = "/login";
    });
    return umbra.session;
  },
  post(path, body) {
    return fetch(path, {method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": umbra.session.csrf},
      body: JSON.stringify(body)});
  },
  // cell appends a table cell holding text (never HTML).
  cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  },
};
