package policy

import (
	"sort"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
)

// astValue converts the input to OPA's AST directly, without the JSON round trip
// that rego.EvalInput performs on Go structs. It must produce exactly the value
// that the JSON encoding of the input would (TestInputASTMatchesJSON checks it).
func (in *Input) astValue() ast.Value {
	c := in.normalized()
	return ast.NewObject(
		item("action", ast.StringTerm(string(c.Action))),
		item("now", timeTerm(c.Now)),
		item("principal", ast.ObjectTerm(
			item("id", ast.StringTerm(c.Principal.ID)),
			item("groups", stringsTerm(c.Principal.Groups)),
			item("auth", ast.StringTerm(c.Principal.Auth)),
		)),
		item("host", ast.ObjectTerm(
			item("id", ast.StringTerm(c.Host.ID)),
			item("fingerprint", ast.StringTerm(c.Host.Fingerprint)),
			item("attestation", ast.StringTerm(c.Host.Attestation)),
		)),
		item("vm", vmTerm(&c.VM)),
		item("request", requestTerm(&c.Request)),
	)
}

func item(k string, v *ast.Term) [2]*ast.Term { return ast.Item(ast.StringTerm(k), v) }

func timeTerm(t time.Time) *ast.Term {
	b, _ := t.MarshalJSON() // cannot fail for years 0..9999, enforced by Validate's callers
	if len(b) >= 2 {
		return ast.StringTerm(string(b[1 : len(b)-1]))
	}
	return ast.StringTerm("")
}

func stringsTerm(xs []string) *ast.Term {
	ts := make([]*ast.Term, len(xs))
	for i, x := range xs {
		ts[i] = ast.StringTerm(x)
	}
	return ast.ArrayTerm(ts...)
}

func specTerm(s *Spec) *ast.Term {
	return ast.ObjectTerm(
		item("memory_mib", ast.UIntNumberTerm(s.MemoryMiB)),
		item("vcpus", ast.UIntNumberTerm(uint64(s.VCPUs))),
		item("image", ast.StringTerm(s.Image)),
		item("cloak", ast.BooleanTerm(s.Cloak)),
	)
}

func deviceTerm(d *Device) *ast.Term {
	items := [][2]*ast.Term{item("type", ast.StringTerm(d.Type)), item("id", ast.StringTerm(d.ID))}
	for _, f := range []struct{ k, v string }{{"path", d.Path}, {"format", d.Format}, {"digest", d.Digest}, {"root", d.Root}} {
		if f.v != "" {
			items = append(items, item(f.k, ast.StringTerm(f.v)))
		}
	}
	if d.ReadOnly {
		items = append(items, item("read_only", ast.BooleanTerm(true)))
	}
	return ast.ObjectTerm(items...)
}

func networkTerm(n *Network) *ast.Term {
	items := [][2]*ast.Term{item("id", ast.StringTerm(n.ID)), item("mode", ast.StringTerm(n.Mode))}
	for _, f := range []struct{ k, v string }{{"netns", n.Netns}, {"tap", n.TAP}, {"mac", n.MAC}} {
		if f.v != "" {
			items = append(items, item(f.k, ast.StringTerm(f.v)))
		}
	}
	return ast.ObjectTerm(items...)
}

func vmTerm(vm *VM) *ast.Term {
	labelKeys := make([]string, 0, len(vm.Labels))
	for k := range vm.Labels {
		labelKeys = append(labelKeys, k)
	}
	sort.Strings(labelKeys)
	labels := make([][2]*ast.Term, len(labelKeys))
	for i, k := range labelKeys {
		labels[i] = item(k, ast.StringTerm(vm.Labels[k]))
	}
	devs := make([]*ast.Term, len(vm.Devices))
	for i := range vm.Devices {
		devs[i] = deviceTerm(&vm.Devices[i])
	}
	nets := make([]*ast.Term, len(vm.Networks))
	for i := range vm.Networks {
		nets[i] = networkTerm(&vm.Networks[i])
	}
	items := [][2]*ast.Term{
		item("id", ast.StringTerm(vm.ID)),
		item("labels", ast.ObjectTerm(labels...)),
		item("spec", specTerm(&vm.Spec)),
		item("state", ast.StringTerm(vm.State)),
		item("devices", ast.ArrayTerm(devs...)),
		item("networks", ast.ArrayTerm(nets...)),
	}
	if !vm.FirstLaunchAt.IsZero() {
		items = append(items, item("first_launch_at", timeTerm(vm.FirstLaunchAt)))
	}
	return ast.ObjectTerm(items...)
}

func rangesTerm(rs []Range) *ast.Term {
	ts := make([]*ast.Term, len(rs))
	for i, r := range rs {
		ts[i] = ast.ObjectTerm(
			item("start", ast.UIntNumberTerm(r.Start)),
			item("length", ast.UIntNumberTerm(r.Length)),
		)
	}
	return ast.ArrayTerm(ts...)
}

func requestTerm(r *Request) *ast.Term {
	var items [][2]*ast.Term
	if r.Recheck {
		items = append(items, item("recheck", ast.BooleanTerm(true)))
	}
	if r.Spec != nil {
		items = append(items, item("spec", specTerm(r.Spec)))
	}
	if r.Device != nil {
		items = append(items, item("device", deviceTerm(r.Device)))
	}
	if r.Network != nil {
		items = append(items, item("network", networkTerm(r.Network)))
	}
	if r.Console != nil {
		items = append(items, item("console", ast.ObjectTerm(item("kind", ast.StringTerm(r.Console.Kind)))))
	}
	if r.Stop != nil {
		items = append(items, item("stop", ast.ObjectTerm(item("force", ast.BooleanTerm(r.Stop.Force)))))
	}
	if r.Snapshot != nil {
		snap := [][2]*ast.Term{item("name", ast.StringTerm(r.Snapshot.Name))}
		if r.Snapshot.Generation != 0 {
			snap = append(snap, item("generation", ast.UIntNumberTerm(r.Snapshot.Generation)))
		}
		if r.Snapshot.Current != 0 {
			snap = append(snap, item("current", ast.UIntNumberTerm(r.Snapshot.Current)))
		}
		if g := r.Snapshot.Group; g != nil {
			members := make([]*ast.Term, len(g.Members))
			for i, m := range g.Members {
				members[i] = ast.StringTerm(m)
			}
			snap = append(snap, item("group", ast.ObjectTerm(
				item("name", ast.StringTerm(g.Name)),
				item("members", ast.ArrayTerm(members...)),
			)))
		}
		items = append(items, item("snapshot", ast.ObjectTerm(snap...)))
	}
	if r.Transfer != nil {
		items = append(items, item("transfer", ast.ObjectTerm(
			item("direction", ast.StringTerm(r.Transfer.Direction)),
			item("path", ast.StringTerm(r.Transfer.Path)),
		)))
	}
	if r.Clipboard != nil {
		items = append(items, item("clipboard", ast.ObjectTerm(item("direction", ast.StringTerm(r.Clipboard.Direction)))))
	}
	if r.Migration != nil {
		items = append(items, item("migration", ast.ObjectTerm(
			item("target_host", ast.StringTerm(r.Migration.TargetHost)),
			item("target_fingerprint", ast.StringTerm(r.Migration.TargetFingerprint)),
		)))
	}
	if r.Export != nil {
		items = append(items, item("export", ast.ObjectTerm(item("destination", ast.StringTerm(r.Export.Destination)))))
	}
	if b := r.Backup; b != nil {
		fields := [][2]*ast.Term{item("disk", ast.StringTerm(b.Disk)), item("format", ast.StringTerm(b.Format)), item("kind", ast.StringTerm(b.Kind))}
		if b.Since != "" {
			fields = append(fields, item("since", ast.StringTerm(b.Since)))
		}
		fields = append(fields, item("destination", ast.StringTerm(b.Destination)))
		items = append(items, item("backup", ast.ObjectTerm(fields...)))
	}
	if x := r.Restore; x != nil {
		fields := [][2]*ast.Term{item("disk", ast.StringTerm(x.Disk)), item("backup", ast.StringTerm(x.Backup)), item("chain", ast.StringTerm(x.Chain)),
			item("manifest", ast.StringTerm(x.Manifest)), item("key_fingerprint", ast.StringTerm(x.KeyFingerprint)), item("created", ast.StringTerm(x.Created)),
			item("root", ast.StringTerm(x.Root)), item("from_version", ast.UIntNumberTerm(x.FromVersion))}
		if x.FromRoot != "" {
			fields = append(fields, item("from_root", ast.StringTerm(x.FromRoot)))
		}
		fields = append(fields, item("to_version", ast.UIntNumberTerm(x.ToVersion)))
		if x.Reason != "" {
			fields = append(fields, item("reason", ast.StringTerm(x.Reason)))
		}
		items = append(items, item("restore", ast.ObjectTerm(fields...)))
	}
	if r.App != nil {
		items = append(items, item("app", ast.ObjectTerm(
			item("name", ast.StringTerm(r.App.Name)),
			item("measurement", ast.StringTerm(r.App.Measurement)),
		)))
	}
	if r.Pages != nil {
		items = append(items, item("pages", ast.ObjectTerm(
			item("prot", ast.StringTerm(r.Pages.Prot)),
			item("ranges", rangesTerm(r.Pages.Ranges)),
			item("owned", rangesTerm(r.Pages.Owned)),
		)))
	}
	return ast.ObjectTerm(items...)
}

func sortStrings(xs []string) { sort.Strings(xs) }
