"use strict";
(async () => {
  const s = await umbra.init();
  if (!s) return;
  document.getElementById("host").textContent = s.host;
  const r = await fetch("/api/v1/vms", {credentials: "same-origin"});
  const body = document.querySelector("#vms tbody");
  for (const vm of await r.json()) {
    const tr = document.createElement("tr");
    umbra.cell(tr, vm.name);
    if (vm.error) {
      umbra.cell(tr, "—");
      const td = umbra.cell(tr, vm.error, "deny");
      td.colSpan = 3;
    } else {
      const st = vm.status;
      umbra.cell(tr, st.state);
      umbra.cell(tr, st.policy_revision);
      umbra.cell(tr, (st.cloaked_apps || []).map(a => a.name || a.id || "?").join(", ") || "none");
      umbra.cell(tr, Object.entries(st.counters || {}).map(([k, v]) => k + "=" + v).join(" "));
    }
    const td = umbra.cell(tr, "");
    const a = document.createElement("a");
    a.href = "/console?vm=" + encodeURIComponent(vm.name);
    a.textContent = "console";
    a.className = "console-link";
    td.appendChild(a);
    body.appendChild(tr);
  }
})();
