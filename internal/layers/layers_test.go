package layers

import (
	"bytes"
	"encoding/json"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/umbra-cc/umbra"

// pkg is what the test reads of `go list -json`.
type pkg struct {
	ImportPath string
	Dir        string
	GoFiles    []string
	Imports    []string
	Deps       []string
}

// listModule returns the module's packages (without tests) by import path relative to
// the module root.
func listModule(t *testing.T) map[string]pkg {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to list the packages with")
	}
	cmd := exec.Command("go", "list", "-json", module+"/...")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("go list: %v\n%s", err, errb.String())
	}
	pkgs := map[string]pkg{}
	dec := json.NewDecoder(&out)
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("go list output: %v", err)
		}
		p.ImportPath = rel(p.ImportPath)
		p.Imports = ours(p.Imports)
		p.Deps = ours(p.Deps)
		pkgs[p.ImportPath] = p
	}
	if len(pkgs) < 20 {
		t.Fatalf("go list found %d packages; is the test run inside the module?", len(pkgs))
	}
	return pkgs
}

func rel(path string) string { return strings.TrimPrefix(path, module+"/") }

// ours keeps the module's own packages of paths, relative to the module root.
func ours(paths []string) []string {
	var r []string
	for _, p := range paths {
		if p == module || strings.HasPrefix(p, module+"/") {
			r = append(r, rel(p))
		}
	}
	return r
}

// under reports whether path is root or a package below it.
func under(path, root string) bool { return path == root || strings.HasPrefix(path, root+"/") }

// layer is a package's place in the dependency direction: a package may import only
// packages of a lower or equal layer. Feature packages (pageprot, shadowmem, virtio,
// snapshot, attest, sealing, policy, ...) are layer 2.
func layer(path string) int {
	switch {
	case under(path, "x86"):
		return 0
	case under(path, "kvm"):
		return 1
	case under(path, "monitor"):
		return 3
	case under(path, "guard"), under(path, "launch"):
		return 4
	case under(path, "control"), under(path, "serve"):
		return 5 // the control socket and the web front on it
	case under(path, "internal"):
		return 6 // test helpers: they may build on anything below the command
	case under(path, "cmd"):
		return 7
	}
	return 2
}

// TestMonitorImportsNoLaunchCode is the issue-14 rule: the VMM package and its
// subpackages import (directly or not) no TPM, attestation, sealing, policy or
// embedded-guest code, and nothing of the orchestration above them.
func TestMonitorImportsNoLaunchCode(t *testing.T) {
	pkgs := listModule(t)
	forbidden := []string{"attest", "sealing", "policy", "guestimage", "guard", "launch", "control", "cmd", "internal"}
	n := 0
	for path, p := range pkgs {
		if !under(path, "monitor") {
			continue
		}
		n++
		for _, d := range p.Deps {
			for _, f := range forbidden {
				if under(d, f) {
					t.Errorf("%s depends on %s (monitor may not import %s code)", path, d, f)
				}
			}
		}
	}
	if n == 0 {
		t.Fatal("no monitor package listed")
	}
}

// TestKVMKnowsNothingOfUmbra: kvm builds on x86 only; x86, bus and tpmdev (the TPM
// layer sealing and attest share) and eventkind import nothing of the module.
func TestKVMKnowsNothingOfUmbra(t *testing.T) {
	pkgs := listModule(t)
	allowed := map[string][]string{"kvm": {"x86"}, "x86": nil, "bus": nil, "tpmdev": nil, "eventkind": nil}
	for path, ok := range allowed {
		p, found := pkgs[path]
		if !found {
			t.Fatalf("package %s not listed", path)
		}
		for _, d := range p.Deps {
			if !slices.Contains(ok, d) {
				t.Errorf("%s depends on %s", path, d)
			}
		}
	}
}

// TestNoUpwardImports: no package imports one of a higher layer. (Import cycles the
// compiler refuses already; this catches the direction.)
func TestNoUpwardImports(t *testing.T) {
	for path, p := range listModule(t) {
		for _, imp := range p.Imports {
			if layer(imp) > layer(path) {
				t.Errorf("%s (layer %d) imports %s (layer %d): the dependency runs the wrong way", path, layer(path), imp, layer(imp))
			}
		}
	}
}

// TestLayerRuleCatchesAnUpwardImport runs the rule on edges that break it, so the
// test above cannot pass by classifying everything alike.
func TestLayerRuleCatchesAnUpwardImport(t *testing.T) {
	for _, e := range [][2]string{{"kvm", "monitor"}, {"monitor", "launch"}, {"pageprot", "monitor"}, {"x86", "kvm"}, {"launch", "control"}, {"control", "cmd/umbra"}} {
		if layer(e[1]) <= layer(e[0]) {
			t.Errorf("%s -> %s is not seen as upward", e[0], e[1])
		}
	}
	for _, e := range [][2]string{{"monitor", "kvm"}, {"launch", "monitor"}, {"pageprot", "kvm"}, {"monitor/memguard", "pageprot"}} {
		if layer(e[1]) > layer(e[0]) {
			t.Errorf("%s -> %s is seen as upward", e[0], e[1])
		}
	}
}
