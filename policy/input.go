package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"time"
	"unicode/utf8"
)

// Action names a guarded action. The set is closed: an input with any other action
// is invalid and denied.
type Action string

// The guarded actions.
const (
	ActionLaunch       Action = "launch"
	ActionResume       Action = "resume"
	ActionModifySpec   Action = "modify_spec"
	ActionAttachDevice Action = "attach_device"
	// ActionDetachDevice removes a device attached at run time (request.device).
	ActionDetachDevice   Action = "detach_device"
	ActionConnectNetwork Action = "connect_network"
	ActionConsoleOpen    Action = "console_open"
	ActionSnapshotCreate Action = "snapshot_create"
	ActionSnapshotRevert Action = "snapshot_revert"
	ActionFileTransfer   Action = "file_transfer"
	ActionClipboard      Action = "clipboard"
	ActionMigrate        Action = "migrate"
	ActionClone          Action = "clone"
	ActionExport         Action = "export"
	ActionDelete         Action = "delete"
	ActionCloakRegister  Action = "cloak_register"
	ActionPageProtChange Action = "pageprot_change"
	// ActionPause freezes a running VM's vCPUs; resume continues it.
	ActionPause Action = "pause"
	// ActionStop ends a running VM (request.stop.force: without a grace period).
	ActionStop Action = "stop"
	// ActionInspect reads a running VM's state and counters (control API).
	ActionInspect Action = "inspect"
	// ActionBackup copies a disk of the running VM out as a backup (request.backup).
	ActionBackup Action = "backup"
	// ActionBackupRestore rolls a protected disk back to a backed-up state and
	// re-anchors it as the VM's current one (request.restore).
	ActionBackupRestore Action = "backup_restore"
)

// Actions lists every guarded action, in a stable order.
func Actions() []Action {
	return []Action{
		ActionLaunch, ActionResume, ActionModifySpec, ActionAttachDevice, ActionDetachDevice,
		ActionConnectNetwork, ActionConsoleOpen, ActionSnapshotCreate,
		ActionSnapshotRevert, ActionFileTransfer, ActionClipboard, ActionMigrate,
		ActionClone, ActionExport, ActionDelete, ActionCloakRegister,
		ActionPageProtChange, ActionPause, ActionStop, ActionInspect, ActionBackup, ActionBackupRestore,
	}
}

// Input is what the monitor hands the policy for one guarded action. Its JSON form
// is the Rego `input` document and is specified by schema/input.schema.json.
type Input struct {
	Action Action `json:"action"`
	// Now is the trusted time of the decision, from the monitor's clock. The same
	// instant is the evaluation time, so time.now_ns() in Rego returns it too.
	Now       time.Time `json:"now"`
	Principal Principal `json:"principal"`
	Host      Host      `json:"host"`
	VM        VM        `json:"vm"`
	Request   Request   `json:"request"`
}

// Principal is who asks for the action and how the monitor authenticated them.
type Principal struct {
	ID     string   `json:"id"`
	Groups []string `json:"groups"`
	// Auth is how the principal was authenticated: "unix-peer" (SO_PEERCRED on the
	// control socket), "mtls", "token", "system" (umbra itself, e.g. a recheck), or
	// "attested-host" (an umbra host that proved itself by a TPM quote bound to the
	// connection: a migration's source, ID "host:FINGERPRINT").
	Auth string `json:"auth"`
}

// Host is the physical host the monitor runs on.
type Host struct {
	ID string `json:"id"`
	// Fingerprint is the lowercase hex SHA-256 of the host's TPM endorsement key,
	// or empty when the host has no TPM.
	Fingerprint string `json:"fingerprint"`
	// Attestation is "verified", "unverified" or "failed".
	Attestation string `json:"attestation"`
}

// VM is the VM the action applies to, as the monitor knows it (never as the guest
// claims it).
type VM struct {
	ID       string            `json:"id"`
	Labels   map[string]string `json:"labels"`
	Spec     Spec              `json:"spec"`
	State    string            `json:"state"` // defined, running, suspended, stopped
	Devices  []Device          `json:"devices"`
	Networks []Network         `json:"networks"`
	// FirstLaunchAt is when the VM was first launched, recorded by the monitor;
	// zero if it never was.
	FirstLaunchAt time.Time `json:"first_launch_at,omitzero"`
}

// Spec is the part of a VM spec that policies may restrict.
type Spec struct {
	MemoryMiB uint64 `json:"memory_mib"`
	VCPUs     uint32 `json:"vcpus"`
	// Image is the SHA-256 (hex) of the guest image.
	Image string `json:"image"`
	Cloak bool   `json:"cloak"`
}

// Device is a virtual device: its type (e.g. "virtio-blk", "serial") and its id in
// the VM spec (a disk's name). A disk also carries its identity: the image path as the
// spec resolves it, its format, whether the guest may write it, and what it holds at
// launch: the SHA-256 of its guest-visible contents, or for a protected disk the
// anchored Merkle root (docs/disk.md).
type Device struct {
	Type     string `json:"type"`
	ID       string `json:"id"`
	Path     string `json:"path,omitempty"`
	Format   string `json:"format,omitempty"` // raw, qcow2 or protected
	Digest   string `json:"digest,omitempty"`
	Root     string `json:"root,omitempty"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// Network is a network attachment and its mode: "none", "isolated", "nat",
// "bridged" or "host-only".
type Network struct {
	ID   string `json:"id"`
	Mode string `json:"mode"`
	// Netns, TAP and MAC say where a NIC is connected (a TAP device in the named
	// network namespace) and with which address; set by umbra for a spec's networks.
	Netns string `json:"netns,omitempty"`
	TAP   string `json:"tap,omitempty"`
	MAC   string `json:"mac,omitempty"`
}

// Request carries what the action wants to do. Which field must be set depends
// on the action (see Validate and docs/policy.md).
type Request struct {
	// Recheck is true when umbra re-evaluates a running VM (action launch).
	Recheck   bool       `json:"recheck,omitempty"`
	Spec      *Spec      `json:"spec,omitempty"`
	Device    *Device    `json:"device,omitempty"`
	Network   *Network   `json:"network,omitempty"`
	Console   *Console   `json:"console,omitempty"`
	Stop      *Stop      `json:"stop,omitempty"`
	Snapshot  *Snapshot  `json:"snapshot,omitempty"`
	Transfer  *Transfer  `json:"transfer,omitempty"`
	Clipboard *Clipboard `json:"clipboard,omitempty"`
	Migration *Migration `json:"migration,omitempty"`
	Export    *Export    `json:"export,omitempty"`
	Backup    *Backup    `json:"backup,omitempty"`
	Restore   *Restore   `json:"restore,omitempty"`
	App       *App       `json:"app,omitempty"`
	Pages     *Pages     `json:"pages,omitempty"`
}

// Console is a console-open request: "serial" or "graphical".
type Console struct {
	Kind string `json:"kind"`
}

// Stop is a stop request: Force ends the VM without asking the guest first.
type Stop struct {
	Force bool `json:"force"`
}

// Snapshot names the snapshot created or reverted to. For snapshot_revert it also
// carries the resume-once check (docs/snapshot.md §4.4): Generation is the snapshot's
// TPM-anchored generation and Current the VM's generation counter in the TPM now.
// Generation == Current is the newest snapshot, never resumed; Generation < Current
// means this snapshot already ran once (or a newer one exists or ran): resuming it
// replays the guest's secrets and entropy, which policies refuse unless they allow it.
type Snapshot struct {
	Name       string `json:"name"`
	Generation uint64 `json:"generation,omitempty"`
	Current    uint64 `json:"current,omitempty"`
	// Group is set (snapshot_create only) when the snapshot is one member of a cluster
	// checkpoint (docs/snapshot.md §4.9): the VMs named together are paused at one cut
	// and checkpointed as one set, all or none, and restored together.
	Group *SnapshotGroup `json:"group,omitempty"`
}

// SnapshotGroup is the cluster checkpoint a snapshot belongs to: its name and every
// member VM's id (this VM's among them).
type SnapshotGroup struct {
	Name    string   `json:"name"`
	Members []string `json:"members"`
}

// MaxGroupMembers bounds a cluster checkpoint's members.
const MaxGroupMembers = 16

// Transfer is a file transfer between host and guest.
type Transfer struct {
	Direction string `json:"direction"` // to_guest, from_guest
	Path      string `json:"path"`
}

// Clipboard is a clipboard sharing request.
type Clipboard struct {
	Direction string `json:"direction"` // to_guest, from_guest
}

// Migration names the destination host of a migration.
type Migration struct {
	TargetHost        string `json:"target_host"`
	TargetFingerprint string `json:"target_fingerprint"`
}

// Export is a clone or export destination.
type Export struct {
	Destination string `json:"destination"`
}

// Backup is a backup of one disk (docs/backup.md): full, or incremental since the
// reference point Since; Format is the disk's (a raw or qcow2 disk's backup holds its
// plaintext, a protected one's only ciphertext); Destination is the backup's directory.
type Backup struct {
	Disk        string `json:"disk"`
	Format      string `json:"format"`
	Kind        string `json:"kind"` // full, incremental
	Since       string `json:"since,omitempty"`
	Destination string `json:"destination"`
}

// Restore is the restore of a protected disk from a backup chain, re-anchored as the
// VM's current state of the disk (docs/backup.md, "Restoring a protected disk"): a
// deliberate rollback. Backup, Chain, Manifest, KeyFingerprint, Created and Root
// identify the backed-up state (the chain's last backup); FromVersion and FromRoot are
// the disk's anchor now (0 and "" when this host has none), ToVersion the new anchor's
// version, always above FromVersion; Reason is the operator's justification, if given.
type Restore struct {
	Disk           string `json:"disk"`
	Backup         string `json:"backup"`
	Chain          string `json:"chain"`
	Manifest       string `json:"manifest"`
	KeyFingerprint string `json:"key_fingerprint"`
	Created        string `json:"created"`
	Root           string `json:"root"`
	FromVersion    uint64 `json:"from_version"`
	FromRoot       string `json:"from_root,omitempty"`
	ToVersion      uint64 `json:"to_version"`
	Reason         string `json:"reason,omitempty"`
}

// App identifies a guest application by the measurement of its image.
type App struct {
	Name string `json:"name"`
	// Measurement is the lowercase hex SHA-256 of the application image.
	Measurement string `json:"measurement"`
}

// Pages is a page-protection change: the guest-physical ranges asked for, the
// protection wanted, and the ranges the calling app owns (from the monitor's
// registration records, never from the caller).
type Pages struct {
	Prot   string  `json:"prot"` // none, r, rw, rx
	Ranges []Range `json:"ranges"`
	Owned  []Range `json:"owned"`
}

// Range is a guest-physical byte range; Start and Length are multiples of 4096.
type Range struct {
	Start  uint64 `json:"start"`
	Length uint64 `json:"length"`
}

// Limits on input sizes, so that a hostile caller cannot make evaluation slow.
const (
	maxIDLen     = 256
	maxListLen   = 256
	maxLabels    = 64
	maxPathLen   = 4096
	maxRanges    = 1024
	pageSize     = 4096
	sha256HexLen = 64
)

var (
	authMethods   = set("unix-peer", "mtls", "token", "system", "attested-host")
	attestations  = set("verified", "unverified", "failed")
	vmStates      = set("defined", "running", "suspended", "stopped")
	backupKinds   = set("full", "incremental")
	backupFormats = set("raw", "qcow2", "protected")
	netModes      = set("none", "isolated", "nat", "bridged", "host-only")
	consoleKinds  = set("serial", "graphical")
	directions    = set("to_guest", "from_guest")
	protections   = set("none", "r", "rw", "rx")
	validActions  = func() map[Action]bool {
		m := map[Action]bool{}
		for _, a := range Actions() {
			m[a] = true
		}
		return m
	}()
)

func set(xs ...string) map[string]bool {
	m := make(map[string]bool, len(xs))
	for _, x := range xs {
		m[x] = true
	}
	return m
}

// Validate checks the input against the schema (schema/input.schema.json). It
// returns every problem found, joined, each naming the offending field.
func (in *Input) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("input.%s: %s", field, fmt.Sprintf(format, args...)))
	}
	id := func(field, v string, required bool) {
		switch {
		case v == "" && required:
			bad(field, "is required")
		case len(v) > maxIDLen:
			bad(field, "longer than %d bytes", maxIDLen)
		case !printable(v):
			bad(field, "must be printable UTF-8")
		}
	}
	enum := func(field, v string, allowed map[string]bool) {
		if !allowed[v] {
			bad(field, "%q is not one of %s", v, sortedKeys(allowed))
		}
	}
	hexDigest := func(field, v string, required bool) {
		if v == "" && !required {
			return
		}
		if len(v) != sha256HexLen || !isLowerHex(v) {
			bad(field, "must be %d lowercase hex digits (a SHA-256)", sha256HexLen)
		}
	}

	if !validActions[in.Action] {
		bad("action", "%q is not a guarded action", in.Action)
	}
	if in.Now.IsZero() {
		bad("now", "is required (the monitor's trusted time)")
	}

	id("principal.id", in.Principal.ID, true)
	if len(in.Principal.Groups) > maxListLen {
		bad("principal.groups", "more than %d groups", maxListLen)
	}
	for i, g := range in.Principal.Groups {
		id(fmt.Sprintf("principal.groups[%d]", i), g, true)
	}
	enum("principal.auth", in.Principal.Auth, authMethods)

	id("host.id", in.Host.ID, true)
	hexDigest("host.fingerprint", in.Host.Fingerprint, false)
	enum("host.attestation", in.Host.Attestation, attestations)

	id("vm.id", in.VM.ID, true)
	if len(in.VM.Labels) > maxLabels {
		bad("vm.labels", "more than %d labels", maxLabels)
	}
	for k, v := range in.VM.Labels {
		id("vm.labels key", k, true)
		id("vm.labels["+k+"]", v, false)
	}
	validateSpec(in.VM.Spec, "vm.spec", bad, hexDigest)
	enum("vm.state", in.VM.State, vmStates)
	if len(in.VM.Devices) > maxListLen {
		bad("vm.devices", "more than %d devices", maxListLen)
	}
	for i, d := range in.VM.Devices {
		validateDevice(fmt.Sprintf("vm.devices[%d]", i), &d, bad, id, hexDigest)
	}
	if len(in.VM.Networks) > maxListLen {
		bad("vm.networks", "more than %d networks", maxListLen)
	}
	for i, n := range in.VM.Networks {
		validateNetwork(fmt.Sprintf("vm.networks[%d]", i), n, bad, id, enum)
	}

	r := &in.Request
	need := func(field string, present bool) {
		if !present {
			bad("request."+field, "is required for action %q", in.Action)
		}
	}
	switch in.Action {
	case ActionModifySpec:
		need("spec", r.Spec != nil)
	case ActionAttachDevice, ActionDetachDevice:
		need("device", r.Device != nil)
	case ActionConnectNetwork:
		need("network", r.Network != nil)
		if r.Network != nil {
			validateNetwork("request.network", *r.Network, bad, id, enum)
		}
	case ActionConsoleOpen:
		need("console", r.Console != nil)
	case ActionStop:
		need("stop", r.Stop != nil)
	case ActionSnapshotCreate, ActionSnapshotRevert:
		need("snapshot", r.Snapshot != nil)
	case ActionFileTransfer:
		need("transfer", r.Transfer != nil)
	case ActionClipboard:
		need("clipboard", r.Clipboard != nil)
	case ActionMigrate:
		need("migration", r.Migration != nil)
	case ActionClone, ActionExport:
		need("export", r.Export != nil)
	case ActionBackup:
		need("backup", r.Backup != nil)
	case ActionBackupRestore:
		need("restore", r.Restore != nil)
	case ActionCloakRegister:
		need("app", r.App != nil)
	case ActionPageProtChange:
		need("app", r.App != nil)
		need("pages", r.Pages != nil)
	}
	if r.Recheck && in.Action != ActionLaunch {
		bad("request.recheck", "only valid with action %q", ActionLaunch)
	}
	if r.Spec != nil {
		validateSpec(*r.Spec, "request.spec", bad, hexDigest)
	}
	if r.Device != nil {
		validateDevice("request.device", r.Device, bad, id, hexDigest)
	}
	if r.Network != nil {
		id("request.network.id", r.Network.ID, true)
		enum("request.network.mode", r.Network.Mode, netModes)
	}
	if r.Console != nil {
		enum("request.console.kind", r.Console.Kind, consoleKinds)
	}
	if r.Snapshot != nil {
		id("request.snapshot.name", r.Snapshot.Name, true)
		switch s := r.Snapshot; {
		case in.Action == ActionSnapshotRevert && (s.Generation == 0 || s.Current == 0):
			bad("request.snapshot", "generation and current (both >= 1) are required for action %q", in.Action)
		case in.Action == ActionSnapshotRevert && s.Generation > s.Current:
			bad("request.snapshot.generation", "%d is above current %d: the TPM counter never goes back", s.Generation, s.Current)
		case in.Action != ActionSnapshotRevert && (s.Generation != 0 || s.Current != 0):
			bad("request.snapshot", "generation and current are only valid with action %q", ActionSnapshotRevert)
		}
		if g := r.Snapshot.Group; g != nil {
			validateGroup(in, g, bad, id)
		}
	}
	if r.Transfer != nil {
		enum("request.transfer.direction", r.Transfer.Direction, directions)
		switch {
		case r.Transfer.Path == "":
			bad("request.transfer.path", "is required")
		case len(r.Transfer.Path) > maxPathLen:
			bad("request.transfer.path", "longer than %d bytes", maxPathLen)
		case !printable(r.Transfer.Path):
			bad("request.transfer.path", "must be printable UTF-8")
		}
	}
	if r.Clipboard != nil {
		enum("request.clipboard.direction", r.Clipboard.Direction, directions)
	}
	if r.Migration != nil {
		id("request.migration.target_host", r.Migration.TargetHost, true)
		hexDigest("request.migration.target_fingerprint", r.Migration.TargetFingerprint, false)
	}
	if r.Export != nil {
		id("request.export.destination", r.Export.Destination, true)
	}
	if b := r.Backup; b != nil {
		id("request.backup.disk", b.Disk, true)
		enum("request.backup.format", b.Format, backupFormats)
		enum("request.backup.kind", b.Kind, backupKinds)
		id("request.backup.since", b.Since, b.Kind == "incremental")
		if b.Kind == "full" && b.Since != "" {
			bad("request.backup.since", "only valid with kind incremental")
		}
		switch {
		case b.Destination == "":
			bad("request.backup.destination", "is required")
		case len(b.Destination) > maxPathLen:
			bad("request.backup.destination", "longer than %d bytes", maxPathLen)
		case !printable(b.Destination):
			bad("request.backup.destination", "must be printable UTF-8")
		}
	}
	if x := r.Restore; x != nil {
		id("request.restore.disk", x.Disk, true)
		id("request.restore.backup", x.Backup, true)
		id("request.restore.chain", x.Chain, true)
		hexDigest("request.restore.manifest", x.Manifest, true)
		hexDigest("request.restore.key_fingerprint", x.KeyFingerprint, true)
		hexDigest("request.restore.root", x.Root, true)
		hexDigest("request.restore.from_root", x.FromRoot, false)
		if _, err := time.Parse(time.RFC3339, x.Created); err != nil {
			bad("request.restore.created", "must be an RFC 3339 time")
		}
		if x.ToVersion <= x.FromVersion {
			bad("request.restore.to_version", "must be above from_version (an anchor is never lowered)")
		}
		if len(x.Reason) > maxPathLen {
			bad("request.restore.reason", "longer than %d bytes", maxPathLen)
		} else if !printable(x.Reason) {
			bad("request.restore.reason", "must be printable UTF-8")
		}
	}
	if r.App != nil {
		id("request.app.name", r.App.Name, false)
		hexDigest("request.app.measurement", r.App.Measurement, true)
	}
	if r.Pages != nil {
		enum("request.pages.prot", r.Pages.Prot, protections)
		if len(r.Pages.Ranges) == 0 {
			bad("request.pages.ranges", "is required and must not be empty")
		}
		validateRanges("request.pages.ranges", r.Pages.Ranges, bad)
		validateRanges("request.pages.owned", r.Pages.Owned, bad)
	}
	return errors.Join(errs...)
}

func validateSpec(s Spec, field string, bad func(string, string, ...any), hexDigest func(string, string, bool)) {
	if s.MemoryMiB > 1<<24 {
		bad(field+".memory_mib", "%d MiB is more than 16 TiB", s.MemoryMiB)
	}
	if s.VCPUs > 1024 {
		bad(field+".vcpus", "%d is more than 1024", s.VCPUs)
	}
	hexDigest(field+".image", s.Image, false)
}

// deviceFormats are the disk formats a device may name (empty: not a disk).
var deviceFormats = set("", "raw", "qcow2", "protected")

func validateDevice(field string, d *Device, bad func(string, string, ...any), id func(string, string, bool), hexDigest func(string, string, bool)) {
	id(field+".type", d.Type, true)
	id(field+".id", d.ID, true)
	switch {
	case len(d.Path) > maxPathLen:
		bad(field+".path", "longer than %d bytes", maxPathLen)
	case !printable(d.Path):
		bad(field+".path", "must be printable UTF-8")
	}
	if !deviceFormats[d.Format] {
		bad(field+".format", "%q is not one of raw, qcow2, protected", d.Format)
	}
	hexDigest(field+".digest", d.Digest, false)
	hexDigest(field+".root", d.Root, false)
}

func validateRanges(field string, rs []Range, bad func(string, string, ...any)) {
	if len(rs) > maxRanges {
		bad(field, "more than %d ranges", maxRanges)
		return
	}
	for i, r := range rs {
		f := fmt.Sprintf("%s[%d]", field, i)
		switch {
		case r.Length == 0:
			bad(f, "length must not be zero")
		case r.Start%pageSize != 0 || r.Length%pageSize != 0:
			bad(f, "start and length must be multiples of %d", pageSize)
		case r.Start+r.Length < r.Start:
			bad(f, "start+length overflows 64 bits")
		case r.Start+r.Length > 1<<52:
			bad(f, "ends beyond the 52-bit guest-physical address space")
		}
	}
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sortStrings(out)
	return out
}

// CanonicalJSON is the canonical encoding of the input that the audit digest is
// computed over: encoding/json of the Input type, which has a fixed field order,
// sorted map keys and RFC 3339 times in UTC.
func (in *Input) CanonicalJSON() ([]byte, error) {
	c := in.normalized()
	return json.Marshal(&c)
}

// normalized returns a copy with times in UTC and absent lists and maps as empty
// ones, so that the JSON and the Rego input never contain null for them.
func (in *Input) normalized() Input {
	c := *in
	c.Now = c.Now.UTC()
	c.VM.FirstLaunchAt = c.VM.FirstLaunchAt.UTC()
	if c.Principal.Groups == nil {
		c.Principal.Groups = []string{}
	}
	if c.VM.Labels == nil {
		c.VM.Labels = map[string]string{}
	}
	if c.VM.Devices == nil {
		c.VM.Devices = []Device{}
	}
	if c.VM.Networks == nil {
		c.VM.Networks = []Network{}
	}
	if p := c.Request.Pages; p != nil && (p.Ranges == nil || p.Owned == nil) {
		cp := *p
		if cp.Ranges == nil {
			cp.Ranges = []Range{}
		}
		if cp.Owned == nil {
			cp.Owned = []Range{}
		}
		c.Request.Pages = &cp
	}
	return c
}

// Digest returns the lowercase hex SHA-256 of CanonicalJSON.
func (in *Input) Digest() (string, error) {
	b, err := in.CanonicalJSON()
	if err != nil {
		return "", fmt.Errorf("encode policy input: %w", err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

var macRE = regexp.MustCompile(`^[0-9a-f]{2}(:[0-9a-f]{2}){5}$`)

// validateNetwork checks a network as the schema does.
func validateNetwork(where string, n Network, bad func(string, string, ...any), id func(string, string, bool), enum func(string, string, map[string]bool)) {
	id(where+".id", n.ID, true)
	enum(where+".mode", n.Mode, netModes)
	if len(n.Netns) > 255 || len(n.TAP) > 15 {
		bad(where, "netns or tap too long")
	}
	if n.MAC != "" && !macRE.MatchString(n.MAC) {
		bad(where+".mac", "%q is not a lower-case MAC address", n.MAC)
	}
}

// validateGroup checks a cluster checkpoint's group: only with snapshot_create, 2 to
// MaxGroupMembers distinct members, the VM asked about among them.
func validateGroup(in *Input, g *SnapshotGroup, bad func(field, format string, args ...any), id func(field, v string, required bool)) {
	if in.Action != ActionSnapshotCreate {
		bad("request.snapshot.group", "is only valid with action %q", ActionSnapshotCreate)
	}
	id("request.snapshot.group.name", g.Name, true)
	if n := len(g.Members); n < 2 || n > MaxGroupMembers {
		bad("request.snapshot.group.members", "%d members: a group has 2 to %d", n, MaxGroupMembers)
		return
	}
	seen := map[string]bool{}
	for i, m := range g.Members {
		id(fmt.Sprintf("request.snapshot.group.members[%d]", i), m, true)
		if seen[m] {
			bad(fmt.Sprintf("request.snapshot.group.members[%d]", i), "%q is named twice", m)
		}
		seen[m] = true
	}
	if !seen[in.VM.ID] {
		bad("request.snapshot.group.members", "do not include the VM asked about (%q)", in.VM.ID)
	}
}
