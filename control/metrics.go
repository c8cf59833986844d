package control

import (
	"fmt"
	"io"
	"strings"

	"github.com/umbra-cc/umbra/launch"
)

// WriteMetrics writes st in the Prometheus text exposition format (version 0.0.4).
func WriteMetrics(w io.Writer, st *launch.Status) error {
	vm := `vm="` + escapeLabel(st.VM) + `"`
	var b strings.Builder
	metric := func(name, typ, help string, samples ...sample) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
		for _, s := range samples {
			labels := vm
			if s.labels != "" {
				labels += "," + s.labels
			}
			fmt.Fprintf(&b, "%s{%s} %v\n", name, labels, s.value)
		}
	}
	c := st.Counters
	paused := 0
	if st.Paused {
		paused = 1
	}
	metric("umbra_vm_paused", "gauge", "1 while the VM is paused.", sample{"", paused})
	metric("umbra_vm_uptime_seconds", "gauge", "Seconds since the VM was launched.", sample{"", st.Uptime.Seconds()})
	metric("umbra_vm_paused_seconds_total", "counter", "Seconds the VM has spent paused.", sample{"", st.PausedTotal.Seconds()})
	metric("umbra_vm_exits_total", "counter", "vCPU exits by kind (all: every exit, appVM's included).",
		sample{`kind="all"`, c.Exits}, sample{`kind="io"`, c.IOExits}, sample{`kind="mmio"`, c.MMIOExits},
		sample{`kind="interrupted"`, c.Interrupts}, sample{`kind="appvm"`, c.AppVMExits})
	metric("umbra_vm_hypercalls_total", "counter", "Hypercalls handled.", sample{"", c.Hypercalls})
	metric("umbra_vm_console_bytes_total", "counter", "Bytes the guest wrote to its console.", sample{"", c.ConsoleBytes})
	metric("umbra_vm_doorbell_violations_total", "counter", "Doorbell protocol violations.", sample{"", c.DoorbellViolations})
	metric("umbra_vm_unhandled_io_total", "counter", "Port accesses no device handles.", sample{"", c.UnhandledIO})
	var toCipher, toPlain, syscalls, denied uint64
	for _, a := range st.CloakedApps {
		toCipher += a.ToCipher
		toPlain += a.ToPlain
		syscalls += a.Syscalls
		denied += a.Denied
	}
	metric("umbra_vm_cloaked_apps", "gauge", "Apps that registered for cloaking.", sample{"", len(st.CloakedApps)})
	metric("umbra_vm_cloak_transitions_total", "counter", "Cloaked page transitions by direction.",
		sample{`direction="to_cipher"`, toCipher}, sample{`direction="to_plain"`, toPlain})
	metric("umbra_vm_cloak_syscalls_total", "counter", "System calls of cloaked apps, forwarded or denied.",
		sample{`result="forwarded"`, syscalls}, sample{`result="denied"`, denied})
	metric("umbra_vm_pageprot_calls_total", "counter", "Page-protection hypercalls.", sample{"", st.PageProt.Calls})
	metric("umbra_vm_pageprot_violations_total", "counter", "Accesses that violated a protected range.", sample{"", st.PageProt.Violations})
	metric("umbra_vm_pageprot_locks", "gauge", "Locked page-protection ranges in force.", sample{"", st.PageLocks})
	metric("umbra_vm_audit_seq", "gauge", "Sequence number of the newest record in the audit log.", sample{"", st.AuditSeq})
	_, err := io.WriteString(w, b.String())
	return err
}

type sample struct {
	labels string
	value  any
}

func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}
