package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"

	"github.com/umbra-cc/umbra/backup"
	"github.com/umbra-cc/umbra/launch"
)

func init() {
	register(&command{name: "backup", summary: "back up a running VM's disk, list its reference points, verify, restore or export a backup chain (create VM --to DIR [--since REF] | list VM | verify DIR... | restore DIR... --to PATH | export DIR... --to PATH)", run: runBackup})
}

func runBackup(ctx context.Context, env *cliEnv, args []string) int {
	const synopsis = "Usage: umbra backup create VM --to DIR [--disk NAME] [--since REF] [--keep] [--rate BYTES]\n" +
		"                          [--mode copy-before-write|snapshot]\n" +
		"       umbra backup list VM [--disk NAME]\n" +
		"       umbra backup verify DIR... [--key FINGERPRINT]\n" +
		"       umbra backup restore DIR... --to PATH [--key FINGERPRINT]\n" +
		"       umbra backup restore DIR... --anchor VM.umbra [--disk NAME] [--reason TEXT] [--tpm ...]\n" +
		"       umbra backup export DIR... --to PATH.qcow2 [--backing IMAGE] [--key FINGERPRINT]\n\n" +
		"create backs up one disk of a running detached VM into the new directory DIR: full,\n" +
		"or incremental since the reference point REF (the id of the backup before it). The\n" +
		"guest is held only for a flush; it runs while the chunks are copied. Decided by the\n" +
		"policy (action backup) and audited. verify checks a chain (the full backup first,\n" +
		"then its incrementals in order) offline, without any key; restore rebuilds the disk\n" +
		"at the chain's last backup into PATH, or, with --anchor, restores a protected disk of\n" +
		"the stopped sealed VM in place and re-anchors it as the disk's current state (a\n" +
		"deliberate rollback: decided by the sealed policy, action backup_restore, audited;\n" +
		"the image from before is refused afterwards); export writes the last backup's chunks as a\n" +
		"qcow2 image for qemu-img (an incremental's over --backing, the earlier chain\n" +
		"restored). docs/backup.md\n"
	sub, words, args, code, done := subcommand(env, synopsis, args)
	if done {
		return code
	}
	switch sub {
	case "create":
		fs := newFlagSet(env, "backup create", "VM", "Back up a disk of VM into the new directory --to (docs/backup.md).")
		cf := addControlFlags(fs, true)
		to := fs.String("to", "", "the new backup's directory (must not exist, or be empty)")
		diskName := fs.String("disk", "", "the disk (may be left out when the VM has one)")
		since := fs.String("since", "", "reference point of the parent backup: an incremental backup")
		rate := fs.Int64("rate", 0, "bound the copy's reads to this many bytes per second (0: none)")
		mode := fs.String("mode", "", "copy-before-write (default) or snapshot (a raw or qcow2 disk: frozen for the copy, the guest's writes consolidated back after it)")
		keep := fs.Bool("keep", false, "keep the --since reference point (by default the chain continues from the new one)")
		if len(words) != 1 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra backup create: give the VM")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		if *to == "" {
			fmt.Fprintln(env.stderr, "umbra backup create: --to DIR is required")
			return exitUsage
		}
		dir, err := filepath.Abs(*to)
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra backup create: %v\n", err)
			return exitUsage
		}
		var res launch.BackupResult
		if err := cl.Operation(ctx, "backup.create", launch.BackupArgs{Disk: *diskName, To: dir, Since: *since, Keep: *keep, Rate: *rate, Mode: *mode}, &res); err != nil {
			return controlFailure(env, "backup create", vm, err)
		}
		if cf.json {
			printJSON(env, res)
			return 0
		}
		fmt.Fprintf(env.stdout, "%s backup %s of disk %s of VM %s in %s: %d chunks, %d bytes stored, guest held %v\n", res.Kind, res.ID, res.Disk, vm, res.Dir, res.Chunks, res.Stored, res.Held)
		fmt.Fprintf(env.stdout, "manifest %s, chain key %s, mode %s\n", res.Manifest, res.KeyFingerprint, res.Mode)
		if res.Mode == launch.ModeSnapshot {
			fmt.Fprintf(env.stdout, "the guest's writes during the copy consolidated back in %v\n", res.Consolidated)
		}
		fmt.Fprintf(env.stdout, "next incremental: umbra backup create %s --since %s --to DIR\n", vm, res.ID)
		return 0
	case "list":
		fs := newFlagSet(env, "backup list", "VM", "List the reference points of VM's disks.")
		cf := addControlFlags(fs, true)
		diskName := fs.String("disk", "", "only this disk")
		if len(words) != 1 {
			if code, done := parseFlags(env, fs, args); done {
				return code
			}
			fmt.Fprintln(env.stderr, "umbra backup list: give the VM")
			return exitUsage
		}
		cl, vm, code, done := oneVM(env, fs, cf, append(args, words[0]))
		if done {
			return code
		}
		var refs []launch.BackupRef
		if err := cl.Operation(ctx, "backup.list", launch.BackupListArgs{Disk: *diskName}, &refs); err != nil {
			return controlFailure(env, "backup list", vm, err)
		}
		if cf.json {
			printJSON(env, refs)
			return 0
		}
		for _, r := range refs {
			state := "complete"
			if !r.Complete {
				state = "incomplete (its backup did not finish: not a parent)"
			}
			fmt.Fprintf(env.stdout, "%s\t%s\t%s\t%d bytes changed since\n", r.Disk, r.Name, state, r.Changed)
		}
		return 0
	case "verify", "restore", "export":
		fs := newFlagSet(env, "backup "+sub, "DIR...", "Check a backup chain offline: the full backup first, then its incrementals in order.")
		key := fs.String("key", "", "pin the chain key's fingerprint (as backup create and the audit log print it)")
		to := fs.String("to", "", "restore, export: the image to create")
		backing := fs.String("backing", "", "export of an incremental: the image of the chain before it (a restore of the earlier backups)")
		jsonOut := fs.Bool("json", false, "print the result as JSON")
		var ra restoreAnchorFlags
		if sub == "restore" {
			ra.add(fs)
		}
		if code, done := parseFlags(env, fs, args); done {
			return code
		}
		if len(words) == 0 || fs.NArg() != 0 {
			fmt.Fprintf(env.stderr, "umbra backup %s: give the backup directories (full first), before any flag\n", sub)
			return exitUsage
		}
		if ra.bundle != "" {
			return restoreAnchored(ctx, env, &ra, words, *to, *key, *jsonOut)
		}
		if ra.disk != "" || ra.reason != "" {
			fmt.Fprintln(env.stderr, "umbra backup restore: --disk and --reason go with --anchor")
			return exitUsage
		}
		opt := backup.VerifyOptions{KeyFingerprint: *key}
		var chain *backup.Chain
		var err error
		switch {
		case sub == "verify" && (*to != "" || *backing != ""):
			fmt.Fprintln(env.stderr, "umbra backup verify: --to and --backing are for restore and export")
			return exitUsage
		case sub == "restore" && *backing != "":
			fmt.Fprintln(env.stderr, "umbra backup restore: --backing is for export")
			return exitUsage
		case sub != "verify" && *to == "":
			fmt.Fprintf(env.stderr, "umbra backup %s: --to PATH is required\n", sub)
			return exitUsage
		case sub == "verify":
			chain, err = backup.Verify(words, opt)
		case sub == "restore":
			chain, err = backup.Restore(words, *to, opt)
		default:
			chain, err = backup.ExportQcow2(words, *to, *backing, opt)
		}
		if err != nil {
			fmt.Fprintf(env.stderr, "umbra backup %s: %v\n", sub, err)
			return exitFailed
		}
		last := chain.Backups[len(chain.Backups)-1].Manifest
		if *jsonOut {
			printJSON(env, map[string]any{"key_fingerprint": chain.KeyFingerprint, "backups": chain.Backups, "restored": *to})
			return 0
		}
		for _, b := range chain.Backups {
			fmt.Fprintf(env.stdout, "%s\t%s %s of disk %s of VM %s at %s, %d chunks, manifest %s\n", b.Dir, b.Manifest.Kind, b.Manifest.ID, b.Manifest.Disk, b.Manifest.VM, b.Manifest.Created.Format("2006-01-02T15:04:05Z"), len(b.Manifest.Chunks), b.Digest)
		}
		fmt.Fprintf(env.stdout, "chain of %d backups verified; chain key %s\n", len(chain.Backups), chain.KeyFingerprint)
		if last.Root != "" {
			fmt.Fprintf(env.stdout, "protected disk root %s\n", last.Root)
		}
		switch sub {
		case "restore":
			fmt.Fprintf(env.stdout, "restored disk %s (%s, %d bytes) into %s\n", last.Disk, restoredFormat(last), last.Size, *to)
		case "export":
			fmt.Fprintf(env.stdout, "exported backup %s of disk %s as the qcow2 image %s (backing %q)\n", last.ID, last.Disk, *to, *backing)
		}
		return 0
	}
	fmt.Fprintf(env.stderr, "umbra backup: unknown subcommand %q\n", sub)
	fmt.Fprint(env.stderr, synopsis)
	return exitUsage
}

// restoreAnchorFlags are backup restore's flags for re-anchoring a protected disk.
type restoreAnchorFlags struct {
	bundle, disk, reason string
	tpm                  *tpmFlags
}

func (f *restoreAnchorFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&f.bundle, "anchor", "", "the VM's sealed bundle: restore its protected disk in place and re-anchor it as the disk's current state (the VM stopped)")
	fs.StringVar(&f.disk, "disk", "", "with --anchor: the disk (default: the chain's)")
	fs.StringVar(&f.reason, "reason", "", "with --anchor: why the disk is rolled back (given to the policy, kept in the audit log)")
	f.tpm = addTPMFlags(fs)
}

// restoreAnchored is backup restore --anchor: the sealed bundle is opened on this
// host's TPM, the restore decided by its policy and audited (launch.RestoreAnchored).
func restoreAnchored(ctx context.Context, env *cliEnv, f *restoreAnchorFlags, dirs []string, to, key string, jsonOut bool) int {
	if to != "" || key != "" {
		fmt.Fprintln(env.stderr, "umbra backup restore: --anchor restores the disk where the sealed VM opens it, with the VM's own chain key: --to and --key do not go with it")
		return exitUsage
	}
	if err := f.tpm.check(); err != nil {
		fmt.Fprintf(env.stderr, "umbra backup restore: %v\n", err)
		return exitUsage
	}
	tpm, stateDir, err := f.tpm.open(ctx, env)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra backup restore: TPM: %v\n", err)
		return exitFailed
	}
	defer tpm.Close()
	src, err := launch.SealedSource(ctx, tpm, stateDir, f.bundle, nil)
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra backup restore: %v\n", err)
		return exitFailed
	}
	defer src.Wipe()
	principal, err := launch.LocalPrincipal()
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra backup restore: %v\n", err)
		return exitFailed
	}
	res, err := launch.RestoreAnchored(ctx, launch.RestoreConfig{Source: src, TPM: tpm, StateDir: stateDir, Principal: principal, Dirs: dirs, Disk: f.disk, Reason: f.reason})
	if err != nil {
		fmt.Fprintf(env.stderr, "umbra backup restore: %v\n", err)
		return exitFailed
	}
	if jsonOut {
		printJSON(env, res)
		return 0
	}
	fmt.Fprintf(env.stdout, "restored disk %s of VM %s from backup %s (chain %s, key %s) into %s\n", res.Disk, res.VM, res.Backup, res.Chain, res.KeyFingerprint, res.Image)
	fmt.Fprintf(env.stdout, "re-anchored at version %d (was %d), root %s: the image from before the restore is refused from now on\n", res.ToVersion, res.FromVersion, res.Root)
	return 0
}

func restoredFormat(m *backup.Manifest) string {
	if m.DiskFormat == backup.FormatProtected {
		return "a protected image: it opens only with the VM's sealed key and the root above"
	}
	return "a raw image"
}
