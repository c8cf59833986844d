"use strict";
(async () => {
  const s = await umbra.init();
  if (!s) return;
  // The filters come from the URL too (the form is a plain GET form without script).
  const initial = new URLSearchParams(location.search);
  for (const [k, id] of [["vm", "f-vm"], ["kind", "f-kind"], ["verdict", "f-verdict"]]) {
    if (initial.has(k)) document.getElementById(id).value = initial.get(k);
  }
  const load = async () => {
    const q = new URLSearchParams();
    for (const [k, id] of [["vm", "f-vm"], ["kind", "f-kind"], ["verdict", "f-verdict"]]) {
      const v = document.getElementById(id).value.trim();
      if (v) q.set(k, v);
    }
    const r = await fetch("/api/v1/audit?" + q, {credentials: "same-origin"});
    const v = await r.json();
    const verdict = document.getElementById("verdict");
    if (v.error) { verdict.textContent = v.error; verdict.className = "deny"; return; }
    verdict.textContent = "Log verification: " + v.verify.verdict + " (" + v.verify.records + " records" +
      (v.verify.problems ? "; " + v.verify.problems.join("; ") : "") + ")";
    verdict.className = v.verify.ok ? "allow" : "deny";
    // The evidence file against the reference values (serve --evidence): attest verify's verdict and text.
    const box = document.getElementById("evidence-box");
    box.hidden = !v.evidence;
    if (v.evidence) {
      const ev = document.getElementById("evidence-verdict");
      ev.textContent = "Evidence verification: " + v.evidence.verdict + " (" + v.evidence.evidence + " against " + v.evidence.reference + ")";
      ev.className = v.evidence.ok ? "allow" : "deny";
      document.getElementById("evidence").textContent = v.evidence.text;
    }
    const body = document.querySelector("#timeline tbody");
    body.replaceChildren();
    for (const e of v.entries.slice().reverse()) {
      const tr = document.createElement("tr");
      umbra.cell(tr, String(e.seq));
      umbra.cell(tr, e.time);
      umbra.cell(tr, e.kind);
      umbra.cell(tr, e.vm || "");
      umbra.cell(tr, e.actor || "");
      umbra.cell(tr, e.verdict, e.verdict === "DENY" ? "deny" : e.verdict === "ALLOW" ? "allow" : "");
      umbra.cell(tr, e.summary);
      body.appendChild(tr);
    }
  };
  document.getElementById("filters").addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
  load();
})();
