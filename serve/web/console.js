"use strict";
// The console through the two tickets, all on one WebSocket (so on one TLS channel,
// which both tickets are bound to): issue -> host ticket, exchange -> proxy ticket,
// open -> console bytes. Detach closes the socket; the VM keeps running.
(async () => {
  const s = await umbra.init();
  if (!s) return;
  const vm = new URLSearchParams(location.search).get("vm") || "";
  document.getElementById("vm").textContent = vm;
  const status = document.getElementById("status");
  const term = new Terminal({convertEol: true, cursorBlink: true, rows: 30, cols: 100});
  term.open(document.getElementById("term"));
  const ws = new WebSocket("wss://" + location.host + "/api/v1/console");
  ws.binaryType = "arraybuffer";
  let open = false;
  const enc = new TextEncoder();
  const send = (m) => ws.send(JSON.stringify(m));
  ws.onopen = () => { status.textContent = "asking for a ticket…"; send({op: "issue", vm}); };
  ws.onmessage = (ev) => {
    if (open) { term.write(new Uint8Array(ev.data)); return; }
    const m = JSON.parse(ev.data);
    if (m.error) { status.textContent = "refused: " + m.error; status.className = "deny"; ws.close(); return; }
    if (m.open) { open = true; status.textContent = "attached (ticket used)"; status.className = "allow"; term.focus(); return; }
    if (m.kind === "host") { status.textContent = "host ticket for " + m.host + "; exchanging…"; send({op: "exchange", vm, ticket: m.ticket}); return; }
    if (m.kind === "proxy") { status.textContent = "proxy ticket; opening…"; send({op: "open", vm, ticket: m.ticket}); }
  };
  ws.onclose = () => { if (open) { status.textContent = "detached; the VM keeps running"; status.className = ""; } open = false; };
  term.onData((d) => { if (open) ws.send(enc.encode(d)); });
  document.getElementById("detach").addEventListener("click", () => ws.close(1000, "detach"));
})();
