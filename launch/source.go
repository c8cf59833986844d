package launch

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os/user"
	"path/filepath"

	"github.com/google/go-tpm/tpm2/transport"
	"go.yaml.in/yaml/v3"

	"github.com/umbra-cc/umbra/guestimage"
	"github.com/umbra-cc/umbra/monitor"
	"github.com/umbra-cc/umbra/policy"
	"github.com/umbra-cc/umbra/sealing"
	"github.com/umbra-cc/umbra/userfile"
)

// LaunchSource is what a launch runs and under which policy: resolved from the
// built-in demo, a spec file with a signed policy bundle, or a sealed VM bundle.
type LaunchSource struct {
	Spec         *monitor.Spec
	SpecBytes    []byte
	Image        []byte // the guest image, or the Linux kernel
	Initrd       []byte // the Linux initramfs, if the spec names one
	Policy       *policy.Policy
	PolicyDigest string // SHA-256 (hex) of the signed policy bundle (of the Rego source when built in)
	// CloakSecret is the VM's cloak master secret from a sealed bundle, nil otherwise
	// (a fresh random secret is used then). Wipe it when done.
	CloakSecret []byte
	// Sealed describes the sealed bundle the launch came from, if any.
	Sealed *sealing.Opened
	// Dir is the directory the spec's relative paths (guest files, disks) resolve against.
	Dir string
	// PolicyBundle and PolicyKeyID are the signed policy bundle and its signer's key
	// id (empty for the built-in demo policy); a migration carries them.
	PolicyBundle []byte
	PolicyKeyID  string
}

// DiskEnv is where the source's disks are and how its protected disks open.
func (s *LaunchSource) DiskEnv() monitor.DiskEnv {
	env := monitor.DiskEnv{Dir: s.Dir}
	if s.Sealed != nil && len(s.CloakSecret) > 0 {
		// A sealed VM's disks are keyed from its bundle's secret; Launch adds the TPM
		// and the state directory that anchor them.
		env.Protected = &monitor.ProtectedDiskEnv{Secret: s.CloakSecret}
	}
	return env
}

// LaunchConfig returns the parts of a launch that come from the source.
func (s *LaunchSource) LaunchConfig() LaunchConfig {
	lc := LaunchConfig{Spec: s.Spec, SpecBytes: s.SpecBytes, Policy: s.Policy, PolicyDigest: s.PolicyDigest, Disks: s.DiskEnv(), PolicyBundle: s.PolicyBundle, PolicyKeyID: s.PolicyKeyID}
	if s.Sealed != nil {
		lc.Series, lc.Version = s.Sealed.Series, s.Sealed.Version
	}
	return lc
}

// Wipe clears the secret material.
func (s *LaunchSource) Wipe() {
	clear(s.CloakSecret)
	if s.Sealed != nil {
		s.Sealed.Wipe()
	}
}

// Config returns the run configuration for the source.
func (s *LaunchSource) Config() monitor.Config {
	mem, _ := s.Spec.MemoryBytes()
	timeout, _ := s.Spec.TimeoutDuration()
	return monitor.Config{Image: s.Image, Boot: s.Spec.Boot(), Initrd: s.Initrd, MemorySize: mem, Cmdline: s.Spec.Guest.Cmdline, Timeout: timeout, CloakSecret: s.CloakSecret, HotplugDisks: s.Spec.HotplugDisks(), HotplugNetworks: s.Spec.HotplugNetworks()}
}

// DemoSource is the built-in demo: the test guest running its demo programs under
// the built-in demo policy.
func DemoSource(ctx context.Context) (*LaunchSource, error) {
	spec := &monitor.Spec{
		APIVersion: monitor.SpecVersion,
		Name:       policy.DemoVMID,
		Labels:     map[string]string{"purpose": "demo"},
		Guest:      monitor.GuestSpec{Image: "builtin:testguest", Cmdline: guestimage.DemoCmdline},
		Memory:     "64MiB",
		Timeout:    "60s",
		Cloak:      &monitor.CloakSpec{Apps: []string{"cloakcompute"}},
	}
	raw, err := yaml.Marshal(spec)
	if err != nil {
		return nil, err
	}
	p, err := policy.DemoPolicy(ctx)
	if err != nil {
		return nil, fmt.Errorf("built-in demo policy: %w", err)
	}
	src, err := policy.DemoSource()
	if err != nil {
		return nil, fmt.Errorf("built-in demo policy: %w", err)
	}
	sum := sha256.Sum256(src)
	return &LaunchSource{Spec: spec, SpecBytes: raw, Image: guestimage.Image(), Policy: p, PolicyDigest: hex.EncodeToString(sum[:])}, nil
}

// SpecSource reads a VM spec file and its guest image, and loads the signed policy
// bundle that governs it, verified with key.
func SpecSource(ctx context.Context, specPath, bundlePath string, key policy.VerifyKey) (*LaunchSource, error) {
	raw, err := userfile.Read(ctx, specPath, "VM spec", userfile.MaxSpecBytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidInput, err)
	}
	spec, err := monitor.ParseSpec(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalidInput, specPath, err)
	}
	img, initrd, err := spec.ReadGuestFiles(ctx, filepath.Dir(specPath))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrInvalidInput, specPath, err)
	}
	bundle, err := userfile.Read(ctx, bundlePath, "policy bundle", userfile.MaxBundleBytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidInput, err)
	}
	p, err := policy.LoadSignedBundle(ctx, bytes.NewReader(bundle), bundlePath, key)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidInput, err)
	}
	sum := sha256.Sum256(bundle)
	return &LaunchSource{Spec: spec, SpecBytes: raw, Image: img, Initrd: initrd, Policy: p, PolicyDigest: hex.EncodeToString(sum[:]), Dir: filepath.Dir(specPath), PolicyBundle: bundle, PolicyKeyID: key.ID}, nil
}

// SealedSource opens a sealed VM bundle on this host's TPM: it measures this monitor
// (once per boot), opens the bundle (signature, host, monitor approval, rollback),
// and loads the policy inside it, which must be an OPA bundle signed by the same
// administrator with key id = the administrator's key id. The guest image is read
// from the path in the sealed spec, relative to the bundle file, and its digest is
// part of the policy input so a policy can pin it.
func SealedSource(ctx context.Context, tpm transport.TPM, stateDir, bundlePath string, log *slog.Logger) (*LaunchSource, error) {
	data, err := userfile.Read(ctx, bundlePath, "sealed bundle", userfile.MaxBundleBytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidInput, err)
	}
	if !sealing.IsBundle(data) {
		return nil, fmt.Errorf("%s is not a sealed VM bundle", bundlePath)
	}
	self, err := sealing.SelfDigest()
	if err != nil {
		return nil, fmt.Errorf("measure this monitor: %w", err)
	}
	if _, err := sealing.MeasureMonitor(tpm, self, stateDir, "umbra run"); err != nil {
		return nil, fmt.Errorf("measure this monitor into the TPM: %w", err)
	}
	admins, err := sealing.LoadTrustedAdmins(stateDir)
	if err != nil {
		return nil, err
	}
	approvals, err := sealing.LoadApprovals(stateDir)
	if err != nil {
		return nil, err
	}
	opened, err := sealing.OpenBundle(ctx, tpm, data, sealing.OpenOptions{TrustedAdmins: admins, Approvals: approvals, StateDir: stateDir, Logger: log})
	if err != nil {
		return nil, err
	}
	src, err := sealedContents(ctx, opened, admins, bundlePath)
	if err != nil {
		opened.Wipe()
		return nil, err
	}
	return src, nil
}

// CheckSealedContents is what SealedSource checks after the bundle opened (the spec,
// the guest image it names, the policy and its signer), for 'umbra unseal --check':
// the same code, in memory, nothing kept.
func CheckSealedContents(admins []*ecdsa.PublicKey, bundlePath string) sealing.CheckContents {
	return func(ctx context.Context, o *sealing.Opened) (string, error) {
		src, err := sealedContents(ctx, o, admins, bundlePath)
		if err != nil {
			return "", err
		}
		what := "guest image"
		if src.Spec.Boot() == monitor.BootLinux {
			what = "Linux kernel"
		}
		return fmt.Sprintf("VM %s: spec valid, %s %s checked, policy revision %s signed by the bundle's administrator", src.Spec.Name, what, src.Spec.ImagePath(filepath.Dir(bundlePath)), src.Policy.Revision()), nil
	}
}

// sealedContents turns an opened bundle into a launch source: the sealed spec,
// the guest image it names (relative to the bundle), checked as Launch will check
// it, and the sealed policy, which must be signed by the bundle's administrator.
func sealedContents(ctx context.Context, opened *sealing.Opened, admins []*ecdsa.PublicKey, bundlePath string) (*LaunchSource, error) {
	src := &LaunchSource{Sealed: opened, CloakSecret: opened.CloakMasterSecret, Dir: filepath.Dir(bundlePath)}
	spec, err := monitor.ParseSpec(opened.Spec)
	if err != nil {
		return nil, fmt.Errorf("%w: spec sealed in %s: %w", ErrInvalidInput, bundlePath, err)
	}
	src.Spec, src.SpecBytes = spec, opened.Spec
	if src.Image, src.Initrd, err = spec.ReadGuestFiles(ctx, filepath.Dir(bundlePath)); err != nil {
		return nil, fmt.Errorf("%w: guest files named by the sealed spec: %w", ErrInvalidInput, err)
	}
	if err := monitor.CheckConfig(src.Config()); err != nil {
		return nil, fmt.Errorf("%w: VM sealed in %s: %w", ErrInvalidInput, bundlePath, err)
	}
	admin, err := adminKey(admins, opened.Header.AdminKeyID)
	if err != nil {
		return nil, err
	}
	src.Policy, err = policy.LoadSignedBundle(ctx, bytes.NewReader(opened.PolicyBundle), bundlePath+"#policy", policy.VerifyKey{ID: opened.Header.AdminKeyID, PEM: admin})
	if err != nil {
		return nil, fmt.Errorf("policy sealed in %s (must be signed by the bundle's administrator with key id %s): %w", bundlePath, opened.Header.AdminKeyID, err)
	}
	src.PolicyDigest = opened.Header.PolicySHA256
	src.PolicyBundle, src.PolicyKeyID = opened.PolicyBundle, opened.Header.AdminKeyID
	return src, nil
}

func adminKey(admins []*ecdsa.PublicKey, id string) ([]byte, error) {
	for _, k := range admins {
		if sealing.KeyID(k) == id {
			der, err := x509.MarshalPKIXPublicKey(k)
			if err != nil {
				return nil, err
			}
			return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
		}
	}
	return nil, fmt.Errorf("administrator key %s is not among this host's trusted administrators", id)
}

// LocalPrincipal is the operator running this process, authenticated by the kernel
// (the process's real uid), with the names of its groups.
func LocalPrincipal() (policy.Principal, error) {
	u, err := user.Current()
	if err != nil {
		return policy.Principal{}, fmt.Errorf("identify the local user: %w", err)
	}
	p := policy.Principal{ID: "unix:" + u.Username, Auth: "unix-peer", Groups: []string{}}
	gids, err := u.GroupIds()
	if err != nil {
		return p, nil // groups are optional: policies that need them deny
	}
	for _, gid := range gids {
		if g, err := user.LookupGroupId(gid); err == nil {
			p.Groups = append(p.Groups, g.Name)
		}
	}
	return p, nil
}
